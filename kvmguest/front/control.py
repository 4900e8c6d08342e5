"""A control socket: `kvmguest run ... --control SOCK` listens; `kvmguest save --control
SOCK PATH` asks it to save the running guest.

Protocol: the client sends one JSON request line. The server answers with progress lines
(``{"progress": "pass 1", "fraction": 0.8}``) and ends with one reply line that has
``"ok"``. While a save runs, the client may send the line ``cancel`` (or hang up): the
save is then cancelled, the guest keeps running, and the reply says so.

Trust: the socket is created mode 0600; both ends check who is on the other side with
``SO_PEERCRED`` (the server serves only its own user or root; the client talks only to
a socket, and a server, of its own user). The server removes the socket it created when
it exits, and nothing else (same inode). Connections are bounded in number and in how
long they may sit idle.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import socket
import stat
import struct
import threading

from kvmguest.errors import EXIT_BAD_INPUT, KvmguestError, printable

from migrate.precopy import live_save
from migrate.errors import SaveCancelled, SaveError

log = logging.getLogger(__name__)

MAX_PATH = 107              # sun_path holds 108 bytes with the NUL
MAX_CONNECTIONS = 4         # at once; more are told the guest is busy
BUSY_DRAIN = 1.0            # seconds a busy connection's request is read for before closing
MAX_DRAINS = 16             # busy connections drained at once (more are closed at once)
REQUEST_TIMEOUT = 10.0      # seconds a client may take to send its request line
REPLY_SILENCE = 600.0       # seconds the client waits for any line before giving up
SAVE_OPTIONS = {"path", "threads", "direct", "then", "format", "downtime_ms"}


class ControlError(KvmguestError):
    """The control socket cannot be used (bad path, no guest there, another user's)."""

    exit_code = EXIT_BAD_INPUT


class SaveFailed(KvmguestError):
    """A save asked for over the control socket failed; the guest said why."""


def check_socket_path(path: str, what: str = "control socket") -> str:
    """The absolute socket path, or ControlError if it cannot be a Unix socket's."""
    if not path:
        raise ControlError(f"the {what} path is empty")
    full = os.path.abspath(path)
    n = len(os.fsencode(full))
    if n > MAX_PATH:
        raise ControlError(f"{what} path {printable(full)} is {n} bytes; Unix sockets "
                           f"allow at most {MAX_PATH} (use a shorter one, e.g. under "
                           "$XDG_RUNTIME_DIR)")
    return full


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def _answers_status(sock: socket.socket) -> bool:
    """Does the server at the other end speak our protocol (a kvmguest guest)?"""
    try:
        sock.settimeout(1.0)
        sock.sendall(b'{"op": "status"}\n')
        reply = json.loads(sock.makefile("rb").readline(4096))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(reply, dict) and "ok" in reply


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _claim_path(path: str, what: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    where = printable(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{where} exists and is not a socket; not replacing it")
    if st.st_uid != os.geteuid():
        raise ControlError(f"{where} is a socket owned by another user (uid {st.st_uid}); "
                           "not touching it: choose another path, e.g. under "
                           "$XDG_RUNTIME_DIR")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)   # a stale socket left by a guest that died
        return
    except OSError as err:
        raise ControlError(f"cannot check {what} {where}: {err.strerror}") from None
    else:
        pid, _, _ = peer_credentials(probe)
        who = "another running guest" if _answers_status(probe) else "another program"
        raise ControlError(f"{where} is in use by {who} (pid {pid}, "
                           f"{printable(_process_name(pid))})")
    finally:
        probe.close()


def bind_private_socket(path: str, what: str = "control socket",
                        backlog: int = 1) -> tuple[socket.socket, str]:
    """A listening Unix socket at ``path`` that only this user can reach (mode 0600),
    and its absolute path. A stale socket of ours is replaced; one another process
    answers on, a file that is not a socket, or another user's socket is not."""
    path = check_socket_path(path, what)
    _claim_path(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as err:
        sock.close()
        raise ControlError(f"cannot create {what} {printable(path)}: {err.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock, path


class ControlServer:
    """Listens at ``path`` for requests about ``machine`` (attach it once it exists)."""

    def __init__(self, path: str, machine=None, on_saved=None, on_progress=None):
        self.machine, self.on_saved = machine, on_saved
        self.sock, self.path = bind_private_socket(path, "control socket", MAX_CONNECTIONS)
        self.inode = os.lstat(self.path).st_ino
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._drains = threading.BoundedSemaphore(MAX_DRAINS)
        self._saves: list[threading.Event] = []     # cancel events of saves in progress
        self._idle = threading.Condition()
        self._closed = False
        self.checkpoints = None
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def attach(self, machine, checkpoints=None) -> None:
        """``checkpoints``: the guest's Checkpointer, for ``kvmguest checkpoint``."""
        self.machine = machine
        if checkpoints is not None:
            self.checkpoints = checkpoints

    # --- serving -------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                self._busy(conn)
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _busy(self, conn: socket.socket) -> None:
        """Tell a connection beyond the bound, at once, that the guest is busy; then read
        what it sent before closing (in a drain thread, a bounded number of them): a
        socket closed with unread data is reset, and the client would see a broken pipe
        instead of this answer. (The client also reads an answer after a failed send.)"""
        self._send(conn, {"ok": False, "error": "the guest is busy with "
                          f"{MAX_CONNECTIONS} other connections; try again"})
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if not self._drains.acquire(blocking=False):
            conn.close()
            return

        def drain():
            try:
                with conn:
                    conn.settimeout(BUSY_DRAIN)
                    while conn.recv(1 << 16):
                        pass
            except OSError:
                pass
            finally:
                self._drains.release()
        threading.Thread(target=drain, name="control-busy", daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(REQUEST_TIMEOUT)
                try:
                    line = conn.makefile("rb").readline(1 << 16)
                except OSError:          # idle or broken: drop it
                    return
                conn.settimeout(None)
                pid, uid, _ = peer_credentials(conn)
                if uid not in (os.geteuid(), 0):
                    # Refused after its request was read, so that the client sees why.
                    log.warning("control: refused a connection from uid %d (pid %d)", uid, pid)
                    self._send(conn, {"ok": False, "error": "permission denied: this guest "
                                      "serves only its own user"})
                    return
                self._send(conn, self._reply(conn, line))
        finally:
            self._slots.release()

    @staticmethod
    def _send(conn: socket.socket, message: dict) -> bool:
        try:
            conn.sendall(json.dumps(message).encode() + b"\n")
            return True
        except OSError:
            return False

    def _reply(self, conn: socket.socket, line: bytes) -> dict:
        try:
            req = json.loads(line)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return {"ok": False, "error": "bad request: not a JSON line"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "bad request: expected a JSON object"}
        op = req.get("op")
        if op == "status":
            return {"ok": True, "running": bool(self.machine and self.machine.running)}
        if op == "checkpoint":
            return self._checkpoint()
        if op not in ("save", "migrate"):
            return {"ok": False, "error": f"bad request: unknown op {printable(op)!r}"}
        try:
            options = (self._save_options if op == "save" else self._migrate_options)(req)
        except ValueError as err:
            return {"ok": False, "error": f"bad request: {err}"}
        try:
            report = self._save(conn, options)
        except SaveCancelled as err:
            return {"ok": False, "cancelled": True, "error": str(err)}
        except KvmguestError as err:
            return {"ok": False, "error": str(err), "exit_code": err.exit_code}
        except Exception as err:  # noqa: BLE001 - reported to the client, logged here
            log.exception("control: save failed")
            return {"ok": False, "error": f"internal error: {type(err).__name__}: {err}"}
        if self.on_saved:
            self.on_saved(report)
        return {"ok": True, "report": report.as_dict(), "summary": report.summary()}

    def _checkpoint(self) -> dict:
        if self.checkpoints is None:
            return {"ok": False, "error": "this guest keeps no checkpoints (run it with "
                                          "--checkpoint PATH)"}
        if self.machine is None or not self.machine.running:
            return {"ok": False, "error": "the guest is not running"}
        try:
            st = self.checkpoints.take()
        except KvmguestError as err:
            return {"ok": False, "error": str(err)}
        return {"ok": True, "summary": f"checkpoint {st.generation} of "
                f"{self.checkpoints.path}: {st.pages} pages, guest paused {st.pause_ms:.2f} ms, "
                f"written in {st.write_ms:.1f} ms"}

    def _save_options(self, req: dict) -> dict:
        unknown = set(req) - SAVE_OPTIONS - {"op"}
        if unknown:
            raise ValueError(f"unknown fields {sorted(map(printable, unknown))}")
        path = req.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("save needs a path (a non-empty string)")
        if not os.path.isabs(path):
            raise ValueError("the path must be absolute")
        if os.path.abspath(path) == self.path:
            raise ValueError("the snapshot path is the control socket itself")
        threads = req.get("threads", 1)
        if type(threads) is not int:
            raise ValueError("threads must be an integer")
        downtime = req.get("downtime_ms", 50.0)
        if type(downtime) not in (int, float) or not math.isfinite(downtime) or downtime <= 0:
            raise ValueError("downtime_ms must be a positive number")
        then, format, direct = req.get("then", "stop"), req.get("format", "mapped"), \
            req.get("direct", False)
        if then not in ("stop", "continue") or format not in ("mapped", "stream") \
                or type(direct) is not bool:
            raise ValueError("then must be stop|continue, format mapped|stream, direct a bool")
        return dict(path=path, threads=threads, direct=direct, then=then, format=format,
                    downtime_ms=float(downtime))

    @staticmethod
    def _migrate_options(req: dict) -> dict:
        """A migration is a live save to an address (migrate/live.py), the guest stopped
        here once the destination has it."""
        unknown = set(req) - {"op", "address", "downtime_ms", "tls", "postcopy", "local",
                              "threads"}
        if unknown:
            raise ValueError(f"unknown fields {sorted(map(printable, unknown))}")
        address = req.get("address")
        if not isinstance(address, str) or not address:
            raise ValueError("migrate needs an address (unix:PATH or tcp:HOST:PORT)")
        from migrate.live import Tls, parse_address
        tls = req.get("tls")
        try:
            if tls is not None:
                if not (isinstance(tls, list) and len(tls) == 3 and
                        all(isinstance(p, str) and os.path.isabs(p) for p in tls)):
                    raise ValueError("tls must be [cert, key, ca], absolute paths")
                tls = Tls(*tls)
            parse_address(address, tls is not None)
        except KvmguestError as err:
            raise ValueError(str(err)) from None
        downtime = req.get("downtime_ms", 50.0)
        if type(downtime) not in (int, float) or not math.isfinite(downtime) or downtime <= 0:
            raise ValueError("downtime_ms must be a positive number")
        from migrate.live import POSTCOPY_MODES
        postcopy = req.get("postcopy", "auto")
        if postcopy not in POSTCOPY_MODES:
            raise ValueError(f"postcopy must be one of {', '.join(POSTCOPY_MODES)}")
        local = req.get("local", False)
        if type(local) is not bool or (local and not address.startswith("unix:")):
            raise ValueError("local is a bool, and a local migration goes to unix:PATH")
        from migrate.live import MAX_CHANNELS
        threads = req.get("threads", 1)
        if type(threads) is not int or not 1 <= threads <= MAX_CHANNELS:
            raise ValueError(f"threads must be 1 to {MAX_CHANNELS}")
        return dict(path=address, threads=threads, direct=False, then="stop", format="migrate",
                    downtime_ms=float(downtime), tls=tls, postcopy="off" if local else postcopy,
                    local=local)

    def _save(self, conn: socket.socket, options: dict):
        if self.machine is None or not self.machine.running:
            raise SaveError("the guest is not running")
        cancel = threading.Event()
        with self._idle:
            if self._closed:
                raise SaveCancelled("the guest is shutting down; nothing was saved")
            self._saves.append(cancel)
        done = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(conn, cancel, done),
                                   name="control-watch", daemon=True)
        watcher.start()

        def progress(what: str, fraction: float) -> None:
            self._send(conn, {"progress": what, "fraction": round(fraction, 4)})

        try:
            return live_save(self.machine, options["path"], threads=options["threads"],
                             direct=options["direct"], then=options["then"],
                             format=options["format"], downtime_ms=options["downtime_ms"],
                             progress=progress, cancel=cancel, tls=options.get("tls"),
                             postcopy=options.get("postcopy", "off"),
                             local=options.get("local", False))
        finally:
            done.set()
            watcher.join()
            with self._idle:
                self._saves.remove(cancel)
                self._idle.notify_all()

    @staticmethod
    def _watch(conn: socket.socket, cancel: threading.Event, done: threading.Event) -> None:
        """While a save runs: a ``cancel`` line, or the client hanging up, cancels it."""
        while not done.is_set():
            try:
                ready, _, _ = select.select([conn], [], [], 0.05)
                if not ready:
                    continue
                data = conn.recv(64)
            except (OSError, ValueError):
                data = b""
            if not data or b"cancel" in data:
                cancel.set()
                return

    def drain(self, timeout: float = 600.0) -> None:
        """Wait for saves in progress (one may have stopped the guest) to reply."""
        with self._idle:
            self._idle.wait_for(lambda: not self._saves, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Stop listening, cancel saves in progress and wait (bounded) for them to clean up,
        then remove our socket (only if the path still holds the one we created)."""
        with self._idle:
            self._closed = True
            for cancel in self._saves:
                cancel.set()
        try:
            self.sock.close()
        finally:
            with self._idle:
                self._idle.wait_for(lambda: not self._saves, timeout)
            try:
                if os.lstat(self.path).st_ino == self.inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass


def listen_for_migration(address: str, tls: bool = False) -> socket.socket:
    """The listening socket of `restore --incoming ADDRESS` (migrate/live.py): a Unix
    socket private to its owner, as the control socket is; TCP (beyond loopback only
    with ``tls``)."""
    from migrate.live import parse_address
    where = parse_address(address, tls)
    if where[0] == "unix":
        return bind_private_socket(where[1], "migration socket")[0]
    try:
        return socket.create_server(where[1:])
    except OSError as err:
        raise ControlError(f"cannot listen on {address}: {err.strerror}") from None


def _connect(path: str) -> socket.socket:
    where = printable(path)
    try:
        st = os.lstat(path)
    except OSError as err:
        raise ControlError(f"cannot connect to control socket {where}: {err.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{where} is not a socket")
    if st.st_uid != os.geteuid():
        raise ControlError(f"control socket {where} belongs to another user (uid {st.st_uid}); "
                           "refusing to send it a request")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(REQUEST_TIMEOUT)
    try:
        s.connect(path)
        pid, uid, _ = peer_credentials(s)
    except OSError as err:
        s.close()
        raise ControlError(f"cannot connect to control socket {where}: {err.strerror}") from None
    if uid != os.geteuid():
        s.close()
        raise ControlError(f"the process at {where} (pid {pid}) runs as another user "
                           f"(uid {uid}); refusing to send it a request")
    return s


def _reply_line(line: bytes) -> dict:
    try:
        reply = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError):
        reply = None
    if not isinstance(reply, dict) or not (
            reply.get("ok") is True
            or (reply.get("ok") is False and isinstance(reply.get("error"), str))
            or ("ok" not in reply and isinstance(reply.get("progress"), str))):
        raise ControlError("the guest sent a malformed reply")
    return reply


def request_save(path: str, options: dict, progress=None) -> dict:
    """Ask the guest at ``path`` for a save; its reply (``summary`` on success)."""
    return _with_summary(request(path, dict(options, op="save"), progress))


def request_checkpoint(path: str) -> dict:
    """Ask the guest at ``path`` for a checkpoint now; its reply (``summary`` on success)."""
    return _with_summary(request(path, {"op": "checkpoint"}))


def _with_summary(reply: dict) -> dict:
    """A successful save or checkpoint says what it did; a reply that does not is not
    one (the same check for both commands)."""
    if reply["ok"] and not isinstance(reply.get("summary"), str):
        raise ControlError("the guest sent a malformed reply")
    return reply


def request(path: str, req: dict, progress=None, silence: float = REPLY_SILENCE) -> dict:
    """Send ``req`` and return the final reply; progress lines go to ``progress(what,
    fraction)``. An interrupt (Ctrl-C) asks the guest to cancel and returns its answer
    with ``"interrupted": True``."""
    s = _connect(path)
    with s:
        s.settimeout(silence)
        f = s.makefile("rb")
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
        except OSError as err:
            # The guest may have answered before it closed (busy): that answer counts.
            try:
                line = f.readline(1 << 20)
            except OSError:
                line = b""
            if line:
                return _reply_line(line)
            raise ControlError(f"the guest at {printable(path)} closed the connection: "
                               f"{err.strerror}") from None
        interrupted = None
        while True:
            try:
                line = f.readline(1 << 20)
            except TimeoutError:
                raise ControlError(f"no word from the guest for {silence:g} s; gave up (the "
                                   "save is cancelled when this connection closes)") from None
            except KeyboardInterrupt as err:      # Ctrl-C, or Interrupted (SIGTERM/SIGHUP)
                if interrupted is not None:
                    continue           # already asked; keep waiting for the answer
                interrupted = err
                try:
                    s.sendall(b"cancel\n")
                except OSError:
                    raise err from None
                s.settimeout(30.0)
                continue
            if not line:
                raise ControlError("the guest closed the control connection without a reply")
            reply = _reply_line(line)
            if "ok" in reply:
                if interrupted is not None:
                    reply["interrupted"] = True
                return reply
            if progress:
                fraction = reply.get("fraction", 0.0)
                progress(reply["progress"], fraction if isinstance(fraction, float) else 0.0)
