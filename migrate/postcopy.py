"""Post-copy (docs/migration.md): the destination runs the guest before all of its memory
has arrived. The pages the source dirtied after its last pre-copy pass are *remote*: the
destination drops its stale copies and registers guest memory with userfaultfd (missing
faults on anonymous memory, which KVM takes as well), and a page a vCPU or the VMM
touches is fetched from the source on a connection of its own (the fault channel), so a
fault never queues behind bulk pages; meanwhile the source pushes the rest on the main
connection, restarting just after each page asked for.

The faults are served by a *pager*, a small process of its own (``python -m
migrate.postcopy``) holding the userfaultfd and the fault channel: a Python thread of the
VMM that touches a missing page while it holds the GIL would otherwise wait on a handler
that needs the GIL. The pager resolves every fault alone: a remote page by asking the
source (which answers every request, even for a page it has pushed already), any other
page by mapping zeros (it was zero when pre-copy began and nobody wrote it since).
"""

from __future__ import annotations

import bisect
import ctypes
import json
import os
import select
import socket
import struct
import sys
import threading
import time
import zlib

from kvmguest.memory import PAGE_SIZE as PAGE

from migrate.wire import Tls, recv_exact, recv_with_fds, send_with_fds, sendall
REQUEST = struct.Struct("<IQ")          # a fault: (block, page index)
RUN_PAGES = 256                         # the most pages one pushed record carries
FRAME = struct.Struct("<I")             # VMM <-> pager messages: u32 length, JSON
FAULT_HELLO = b"KVMGFLT1"               # the source's fault channel: this, then the token
LOST_AFTER = 60.0                       # seconds a fault waits before the source counts as gone
# Tests: the source pushes nothing until it has answered this many faults (a handshake
# that makes sure the destination's guest runs on faults; never a delay).
PUSH_AFTER_ENV = "KVMGUEST_POSTCOPY_PUSH_AFTER"

# userfaultfd (linux/userfaultfd.h), x86-64
NR_USERFAULTFD = 323
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12
MSG = struct.Struct("<BBHIQQQ")          # struct uffd_msg: event, ..., flags, address, ptid


class PostcopyError(Exception):
    """Post-copy could not be set up (before the acknowledgement: the source runs on)."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _Zero(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


def _ioctl(fd: int, request: int, arg) -> int:
    """0, or the errno (EEXIST: the page is there already)."""
    if _libc.ioctl(fd, request, ctypes.byref(arg)) == 0:
        return 0
    return ctypes.get_errno()


def open_uffd(ranges: list[tuple[int, int]]) -> int:
    """A userfaultfd with ``ranges`` (host address, length) registered for missing
    faults. PostcopyError (one line) where this host or user cannot have one."""
    fd = _libc.syscall(NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        raise PostcopyError(f"userfaultfd: {os.strerror(err)} (post-copy needs it, as root "
                            "or with vm.unprivileged_userfaultfd=1)")
    try:
        err = _ioctl(fd, UFFDIO_API, _Api(UFFD_API, 0, 0))
        if err:
            raise PostcopyError(f"userfaultfd API handshake: {os.strerror(err)}")
        for start, length in ranges:
            err = _ioctl(fd, UFFDIO_REGISTER, _Register(_Range(start, length),
                                                        UFFDIO_REGISTER_MODE_MISSING, 0))
            if err:
                raise PostcopyError(f"userfaultfd cannot register guest memory: "
                                    f"{os.strerror(err)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _resolve(uffd: int, request: int, arg, dst: int, what: str) -> None:
    """One page resolved by ``request`` (woken: the vCPU or thread waiting on it runs
    on); a page that is there already (the other channel was first) just wakes its
    waiters."""
    err = _ioctl(uffd, request, arg)
    if err == 17:                                  # EEXIST
        _ioctl(uffd, UFFDIO_WAKE, _Range(dst, PAGE))
    elif err:
        raise OSError(err, f"{what}: {os.strerror(err)}")


def copy_page(uffd: int, dst: int, src: int) -> None:
    """Install one page, read from ``src``."""
    _resolve(uffd, UFFDIO_COPY, _Copy(dst, src, PAGE, 0, 0), dst, "UFFDIO_COPY")


def copy_run(uffd: int, dst: int, src: int, count: int) -> None:
    """Install ``count`` pages in one UFFDIO_COPY where none is there yet; where one is
    (a fault fetched it first), the others one by one around it."""
    arg = _Copy(dst, src, count * PAGE, 0, 0)
    err = _ioctl(uffd, UFFDIO_COPY, arg)
    if err == 0:
        return
    if err not in (17, 11):                          # EEXIST, EAGAIN (partial)
        raise OSError(err, f"UFFDIO_COPY: {os.strerror(err)}")
    done = max(arg.copy, 0) // PAGE
    for k in range(done, count):
        copy_page(uffd, dst + k * PAGE, src + k * PAGE)


def zero_page(uffd: int, dst: int) -> None:
    """Map one page of zeros."""
    _resolve(uffd, UFFDIO_ZEROPAGE, _Zero(_Range(dst, PAGE), 0, 0), dst, "UFFDIO_ZEROPAGE")


# --- framing between the VMM and its pager ---------------------------------------------
def send_frame(sock: socket.socket, obj, fds: list[int] = ()) -> None:
    data = json.dumps(obj).encode()
    if fds:
        send_with_fds(sock, FRAME.pack(len(data)) + data, fds)
    else:
        sock.sendall(FRAME.pack(len(data)) + data)


def recv_frame(sock: socket.socket, want_fds: int = 0):
    """(object, fds); EOFError when the peer is gone."""
    if want_fds:
        head, fds = recv_with_fds(sock, FRAME.size, want_fds)
    else:
        head, fds = recv_exact(sock, FRAME.size), []
    (n,) = FRAME.unpack(head)
    return json.loads(recv_exact(sock, n)), fds


# --- the pager (its own process) -------------------------------------------------------
class Pager:
    """Runs in ``python -m migrate.postcopy``: accepts the fault channel on the migration's
    listening socket, then, handed the userfaultfd and the remote pages, resolves every
    fault until every remote page is in."""

    def __init__(self, ctrl: socket.socket, listener: socket.socket, token: bytes, tls):
        self.ctrl, self.listener, self.token, self.tls = ctrl, listener, token, tls
        self.chan = None
        self.uffd = -1
        self.starts: list[int] = []          # region host addresses, ascending
        self.regions: list[tuple[int, int, int]] = []    # (host address, pages, block)
        self.state: list[bytearray] = []     # per block: 0 local, 1 remote, 2 asked, 3 in
        self.asked_at: dict[tuple[int, int], float] = {}
        self.latencies: list[float] = []
        self.zero_faults = 0
        self.remote_left = 0
        self.bulk_over = False

    def accept_fault_channel(self) -> None:
        """The source's second connection, checked by the token the destination greeted
        it with (a stranger's connection is closed)."""
        self.listener.settimeout(LOST_AFTER)
        for _ in range(16):
            conn, _ = self.listener.accept()
            conn.settimeout(LOST_AFTER)
            try:
                if self.tls is not None:
                    conn = self.tls.server(conn)
                hello = bytes(recv_exact(conn, len(FAULT_HELLO) + len(self.token)))
            except Exception:          # noqa: BLE001 - a stranger's connection: closed
                conn.close()
                continue
            if hello == FAULT_HELLO + self.token:
                if isinstance(conn, socket.socket) and conn.family != socket.AF_UNIX:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.chan = conn
                return
            conn.close()
        raise PostcopyError("no fault channel from the source")

    def arm(self, plan: dict, uffd: int) -> None:
        """The userfaultfd, the blocks' host addresses and the first remote pages."""
        self.uffd = uffd
        self.base = [addr for addr, _ in plan["regions"]]
        self.regions = sorted((addr, npages, bi)
                              for bi, (addr, npages) in enumerate(plan["regions"]))
        self.starts = [r[0] for r in self.regions]
        self.state = [bytearray(npages) for _, npages in plan["regions"]]
        self.add_remote(plan["remote"])

    def add_remote(self, lists: list[str]) -> None:
        """More remote pages: per block, the hex of a zlib'd bitmap (PagerProcess.arm)."""
        import numpy as np
        for st, packed in zip(self.state, lists):
            more = np.unpackbits(np.frombuffer(zlib.decompress(bytes.fromhex(packed)),
                                               np.uint8), count=len(st),
                                 bitorder="little").astype(np.bool_)
            mine = np.frombuffer(st, np.uint8).copy()
            new = more & (mine == 0)
            mine[new] = 1
            st[:] = mine.tobytes()
            self.remote_left += int(new.sum())

    def where(self, addr: int) -> tuple[int, int, int]:
        k = bisect.bisect_right(self.starts, addr) - 1
        base, npages, bi = self.regions[k]
        return bi, (addr - base) // PAGE, base

    def on_fault(self, addr: int) -> None:
        bi, index, base = self.where(addr & ~(PAGE - 1))
        st = self.state[bi]
        page = base + index * PAGE
        if st[index] == 0:
            zero_page(self.uffd, page)
            self.zero_faults += 1
        elif st[index] == 1:
            st[index] = 2
            self.asked_at[(bi, index)] = time.perf_counter()
            self.chan.sendall(REQUEST.pack(bi, index))
        elif st[index] == 3:
            _ioctl(self.uffd, UFFDIO_WAKE, _Range(page, PAGE))

    def on_page(self, bi: int, index: int, buf) -> None:
        if bi >= len(self.state) or index >= len(self.state[bi]):
            raise PostcopyError(f"the source sent page {index} of block {bi}: out of range")
        copy_page(self.uffd, self.base[bi] + index * PAGE, ctypes.addressof(buf))
        st = self.state[bi]
        if st[index] in (1, 2):
            self.remote_left -= 1
        st[index] = 3
        asked = self.asked_at.pop((bi, index), None)
        if asked is not None:
            self.latencies.append(time.perf_counter() - asked)

    def bulk_done(self) -> None:
        """The main connection's push has ended and every page on it is installed: a
        remote page never asked for came that way; those asked for come (again) here."""
        for st in self.state:
            st[:] = st.replace(b"\x01", b"\x03")
        self.remote_left = sum(st.count(2) for st in self.state)

    def run(self) -> str:
        """Serve faults until the VMM says the bulk is in and no remote page is left:
        "done", or the reason the source counts as gone."""
        buf = (ctypes.c_char * PAGE)()
        head = bytearray(REQUEST.size)
        msgs = bytearray(MSG.size * 64)
        poll = select.poll()
        poll.register(self.uffd, select.POLLIN)
        poll.register(self.chan.fileno(), select.POLLIN)
        poll.register(self.ctrl.fileno(), select.POLLIN)
        self.chan.setblocking(True)
        self.chan.settimeout(LOST_AFTER)
        while not (self.bulk_over and self.remote_left == 0):
            pending = getattr(self.chan, "pending", lambda: 0)()   # TLS: bytes already read
            events = [(self.chan.fileno(), select.POLLIN)] if pending else poll.poll(
                LOST_AFTER * 1e3 if self.asked_at else None)
            if not events:
                return f"no page came from the source for {LOST_AFTER:g} s"
            for fd, ev in events:
                if fd in (self.ctrl.fileno(), self.uffd):
                    # News of pages first: the VMM sent it before the guest could run,
                    # so it is there before any fault it concerns.
                    outcome = self._read_ctrl()
                    if outcome is not None:
                        return outcome
                if fd == self.uffd:
                    try:
                        n = os.readv(self.uffd, [msgs])
                    except BlockingIOError:
                        continue
                    for k in range(0, n, MSG.size):
                        event, _, _, _, _, address, _ = MSG.unpack_from(msgs, k)
                        if event == UFFD_EVENT_PAGEFAULT:
                            self.on_fault(address)
                elif fd == self.chan.fileno():
                    try:
                        recv_exact(self.chan, REQUEST.size, head)
                        bi, index = REQUEST.unpack(head)
                        recv_exact(self.chan, PAGE, buf)
                    except (OSError, EOFError) as err:
                        return f"the fault channel broke ({err})"
                    self.on_page(bi, index, buf)
        return "done"

    def _read_ctrl(self) -> str | None:
        """Every message the VMM has sent: more remote pages, the end of the bulk;
        the reason to stop, if one says so."""
        while select.select([self.ctrl], [], [], 0)[0]:
            try:
                msg, _ = recv_frame(self.ctrl)
            except (OSError, EOFError):
                return "the VMM went away"
            if msg.get("op") == "more":
                self.add_remote(msg["remote"])
            elif msg.get("op") == "bulk-done":
                self.bulk_over = True
                self.bulk_done()
            else:
                return msg.get("why", "lost")
        return None

    def stats(self) -> dict:
        lat = sorted(self.latencies)
        pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6) if lat else (
            lambda q: 0.0)
        return {"remote_faults": len(lat), "zero_faults": self.zero_faults,
                "p50_us": pick(0.5), "p95_us": pick(0.95)}


# --- the destination's VMM ----------------------------------------------------------------
class PagerProcess:
    """The VMM's handle on its pager: started before the migration arrives (the
    interpreter's start is not in the downtime), told to go on when the source says it
    may switch to post-copy (the shape record), dismissed otherwise."""

    def __init__(self, listener: socket.socket, tls=None, token: bytes | None = None):
        import subprocess
        self.token = token if token is not None else os.urandom(16)
        ours, theirs = socket.socketpair()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "migrate.postcopy", str(theirs.fileno()),
                 str(listener.fileno())], pass_fds=(theirs.fileno(), listener.fileno()),
                stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        self.ctrl = ours
        self.uffd = -1
        self.channel = False
        send_frame(ours, {"token": self.token.hex(),
                          "tls": [tls.cert, tls.key, tls.ca] if tls is not None else None})

    def go(self) -> None:
        """The main connection is taken: the pager may accept the fault channel."""
        send_frame(self.ctrl, {"op": "go"})

    def _expect(self, op: str, timeout: float) -> dict:
        self.ctrl.settimeout(timeout)
        try:
            msg, _ = recv_frame(self.ctrl)
        except (OSError, EOFError) as err:
            raise PostcopyError(f"the post-copy pager did not answer ({err or 'closed'})") \
                from None
        if msg.get("op") != op:
            raise PostcopyError(f"post-copy: {msg.get('why') or msg}")
        return msg

    def arm(self, regions, remote: list) -> None:
        """Drop the stale copies of the remote pages (``remote``: a bool array per block
        of ``regions``); the first time, register all of guest memory with a userfaultfd
        and hand it to the pager, then tell it of the pages. Called with the pages the
        source dirtied before its pause (the guest still running there) and again with
        those after. The pager reads every message sent to it before it serves a fault
        (each is in its socket before the guest can run), so nobody waits for an answer.
        PostcopyError if anything fails (the guest has not run here yet)."""
        import mmap

        import numpy as np

        from migrate.pageio import runs_of
        for r, bits in zip(regions, remote):
            for a, b in runs_of(np.flatnonzero(bits)).tolist():
                r.map.madvise(mmap.MADV_DONTNEED, a * PAGE, (b - a) * PAGE)
        lists = [zlib.compress(np.packbits(bits, bitorder="little").tobytes(), 1).hex()
                 for bits in remote]
        if self.uffd < 0:
            if not self.channel:
                self._expect("channel", LOST_AFTER)
                self.channel = True
            self.uffd = open_uffd([(r.host_addr, r.size) for r in regions])
            send_frame(self.ctrl, {"op": "arm", "remote": lists,
                                   "regions": [[r.host_addr, r.npages] for r in regions]},
                       [self.uffd])
        else:
            send_frame(self.ctrl, {"op": "more", "remote": lists})

    def dismiss(self) -> None:
        """Pre-copy completed (or failed): the pager is not needed."""
        self.ctrl.close()
        self.proc.kill()
        self.proc.wait()
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1


class Receiver:
    """After the acknowledgement: the pages the source pushes on the main connection are
    installed here (a thread), and once every remote page is in (the pager says so) the
    userfaultfd is closed, guest memory is ordinary memory again, and the source is told.
    ``on_lost(why)`` is called if the source goes away first: the guest is lost."""

    def __init__(self, pager: PagerProcess, conn, regions, on_lost=None, on_done=None):
        self.pager, self.conn, self.regions = pager, conn, regions
        self.on_lost, self.on_done = on_lost, on_done
        self.stats: dict = {}
        self.pushed = 0
        self.done = threading.Event()
        self._go = threading.Event()
        self._cancelled = False
        # Started now (while the source still pauses), so that a thread start is not in
        # the downtime; it reads nothing before go().
        self.thread = threading.Thread(target=self._run, name="post-copy", daemon=True)
        self.thread.start()

    def go(self) -> None:
        """Take what the source pushes (Machine.start calls it, once the vCPUs run)."""
        self._go.set()

    def cancel(self) -> None:
        self._cancelled = True
        self._go.set()
        self.thread.join()

    def _run(self) -> None:
        self._go.wait()
        if self._cancelled:
            return
        background()
        from migrate.formats.stream import KIND_END, KIND_PAGE_RUN, RECORD
        buf = (ctypes.c_char * (RUN_PAGES * PAGE))()
        head = bytearray(RECORD.size + 8)
        why = None
        try:
            self.conn.settimeout(LOST_AFTER)
            while True:
                recv_exact(self.conn, RECORD.size, memoryview(head)[:RECORD.size])
                kind, bi, index = RECORD.unpack_from(head)
                if kind == KIND_END:
                    break
                if kind == KIND_PAGE_RUN:
                    recv_exact(self.conn, 8, memoryview(head)[RECORD.size:])
                    (count,) = struct.unpack_from("<Q", head, RECORD.size)
                if kind != KIND_PAGE_RUN or bi >= len(self.regions) or not \
                        0 < count <= RUN_PAGES or count > self.regions[bi].npages - index:
                    why = f"the source sent a bad post-copy record ({kind}, {bi}, {index})"
                    break
                recv_exact(self.conn, count * PAGE, memoryview(buf)[:count * PAGE])
                copy_run(self.pager.uffd, self.regions[bi].host_addr + index * PAGE,
                         ctypes.addressof(buf), count)
                self.pushed += count
        except (OSError, EOFError) as err:
            why = f"the source went away ({getattr(err, 'strerror', None) or err or 'closed'})"
        if why is None:
            try:
                send_frame(self.pager.ctrl, {"op": "bulk-done"})
                self.pager.ctrl.settimeout(None)
                msg, _ = recv_frame(self.pager.ctrl)
            except (OSError, EOFError) as err:
                msg = {"op": "lost", "why": f"the post-copy pager failed ({err or 'closed'})"}
            self.stats = {k: v for k, v in msg.items() if k not in ("op", "why")}
            if msg.get("op") != "done":
                why = msg.get("why", "lost")
        if why is not None:
            self.on_lost(why)
            return
        self.pager.proc.wait()
        os.close(self.pager.uffd)          # guest memory is ordinary memory again
        self.pager.uffd = -1
        self.pager.ctrl.close()
        try:
            self.conn.sendall(b"KVMGFIN\n")
        except OSError:
            pass
        self.conn.close()
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)


def background() -> None:
    """This thread yields the CPU to the vCPUs and to the faults being served (nice 10):
    the bulk of post-copy must not delay a page a vCPU waits for."""
    _nice(10)


def foreground() -> None:
    """This thread serves faults: ahead of the others where this user may say so (nice
    -5 needs root or CAP_SYS_NICE; elsewhere it stays as it is)."""
    _nice(-5)


def _nice(value: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)
    except OSError:
        pass


# --- the source ---------------------------------------------------------------------------
class Pusher:
    """The source's half of post-copy (its guest paused for good): every request on the
    fault channel answered (from before the acknowledgement on, so that the guest's first
    fault finds it ready), and every remote page pushed on the main connection in order,
    the push restarting just after each page the destination asked for."""

    def __init__(self, regions, main, fault):
        import numpy as np
        self.regions, self.main, self.fault = regions, main, fault
        self.keys = np.zeros(0, np.int64)        # the remote pages, (block << 40) + index
        self.sent = np.zeros(0, dtype=np.bool_)
        self.early: list[int] = []               # answered before the keys were known
        self.cursor = 0
        self.lock = threading.Lock()
        self.answered = 0
        self.served = threading.Condition()       # answered grew, or the channel closed
        self.closed = False

    def set_remote(self, remote: dict) -> None:
        """The pages to push (slot -> sorted page indices), once the source is paused."""
        import numpy as np
        keys = [np.asarray(remote.get(r.slot, []), dtype=np.int64) + (bi << 40)
                for bi, r in enumerate(self.regions)]
        with self.lock:
            self.keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
            self.sent = np.zeros(len(self.keys), dtype=np.bool_)
            for key in self.early:
                self._mark(key)

    def _mark(self, key: int) -> None:
        import numpy as np
        pos = int(np.searchsorted(self.keys, key))
        if pos < len(self.keys) and self.keys[pos] == key:
            self.sent[pos] = True
            self.cursor = pos + 1

    def _page(self, bi: int, index: int):
        return self.regions[bi].array[index * PAGE:(index + 1) * PAGE]

    def serve_faults(self) -> None:
        """The fault channel's thread: a page for every request, until it closes."""
        head = bytearray(REQUEST.size)
        foreground()
        try:
            self.fault.settimeout(None)
            while True:
                recv_exact(self.fault, REQUEST.size, head)
                bi, index = REQUEST.unpack(head)
                if bi >= len(self.regions) or index >= self.regions[bi].npages:
                    return         # nonsense: no more answers (the destination gives up)
                self.fault.sendall(REQUEST.pack(bi, index) + self._page(bi, index).tobytes())
                with self.served:
                    self.answered += 1
                    self.served.notify_all()
                with self.lock:
                    self.early.append((bi << 40) + index)
                    self._mark((bi << 40) + index)
        except (OSError, EOFError):
            return
        finally:
            with self.served:
                self.closed = True
                self.served.notify_all()

    def _next(self, batch: int):
        """Up to ``batch`` unsent pages from the cursor on (then from the start); marked
        sent. Called with the lock held."""
        import numpy as np
        n = len(self.keys)
        for start, end in ((self.cursor, n), (0, self.cursor)):
            pos = start
            while pos < end:
                window = min(end, pos + 16 * batch)
                left = np.flatnonzero(~self.sent[pos:window])
                if len(left):
                    take = left[:batch] + pos
                    self.sent[take] = True
                    self.cursor = int(take[-1]) + 1
                    return take
                pos = window
        return None

    def push(self, batch: int = 256) -> int:
        """Every remote page not yet answered, on the main connection; then the end
        record. Returns the pages pushed."""
        from migrate.formats.stream import KIND_END, KIND_PAGE_RUN, RECORD
        from migrate.pageio import runs_of
        hold = int(os.environ.get(PUSH_AFTER_ENV, "0") or 0)
        with self.served:
            self.served.wait_for(lambda: self.answered >= hold or self.closed)
        pushed = 0
        while True:
            with self.lock:
                take = self._next(batch)
            if take is None:
                break
            bufs = []
            keys = self.keys[take]
            for a, b in runs_of(keys).tolist():        # consecutive pages of one block
                bi, first = a >> 40, a & ((1 << 40) - 1)
                for c in range(first, first + b - a, RUN_PAGES):
                    n = min(RUN_PAGES, first + b - a - c)
                    r = self.regions[bi]
                    bufs += [RECORD.pack(KIND_PAGE_RUN, bi, c), struct.pack("<Q", n),
                             r.array[c * PAGE:(c + n) * PAGE]]
            sendall(self.main, bufs)
            pushed += len(take)
        sendall(self.main, [RECORD.pack(KIND_END, 0, 0)])
        return pushed


def pager_main(argv: list[str]) -> int:
    foreground()
    ctrl = socket.socket(fileno=int(argv[0]))
    listener = socket.socket(fileno=int(argv[1]))
    try:
        start, _ = recv_frame(ctrl)
        tls = None
        if start.get("tls"):
            tls = Tls(*start["tls"])
        pager = Pager(ctrl, listener, bytes.fromhex(start["token"]), tls)
        go, _ = recv_frame(ctrl)           # the VMM has taken the main connection
        if go.get("op") != "go":
            return 0
        try:
            pager.accept_fault_channel()
        except (OSError, PostcopyError) as err:
            send_frame(ctrl, {"op": "failed", "why": f"{err}"})
            return 1
        listener.close()
        send_frame(ctrl, {"op": "channel"})
        plan, fds = recv_frame(ctrl, want_fds=1)
        if plan.get("op") != "arm" or len(fds) != 1:
            return 0                          # pre-copy completed: not needed
        pager.arm(plan, fds[0])
        outcome = pager.run()
        send_frame(ctrl, {"op": "done" if outcome == "done" else "lost", "why": outcome,
                          **pager.stats()})
        if outcome != "done":
            # The VMM holds the userfaultfd open: a vCPU waiting on a page stays waiting
            # (never mapped as zeros) until the VMM ends the guest.
            return 3
        return 0
    except (EOFError, OSError):
        return 2


if __name__ == "__main__":
    sys.exit(pager_main(sys.argv[1:]))
