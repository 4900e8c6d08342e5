"""A control socket: `kvmguest run ... --control SOCK` listens; `kvmguest save --control
SOCK PATH` asks it to save the running guest. One JSON request line, one JSON reply line.
The socket is created mode 0600 and removed when the guest ends."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading

from .precopy import live_save
from .writer import SaveError

log = logging.getLogger(__name__)


class ControlError(RuntimeError):
    pass


class ControlServer:
    def __init__(self, path: str, machine, on_saved=None):
        self.path, self.machine, self.on_saved = os.path.abspath(path), machine, on_saved
        self._claim_path()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(self.path)
        except OSError as err:
            self.sock.close()
            raise ControlError(f"cannot create control socket {self.path}: {err.strerror}") from None
        finally:
            os.umask(old)
        self.sock.listen(4)
        self._inflight = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _claim_path(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)   # a stale socket left by a guest that died
            return
        finally:
            probe.close()
        raise ControlError(f"{self.path} is in use by another running guest")

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with self._idle:
            self._inflight += 1
        try:
            self._handle_one(conn)
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def drain(self, timeout: float = 600.0) -> None:
        """Wait for requests in progress (a save that stopped the guest) to reply."""
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def _handle_one(self, conn: socket.socket) -> None:
        with conn:
            try:
                line = conn.makefile("rb").readline(1 << 16)
                req = json.loads(line)
                reply = self._dispatch(req)
            except (ValueError, TypeError) as err:
                reply = {"ok": False, "error": f"bad request: {err}"}
            except (SaveError, RuntimeError, OSError) as err:
                reply = {"ok": False, "error": str(err)}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass

    def _dispatch(self, req: dict) -> dict:
        op = req.get("op")
        if op == "status":
            return {"ok": True, "running": self.machine.running}
        if op == "save":
            report = live_save(self.machine, str(req["path"]), threads=int(req.get("threads", 1)),
                               direct=bool(req.get("direct", False)),
                               then=str(req.get("then", "stop")),
                               format=str(req.get("format", "mapped")),
                               downtime_ms=float(req.get("downtime_ms", 50.0)))
            if self.on_saved:
                self.on_saved(report)
            return {"ok": True, "report": report.as_dict(), "summary": report.summary()}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def request(path: str, req: dict, timeout: float = 600.0) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as err:
        s.close()
        raise ControlError(f"cannot connect to control socket {path}: {err.strerror}") from None
    with s:
        s.sendall(json.dumps(req).encode() + b"\n")
        data = s.makefile("rb").readline()
    if not data:
        raise ControlError("the guest closed the control connection without a reply")
    return json.loads(data)
