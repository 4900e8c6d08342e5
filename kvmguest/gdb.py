"""A GDB remote stub for a running (or restored) machine: all-stop, each vCPU a thread.

    kvmguest run guests/build/debug.elf --gdb 1234      # waits for gdb
    gdb guests/build/debug.elf -ex 'target remote :1234'

What a stop is: every vCPU parked (``Machine.pause_all``), the stub holding that pause
until gdb resumes. Breakpoints and watchpoints, by packet:

- ``Z0`` software: an ``int3`` written into guest RAM while the guest runs, and lifted
  out whenever the vCPUs are parked (``VcpuSet.on_parked``), so a save, a checkpoint or a
  gdb memory read never sees it. A hit arrives as KVM's debug exit (#BP, with
  ``KVM_GUESTDBG_USE_SW_BP``) or, where KVM cannot emulate ``int3`` in kernel code
  (kvm_pvm), as an emulation failure at it; an ``int3`` that is not ours goes to the
  guest as #BP.
- ``Z1`` hardware: DR0-3 through ``KVM_SET_GUEST_DEBUG``.
- ``Z2`` write watchpoints: the watched pages are made read-only to the guest (their
  memory slot split around them, arch.x86.platform); a guest write to them comes back as
  an MMIO exit, which the stub carries out and, when it touched the watched bytes,
  reports. Exact on every host and at every CPL.
- ``Z3``/``Z4`` read and access watchpoints: debug registers, where the host fires them
  (not kvm_pvm: refused there, with the reason).

A single step (``vCont;s``) runs one vCPU alone (``VcpuSet.run_one``) with
SINGLESTEP|BLOCKIRQ, so it never lands in an interrupt handler. Memory is read and
written by guest-virtual address through the selected vCPU's page tables, or physical
after ``monitor phys on``. ``monitor snapshot PATH`` saves the stopped guest; with
continuous checkpoints, ``reverse-continue``/``reverse-stepi`` go back to the newest
checkpoint (the start of the recorded history: nothing is replayed in between).
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import shlex
import socket
import struct
import threading
import time
from collections import deque

from . import abi, gdbwire
from .abi import GuestDebug
from .gdbwire import hexnum
from .arch.x86 import gdbregs, linux, regs
from .arch.x86.platform import MAX_PROTECTED_PAGES
from .errors import KvmguestError, UsageError
from .exits import DebugExit, InternalErrorExit, MmioExit
from .loglimit import LogLimit

log = logging.getLogger(__name__)

PAGE = abi.PAGE_SIZE
KILL_GRACE = 5.0                # after a kill: how long gdb may take to hang up
END_GRACE = 1.0                 # end(): how long a waiting gdb has to take its answer
STEP_TIMEOUT = 1.0              # a step that has not completed by then is reported anyway
SIGINT, SIGTRAP, SIGKILL, SIGSEGV = 2, 5, 9, 11
DR6_BS = 1 << 14                # single step
DR7_GE = 1 << 9
DR7_RW_ACCESS = 3               # break on data reads or writes
MAX_PACKET = gdbwire.PACKET_SIZE
MAX_READ = (MAX_PACKET - 8) // 2      # bytes of memory one hex reply holds
SEND_TIMEOUT = 10.0             # a gdb that takes no reply for this long is dropped
EXPEDITED = ("rbp", "rsp", "rip")   # sent with every stop reply
LOOPBACK = ("localhost", "127.0.0.1", "::1", "ip6-localhost")
MONITOR_HELP = """kvmguest monitor commands:
  snapshot PATH    save the stopped guest (kvmguest restore PATH --gdb ... carries on);
                   PATH runs to the end of the line, or is one quoted word
  phys on|off      memory packets address guest-physical (on) or -virtual memory (off)
  checkpoints      the checkpoint reverse execution goes back to
  goto N           go to checkpoint generation N (the newest is the only one kept)
  help             this text
"""


class GdbError(KvmguestError):
    """The gdb socket could not be set up."""


def monitor_path(command: str) -> str:
    """The path a monitor command names: everything after the verb (spaces and all), or
    one shell-quoted word ('my dir/a.snap')."""
    rest = command.strip().split(None, 1)[1].strip()
    if rest[:1] in ("'", '"'):
        words = shlex.split(rest)
        if len(words) != 1:
            raise ValueError("quote the whole path, and only the path")
        return words[0]
    return rest


def parse_address(spec: str):
    """``[HOST:]PORT`` (HOST a loopback name) -> ("tcp", host, port); anything with a
    slash, or not a port, -> ("unix", path)."""
    host, _, port = spec.rpartition(":")
    if port.isdigit() and "/" not in spec:
        n = int(port)
        if not 0 <= n < 65536:
            raise UsageError(f"--gdb port {n} is out of range (0-65535; 0: any free port)")
        host = host.strip("[]") or "127.0.0.1"
        if host not in LOOPBACK:
            raise UsageError(f"--gdb listens on this machine only (localhost, 127.0.0.1 or "
                             f"::1), not {host!r}: the stub gives full control of the guest")
        return "tcp", host, n
    return "unix", spec


def listen(spec: str) -> tuple[socket.socket, str, str | None]:
    """The listening socket for ``spec``, how to reach it (as gdb's ``target remote``
    takes it) and its path when it is a Unix socket. A Unix socket is private to this user (mode 0600; the control socket's
    rules: a stale one is replaced, one in use is not)."""
    kind, *where = parse_address(spec)
    if kind == "unix":
        from migrate.control import bind_private_socket
        sock, path = bind_private_socket(where[0], "gdb socket")
        return sock, path, path
    host, port = where
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise GdbError(f"cannot listen for gdb on {host}:{port}: {err.strerror}") from None
    sock.listen(1)
    return sock, f"{host}:{sock.getsockname()[1]}", None


# --- the connection ------------------------------------------------------------------
def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of an accepted connection: the
    kernel's word for a Unix socket (SO_PEERCRED); for loopback TCP, the owner of the
    peer's socket in /proc/net/tcp (or tcp6). None when it cannot be told."""
    if sock.family == socket.AF_UNIX:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", cred)[1]
    try:
        peer, local = sock.getpeername(), sock.getsockname()
    except OSError:
        return None
    table = "/proc/net/tcp6" if sock.family == socket.AF_INET6 else "/proc/net/tcp"
    want = (_proc_address(sock.family, peer), _proc_address(sock.family, local))
    try:
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if (fields[1].upper(), fields[2].upper()) == want:
                    return int(fields[7])
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return None


def _proc_address(family: int, address) -> str:
    """``(host, port)`` as /proc/net/tcp writes it: the address's 32-bit words each in
    host byte order, in hex, then the port."""
    raw = socket.inet_pton(family, address[0])
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{w:08X}" for w in words) + f":{address[1]:04X}"


class Connection:
    """One gdb client: packets in and out, acks until gdb turns them off. A client that
    sends a packet longer than PacketSize, or takes no reply for SEND_TIMEOUT seconds, is
    dropped (``why`` says which)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.acks = sock, True
        self.decoder, self.events = gdbwire.Decoder(), deque()
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(SEND_TIMEOUT)      # bounds sends; reads wait in select first
        self._last = b""
        self.why: str | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return self.why is None        # an idle gdb: wait on
        except OSError:
            data = b""
        if not data:
            return False
        try:
            self.events.extend(self.decoder.feed(data))
        except gdbwire.PacketTooLong as err:
            self.drop(f"gdb sent {err}")
            return False
        return True

    def read(self, block: bool = True):
        """The next packet's payload (bytes), "interrupt" for Ctrl-C, None when gdb has
        gone (or was dropped); with ``block`` False, "" when nothing complete has
        arrived yet."""
        while True:
            while self.events:
                ev = self.events.popleft()
                if ev == gdbwire.INTERRUPT:
                    return "interrupt"
                if ev == gdbwire.RESEND:
                    if self._last:
                        self._sendall(self._last)
                    continue
                if self.acks:
                    self._sendall(b"+" if ev.good else b"-")
                if ev.good:
                    return ev.payload
            if self.why is not None:
                return None
            if not block and not select.select([self.sock], [], [], 0)[0]:
                return ""
            if not self._fill():
                return None

    def send(self, payload: bytes | str) -> None:
        if isinstance(payload, str):
            payload = payload.encode()
        packet = gdbwire.frame(payload)
        self._last = packet if self.acks else b""
        self._sendall(packet)

    def _sendall(self, data: bytes) -> None:
        if self.why is not None:
            return
        try:
            self.sock.sendall(data)
        except TimeoutError:
            self.drop(f"gdb took no reply for {SEND_TIMEOUT:g} s")
        except OSError:
            pass            # gdb has gone; what it sent last still counts (k)

    def console(self, text: str) -> None:
        """Text for gdb's console (an 'O' packet: while the target runs, or in a monitor
        command's answer)."""
        self.send(b"O" + text.encode().hex().encode())

    def drop(self, why: str) -> None:
        """End the connection from any thread: a read waiting on it returns None."""
        if self.why is None:
            self.why = why
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --- breakpoints and watchpoints ------------------------------------------------------
class SoftBreakpoints:
    """int3 bytes, in guest RAM only while the vCPUs run (see the module docstring)."""

    def __init__(self, memory):
        self.memory = memory
        self.at: dict[int, int] = {}          # linear address -> guest-physical
        self.saved: dict[int, bytes] = {}     # guest-physical -> original byte, inserted
        self.lock = threading.Lock()

    def insert(self) -> None:
        with self.lock:
            for gpa in set(self.at.values()) - set(self.saved):
                self.saved[gpa] = self.memory.read(gpa, 1)
                self.memory.write(gpa, b"\xcc")

    def lift(self) -> None:
        with self.lock:
            for gpa, byte in self.saved.items():
                self.memory.write(gpa, byte)
            self.saved.clear()

    def inserted_at(self, linear: int) -> bool:
        with self.lock:
            return self.at.get(linear) in self.saved


class Stop:
    """Why the guest stopped: the signal, the vCPU, and what gdb is told of the reason."""

    def __init__(self, thread: int, signal: int = SIGTRAP, reason: str = ""):
        self.thread, self.signal, self.reason = thread, signal, reason

    def reply(self) -> str:
        return f"T{self.signal:02x}thread:{self.thread + 1:x};{self.reason}"


class GdbStub:
    """Serves gdb for ``machine``. ``wait``: the machine was started paused (``start(
    paused=True)``) and the stub holds that pause until gdb resumes the guest.
    ``note`` tells the user one line (stderr, through the CLI); the guest's
    Checkpointer, for reverse execution, comes with :meth:`attach_checkpoints`."""

    def __init__(self, machine, spec: str, wait: bool = True, note=lambda text: None):
        self.m, self.note = machine, note
        self.checkpoints = None               # attach_checkpoints()
        self.sock, self.where, self.unix_path = listen(spec)
        self.holding = wait                   # the stub holds a pause: the guest is stopped
        self.conn: Connection | None = None
        self.stop = Stop(0)
        self.current = 0                      # Hg: the vCPU registers and memory refer to
        self.phys = False
        self.soft = SoftBreakpoints(machine.memory)
        self.hard: dict[int, int] = {}        # linear address -> DR index (execution)
        self.data: dict[tuple[int, int], int] = {}   # access watchpoints: (addr, len) -> DR
        self.watches: dict[tuple[int, int], list[tuple[int, int]]] = {}  # -> gpa pieces
        self.events: deque[Stop] = deque()
        self._events_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._closed = threading.Event()
        self._said: set[str] = set()
        self._turned_away = LogLimit(first=3, say=note)    # refused connections
        self._to_console: list[str] = []
        self.ended_reported = False
        self._ending: str | None = None         # end(): why the run ends whatever gdb does
        self.detached = threading.Event()       # no gdb client (set), or the last one left
        self.detached.set()
        self._handlers = self._dispatch()
        machine.debugger = self
        machine.vcpus.on_parked.append(self.soft.lift)
        machine.vcpus.on_release.append(self.soft.insert)
        self._thread = threading.Thread(target=self._serve, name="gdb", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def attach_checkpoints(self, checkpoints) -> None:
        """The guest's Checkpointer: reverse execution goes back to its newest checkpoint;
        it takes none while gdb holds the guest stopped."""
        self.checkpoints = checkpoints
        if self.holding:
            checkpoints.held.set()

    # --- called from vCPU threads ----------------------------------------------------
    def on_exit(self, thread, ex) -> bool:
        """A vCPU exit the debugger may own; True when it did (the vCPU parks)."""
        if isinstance(ex, DebugExit):
            stop = self._debug_stop(thread, ex)
            if stop is None:
                return True
        elif isinstance(ex, InternalErrorExit) and ex.insn[:1] == b"\xcc":
            if not self.soft.inserted_at(self._linear_pc(thread.vcpu)):
                return False                  # the guest's own int3: the completer's
            stop = Stop(thread.index, SIGTRAP, "swbreak:;")
        elif isinstance(ex, MmioExit) and ex.is_write and self.m.platform.protected:
            stop = self._watched_write(thread, ex)
            if stop is False:
                return False
        else:
            return False
        if stop is not None:
            thread.park_after_exit()
            with self._events_lock:
                self.events.append(stop)
            os.write(self._wake_w, b"!")
        return True

    def _debug_stop(self, thread, ex: DebugExit) -> Stop | None:
        if ex.exception == 3:
            if self.soft.inserted_at(ex.pc):
                return Stop(thread.index, SIGTRAP, "swbreak:;")
            from .complete import Completer
            Completer.deliver_bp(thread.vcpu)   # the guest's own int3
            return None
        hit = [i for i in range(4) if ex.dr6 & (1 << i)]
        for (addr, _), dr in self.data.items():
            if dr in hit:
                return Stop(thread.index, SIGTRAP, f"awatch:{addr:x};")
        if hit:
            return Stop(thread.index, SIGTRAP, "hwbreak:;")
        return Stop(thread.index, SIGTRAP)

    def _watched_write(self, thread, ex: MmioExit):
        """A guest write to a read-only (watched) page: carry it out; a Stop when it
        touched watched bytes, None when not, False when the page is not watched."""
        if not self.m.platform.is_protected(ex.gpa):
            return False
        data = ctypes.string_at(ex.data_addr, ex.length)
        self.m.memory.write(ex.gpa, data)
        for (addr, _), pieces in self.watches.items():
            if any(g < ex.gpa + ex.length and ex.gpa < g + n for g, n in pieces):
                return Stop(thread.index, SIGTRAP, f"watch:{addr:x};")
        return None

    @staticmethod
    def _linear_pc(vcpu) -> int:
        r, s = vcpu.get_regs(), vcpu.get_sregs()
        return r.rip if s.efer & regs.EFER_LMA else (s.cs.base + r.rip) & 0xFFFFFFFF

    # --- the server --------------------------------------------------------------------
    def _serve(self) -> None:
        """Accept gdb clients, one at a time: another one meanwhile is turned away, and so
        is any connection from another user (the stub reads and writes the guest and
        writes files as this user)."""
        while not self._closed.is_set():
            try:
                r, _, _ = select.select([self.sock], [], [], 0.2)
                if not r:
                    continue
                client, _ = self.sock.accept()
            except OSError:
                return
            uid = peer_uid(client)
            if uid != os.geteuid():
                client.close()
                self._turned_away(logging.WARNING, "gdb: refused a connection from %s: only "
                                  "this user (uid %d) may drive the stub",
                                  "a peer whose user cannot be told" if uid is None
                                  else f"uid {uid}", os.geteuid())
                continue
            if not self.detached.is_set():
                client.close()
                self._turned_away(logging.WARNING, "gdb: another gdb tried to attach; one "
                                  "at a time (turned away)")
                continue
            self.conn = Connection(client)
            self.detached.clear()
            threading.Thread(target=self._client, name="gdb-client", daemon=True).start()

    def _client(self) -> None:
        try:
            self._session()
        except Exception as err:      # noqa: BLE001 - a stub bug must not kill the guest
            log.error("gdb stub: %s; gdb is disconnected, the guest runs on", err,
                      exc_info=log.isEnabledFor(logging.DEBUG))
        finally:
            if self.conn.why is not None and not self._closed.is_set():
                self.note(f"gdb: {self.conn.why}: disconnected")
            self._detach()
            self.conn.close()
            self.conn = None
            self.detached.set()

    def _session(self) -> None:
        if not self.holding and not self.m.vcpus.done.is_set():
            self._halt()
            self.stop = Stop(self.current, SIGINT)
        while True:
            pkt = self.conn.read()
            if pkt is None:
                return
            if pkt == "interrupt":
                continue                       # already stopped
            answer = self._packet(pkt)
            if answer is _GONE:
                return
            if answer is not None:
                self.conn.send(answer)
            if self._ending:
                return

    def _halt(self) -> None:
        """Stop the guest (all vCPUs parked) and hold it so."""
        if not self.holding and not self.m.vcpus.done.is_set():
            self.m.pause_all()
            self.holding = True
            if self.checkpoints is not None:
                self.checkpoints.held.set()

    def _release(self) -> None:
        if self.holding:
            self.holding = False
            if self.checkpoints is not None:
                self.checkpoints.held.clear()
            self.m.resume_all()

    def _detach(self) -> None:
        """gdb left: no breakpoint or watchpoint stays, KVM debugging is off, the guest
        runs on."""
        self.soft.at.clear()
        self.hard.clear()
        self.data.clear()
        try:
            if self.watches:
                self._halt()       # no vCPU is between a watched write's exit and its handler
                self.watches.clear()
                self._protect()
            if not self.m.vcpus.done.is_set():
                for t in self.m.vcpus:
                    t.vcpu.set_guest_debug(0)
        except KvmguestError as err:
            log.error("gdb stub: after gdb left: %s", err)
        finally:
            self._release()

    # --- packets -----------------------------------------------------------------------
    def _packet(self, pkt: bytes):
        """The answer to one packet (None: none is sent; _GONE: the session ends)."""
        text = pkt.decode("latin-1")
        handler = self._handlers.get(text[:1])
        try:
            return handler(text[1:], pkt[1:]) if handler else ""
        except (ValueError, IndexError, KeyError):
            return "E01"        # a malformed packet (bad number, escape, field count)
        except KvmguestError as err:
            log.warning("gdb: %s", err)
            return "E02"

    def _dispatch(self) -> dict:
        """Packet handlers by first letter: f(the rest as text, the rest as bytes)."""
        return {
            "q": lambda t, _: self._query("q" + t), "Q": lambda t, _: self._query("Q" + t),
            "v": lambda t, _: self._v("v" + t),
            "?": lambda t, _: self.stop.reply() if not self.m.vcpus.done.is_set()
            else self._ended(),
            "g": lambda t, _: self._read_registers(),
            "G": lambda t, _: self._write_registers(t),
            "p": lambda t, _: self._read_register(hexnum(t)),
            "P": lambda t, _: self._write_register(t),
            "m": lambda t, _: self._read_memory(t),
            "M": lambda t, _: self._write_memory_hex(t),
            "X": lambda _, raw: self._write_memory_binary(raw),
            "H": lambda t, _: self._select_thread(t),
            "T": lambda t, _: "OK" if self._thread_of(t) is not None else "E01",
            "Z": lambda t, _: self._breakpoint(t, True),
            "z": lambda t, _: self._breakpoint(t, False),
            "c": lambda t, _: self._resume(None),
            "s": lambda t, _: self._resume(self.current),
            "D": lambda t, _: self._detach_packet(),
            "k": lambda t, _: self._kill(),
            "b": lambda t, _: self._reverse(),
        }

    def _query(self, text: str):
        name, _, arg = text.partition(":")
        if name == "qSupported":
            features = ["PacketSize=%x" % MAX_PACKET, "qXfer:features:read+",
                        "QStartNoAckMode+", "swbreak+", "hwbreak+", "vContSupported+"]
            if self.checkpoints is not None:
                features += ["ReverseContinue+", "ReverseStep+"]
            return ";".join(features)
        if name == "QStartNoAckMode":
            self.conn.send("OK")
            self.conn.acks = False
            return None
        if name == "qXfer" and arg.startswith("features:read:target.xml:"):
            off, length = (hexnum(x) for x in arg.rsplit(":", 1)[1].split(","))
            xml = gdbregs.target_xml()
            chunk = xml[off:off + min(length, MAX_READ)]       # escaped, at most twice as long
            last = off + len(chunk) >= len(xml)
            return (b"l" if last else b"m") + gdbwire.escape(chunk)
        if text == "qfThreadInfo":
            return "m" + ",".join(f"{t.index + 1:x}" for t in self.m.vcpus)
        if text == "qsThreadInfo":
            return "l"
        if text == "qC":
            return f"QC{self.current + 1:x}"
        if text == "qAttached":
            return "1"
        if name.startswith("qThreadExtraInfo"):
            t = self._thread_of(text.split(",", 1)[1])
            return self._describe_vcpu(t).encode().hex() if t is not None else "E01"
        if text.startswith("qRcmd,"):
            return self._monitor(bytes.fromhex(text.split(",", 1)[1]).decode())
        if text == "qSymbol::":
            return "OK"
        return ""

    def _v(self, text: str):
        if text == "vCont?":
            return "vCont;c;C;s;S"
        if text.startswith("vCont;"):
            step = None
            for action in text[6:].split(";"):
                verb, _, tid = action.partition(":")
                if verb[:1] in ("s", "S"):
                    t = self._thread_of(tid) if tid else self.m.vcpus[self.current]
                    step = t.index if t is not None else self.current
            return self._resume(step)
        if text.startswith("vKill"):
            return self._kill(vkill=True)
        if text == "vMustReplyEmpty":
            return ""
        return ""

    # --- threads and registers --------------------------------------------------------
    def _thread_of(self, tid: str):
        """The VcpuThread for a gdb thread id (1-based; -1 and 0: any), or None."""
        tid = tid.split(".")[-1] if tid.startswith("p") else tid
        n = hexnum(tid) if tid not in ("-1", "") else 0
        if n <= 0:
            return self.m.vcpus[self.current]
        return self.m.vcpus[n - 1] if n <= len(self.m.vcpus) else None

    def _select_thread(self, arg: str) -> str:
        t = self._thread_of(arg[1:])
        if t is None:
            return "E01"
        if arg[:1] == "g":
            self.current = t.index
        return "OK"

    def _describe_vcpu(self, t) -> str:
        try:
            s = t.vcpu.get_sregs()
            mp = t.vcpu.get_mp_state().mp_state
        except KvmguestError:
            return f"vCPU {t.index}"
        mode = ("long mode" if s.efer & regs.EFER_LMA else
                "protected mode" if s.cr0 & regs.X86_CR0_PE else "real mode")
        state = {abi.KVM_MP_STATE_UNINITIALIZED: ", waiting for INIT/SIPI",
                 abi.KVM_MP_STATE_HALTED: ", halted"}.get(mp, "")
        return f"vCPU {t.index}, {mode}, CPL{s.cs.selector & 3}{state}"

    def _state(self):
        v = self.m.vcpus[self.current].vcpu
        return v, v.get_regs(), v.get_sregs(), v.get_fpu()

    def _read_registers(self) -> str:
        _, r, s, f = self._state()
        return b"".join(gdbregs.values(r, s, f)).hex()

    def _read_register(self, n: int) -> str:
        if n >= len(gdbregs.REGISTERS):
            return "E01"
        _, r, s, f = self._state()
        return gdbregs.values(r, s, f)[n].hex()

    def _write_register(self, arg: str) -> str:
        n, _, value = arg.partition("=")
        n = hexnum(n)
        if n >= len(gdbregs.REGISTERS):
            return "E01"
        return self._apply_registers({n: bytes.fromhex(value)})

    def _write_registers(self, data: str) -> str:
        raw = bytes.fromhex(data)
        _, r, s, f = self._state()
        now = gdbregs.values(r, s, f)
        changed = {}
        for i, off in enumerate(gdbregs.OFFSETS):
            new = raw[off:off + len(now[i])]
            if len(new) == len(now[i]) and new != now[i]:
                changed[i] = new
        return self._apply_registers(changed)

    def _apply_registers(self, changed: dict) -> str:
        v, r, s, f = self._state()
        touched = {gdbregs.write(n, raw, r, s, f) for n, raw in changed.items()}
        if "regs" in touched:
            v.set_regs(r)
        if "sregs" in touched:
            v.set_sregs(s)
        if "fpu" in touched:
            v.set_fpu(f)
        return "OK"

    # --- memory ---------------------------------------------------------------------------
    def _pieces(self, addr: int, length: int):
        """(guest-physical, length) runs for ``length`` bytes at ``addr``, stopping at the
        first byte that is not mapped or not RAM."""
        sregs = None if self.phys else self.m.vcpus[self.current].vcpu.get_sregs()
        out = []
        while length > 0:
            n = min(length, PAGE - (addr & (PAGE - 1)))
            gpa = addr if sregs is None else regs.translate(self.m.memory, addr, sregs)
            if gpa is None or not self.m.memory.is_ram(gpa, n):
                break
            out.append((gpa, n))
            addr, length = addr + n, length - n
        return out

    def _read_memory(self, arg: str) -> str:
        """``m``: at most what fits one reply (gdb splits its reads by PacketSize and takes
        a shorter answer as the part that could be read)."""
        addr, length = (hexnum(x) for x in arg.split(","))
        length = min(length, MAX_READ)
        data = b"".join(self.m.memory.read(g, n) for g, n in self._pieces(addr, length))
        return data.hex() if data or not length else "E14"

    def _write_memory(self, addr: int, data: bytes) -> str:
        pieces = self._pieces(addr, len(data))
        if sum(n for _, n in pieces) != len(data):
            return "E14"
        for gpa, n in pieces:
            self.m.memory.write(gpa, data[:n])
            data = data[n:]
        return "OK"

    def _write_memory_hex(self, arg: str) -> str:
        where, _, hexdata = arg.partition(":")
        addr, length = (hexnum(x) for x in where.split(","))
        data = bytes.fromhex(hexdata)
        return self._write_memory(addr, data) if len(data) == length else "E01"

    def _write_memory_binary(self, arg: bytes) -> str:
        where, _, data = arg.partition(b":")
        addr, length = (hexnum(x) for x in where.split(b","))
        data = gdbwire.unescape(data)
        return self._write_memory(addr, data) if len(data) == length else "E01"

    # --- breakpoints ---------------------------------------------------------------------
    def _breakpoint(self, arg: str, insert: bool) -> str:
        kind, addr, size = arg.split(",")[:3]
        addr, size = hexnum(addr), hexnum(size.split(";")[0])
        if kind == "0":
            if not insert:
                self.soft.at.pop(addr, None)
                return "OK"
            pieces = self._pieces(addr, 1)
            if not pieces:
                return "E14"
            self.soft.at[addr] = pieces[0][0]
            return "OK"
        if kind == "1":
            if not insert:
                self.hard.pop(addr, None)
                return "OK"
            if addr not in self.hard:
                dr = self._free_debug_register()
                if dr is None:
                    return "E28"            # all four in use: gdb says so
                self.hard[addr] = dr
            return "OK"
        if kind == "2":
            return self._watch(addr, size, insert)
        if kind == "4":
            return self._access_watch(addr, size, insert)
        if kind == "3":
            if insert:
                self._say_once("rwatch", "kvmguest: x86 debug registers cannot watch reads "
                               "alone: read watchpoints are refused (awatch watches reads "
                               "and writes where the host fires it; watch, writes)\n")
            return "" if insert else "OK"
        return ""

    def _free_debug_register(self) -> int | None:
        used = set(self.hard.values()) | set(self.data.values())
        return next((i for i in range(4) if i not in used), None)

    def _access_watch(self, addr: int, size: int, insert: bool) -> str:
        """An access watchpoint in a debug register (x86 has none for reads alone: gdb's
        ``rwatch`` is refused, as on native x86)."""
        if not insert:
            self.data.pop((addr, size), None)
            return "OK"
        if linux.emulating_host():
            self._say_once("data-dr", "kvmguest: this host's KVM (kvm_pvm) never fires "
                           "debug-register data watchpoints: access watchpoints are refused "
                           "(write watchpoints work: `watch`)\n")
            return ""
        if size not in (1, 2, 4, 8) or addr % size:
            return "E22"
        dr = self._free_debug_register()
        if dr is None:
            return "E28"
        self.data[(addr, size)] = dr
        return "OK"

    def _watch(self, addr: int, size: int, insert: bool) -> str:
        key = (addr, size)
        if not insert:
            if self.watches.pop(key, None) is not None:
                self._protect()
            return "OK"
        if self.m.dirty.enabled:
            self._say_once("watch-dirty", "kvmguest: a write watchpoint cannot be set while "
                           "the guest's pages are being tracked (checkpoints or a save)\n")
            return "E16"
        pieces = self._pieces(addr, size)
        if sum(n for _, n in pieces) != size:
            return "E14"
        if len(self._watched_pages() | {g & ~(PAGE - 1) for g, _ in pieces}) \
                > MAX_PROTECTED_PAGES:
            self._say_once("watch-cap", f"kvmguest: write watchpoints hold at most "
                           f"{MAX_PROTECTED_PAGES} pages read-only at once (each page is a "
                           "memory slot of its own); this one is refused\n")
            return "E28"
        self.watches[key] = pieces
        try:
            self._protect()
        except KvmguestError:
            del self.watches[key]
            self._protect()
            raise
        return "OK"

    def _watched_pages(self) -> set[int]:
        # Each piece lies within one page (_pieces splits at page boundaries).
        return {g & ~(PAGE - 1) for pieces in self.watches.values() for g, _ in pieces}

    def _protect(self) -> None:
        self.m.platform.protect_pages(self.m.memory, self._watched_pages())

    def _arm(self, thread, step: bool) -> None:
        """KVM_SET_GUEST_DEBUG for ``thread``: the breakpoints, and a single step."""
        control = GuestDebug.KVM_GUESTDBG_ENABLE | GuestDebug.KVM_GUESTDBG_USE_SW_BP
        if step:
            control |= GuestDebug.KVM_GUESTDBG_SINGLESTEP | GuestDebug.KVM_GUESTDBG_BLOCKIRQ
        dr = [0] * 8
        dr7 = 0
        for addr, i in self.hard.items():
            dr[i] = addr
            dr7 |= 1 << (2 * i)
        for (addr, size), i in self.data.items():
            dr[i] = addr
            length = {1: 0, 2: 1, 4: 3, 8: 2}[size]
            dr7 |= 1 << (2 * i) | (DR7_RW_ACCESS | length << 2) << (16 + 4 * i)
        if dr7:
            control |= GuestDebug.KVM_GUESTDBG_USE_HW_BP
            dr[7] = dr7 | DR7_GE
        thread.vcpu.set_guest_debug(int(control), dr)

    # --- running -----------------------------------------------------------------------
    def _resume(self, step: int | None):
        """Continue every vCPU (``step`` None) or single-step vCPU ``step`` alone; the
        stop reply once the guest has stopped again (or ended)."""
        self._flush_console()
        if self.m.vcpus.done.is_set():
            return self._ended()
        if step is None:
            with self._events_lock:
                pending = self.events.popleft() if self.events else None
            if pending is not None:
                return self._report(pending)
        if step is not None:
            return self._step(self.m.vcpus[step])
        for t in self.m.vcpus:
            self._arm(t, False)
        self._drain_wake()
        self._release()
        return self._wait_for_stop()

    def _step(self, thread):
        self._arm(thread, True)          # left armed: every resume arms each vCPU afresh
        self._drain_wake()
        completed = self.m.vcpus.run_one(thread, STEP_TIMEOUT)
        with self._events_lock:
            mine = [e for e in self.events if e.thread == thread.index]
            for e in mine:
                self.events.remove(e)
        if self.m.vcpus.done.is_set():
            return self._ended()
        if not completed:
            self._cannot_stop_here(thread)
            self._flush_console()
        return self._report(mine[0] if mine and mine[0].reason else Stop(thread.index))

    def _cannot_stop_here(self, thread) -> None:
        if thread.vcpu.get_sregs().cs.selector & 3 == 3 and linux.emulating_host():
            self._say_once("cpl3", "kvmguest: this host's KVM (kvm_pvm) runs CPL3 code "
                           "natively: single steps and breakpoints there do not stop it\n")

    def _wait_for_stop(self):
        """Wait while the guest runs: a breakpoint, a watchpoint, Ctrl-C or its end."""
        while not self._ending:
            ready, _, _ = select.select([self.conn, self._wake_r], [], [], 0.1)
            if self._wake_r in ready:
                self._drain_wake()
                stop = self._next_event()
                if stop is not None:
                    self._halt()
                    self._keep_watch_events()
                    return self._report(stop)
            if self.conn in ready:
                pkt = self.conn.read(block=False)
                if pkt is None:
                    return _GONE
                if pkt == "interrupt":
                    self._halt()
                    return self._report(Stop(self.current, SIGINT))
            if self.m.vcpus.done.is_set():
                return self._ended()
        return self._ended()

    def _next_event(self) -> Stop | None:
        """The event to report: another vCPU's before the one reported last, so that
        every vCPU's breakpoint hits get their turn."""
        with self._events_lock:
            if not self.events:
                return None
            stop = next((e for e in self.events if e.thread != self.stop.thread),
                        self.events[0])
            self.events.remove(stop)
            return stop

    def _keep_watch_events(self) -> None:
        """After a stop, other vCPUs' breakpoint hits are dropped (they hit again when the
        guest resumes); a watched write has happened and is kept for the next resume."""
        with self._events_lock:
            kept = [e for e in self.events if e.reason.startswith("watch")]
            self.events.clear()
            self.events.extend(kept)

    def _report(self, stop: Stop) -> str:
        """Make ``stop`` the last stop; gdb takes its vCPU as the one that registers and
        memory now refer to (as if it had sent Hg). The reply carries rbp, rsp and rip
        ("expedited", as gdbserver does), so gdb need not read them all to step on."""
        self.stop, self.current = stop, stop.thread
        try:
            r = self.m.vcpus[stop.thread].vcpu.get_regs()
        except KvmguestError:
            return stop.reply()
        return stop.reply() + "".join(
            f"{gdbregs.NUMBER[n]:02x}:{getattr(r, n).to_bytes(8, 'little').hex()};"
            for n in EXPEDITED)

    def _drain_wake(self) -> None:
        while select.select([self._wake_r], [], [], 0)[0]:
            os.read(self._wake_r, 4096)

    def _ended(self) -> str:
        """The reply once the guest has ended: its exit status, or SIGSEGV at the crash
        (the registers stay readable until gdb detaches)."""
        self.holding = False
        if self._ending:
            return f"X{SIGKILL:02x}"
        if self.m.vcpus.error is not None and not self.ended_reported:
            self.ended_reported = True
            failed = next((t.index for t in self.m.vcpus if t.error is not None), 0)
            return self._report(Stop(failed, SIGSEGV))
        if self.m.vcpus.error is not None:
            return f"X{SIGSEGV:02x}"
        code = self.m.devices.debug_exit.result
        return f"W{(code if code is not None else 0) & 0xFF:02x}"

    def _detach_packet(self):
        self.conn.send("OK")
        return _GONE

    def _kill(self, vkill: bool = False):
        """End the guest (no reply to ``k``; gdb closes the connection itself)."""
        if not self.m.vcpus.done.is_set():
            self.m.event = "killed"
        self.m.vcpus.stop()
        self.holding = False
        return "OK" if vkill else None

    # --- monitor and time ----------------------------------------------------------------
    def _monitor(self, command: str) -> str:
        words = command.split()
        verb = words[0] if words else "help"
        try:
            if verb == "snapshot" and len(words) >= 2:
                text = self._snapshot(monitor_path(command))
            elif verb == "phys" and len(words) == 2 and words[1] in ("on", "off"):
                self.phys = words[1] == "on"
                text = f"memory packets now address guest-{'physical' if self.phys else 'virtual'} memory\n"
            elif verb == "checkpoints":
                text = self._checkpoints_text()
            elif verb == "goto" and len(words) == 2:
                text = self._goto(int(words[1], 0))
            else:
                text = MONITOR_HELP
        except (KvmguestError, ValueError) as err:
            text = f"kvmguest: {err}\n"
        self._flush_console()
        self.conn.console(text)
        return "OK"

    def _snapshot(self, path: str) -> str:
        from migrate.precopy import live_save
        report = live_save(self.m, path, then="continue")
        return f"saved the stopped guest: {report.summary().splitlines()[0]}\n"

    def _checkpoints_text(self) -> str:
        if self.checkpoints is None:
            return "no checkpoints: run or restore with --checkpoint PATH --every SECONDS\n"
        gen = self.checkpoints.generation
        if not gen:
            return "no checkpoint taken yet\n"
        return (f"checkpoint {gen} in {self.checkpoints.path} (the newest; reverse "
                "execution goes back to it)\n")

    def _goto(self, generation: int) -> str:
        if self.checkpoints is None or self.checkpoints.generation != generation:
            raise ValueError(f"checkpoint {generation} is not kept (the newest is "
                             f"{getattr(self.checkpoints, 'generation', 0)})")
        self.checkpoints.rewind()
        return f"the guest is at checkpoint {generation}\n"

    def _reverse(self):
        """``bc`` and ``bs`` alike: the stopped guest back to the newest committed
        checkpoint, in place, reported as the start of the recorded history."""
        if self.checkpoints is None or not self.checkpoints.generation:
            return "E01"
        self.checkpoints.rewind()
        return self._report(Stop(self.current, SIGTRAP, "replaylog:begin;"))

    def _say_once(self, key: str, text: str) -> None:
        """Tell the user once, on stderr and in gdb's console. gdb takes console output
        only while the target runs (or in a monitor command's answer): it waits there."""
        if key not in self._said:
            self._said.add(key)
            self.note(text.strip().removeprefix("kvmguest: "))
            self._to_console.append(text)

    def _flush_console(self) -> None:
        while self._to_console and self.conn is not None:
            self.conn.console(self._to_console.pop(0))

    # --- the end -------------------------------------------------------------------------
    def linger(self, deadline: float | None = None) -> None:
        """After the guest ended: wait while a gdb client is still looking at it (not
        when gdb killed it: then only until gdb closes the connection, as it does at
        once, or KILL_GRACE seconds), and never past ``deadline`` (time.monotonic(): the
        run's --timeout), when gdb is disconnected."""
        if self.detached.is_set():
            return
        if self.m.event == "killed":
            self.detached.wait(KILL_GRACE)
            return
        self.note("the guest has ended; gdb can still read its registers and memory "
                  "(detach or quit gdb to finish)")
        if not self.detached.wait(None if deadline is None
                                  else max(0.0, deadline - time.monotonic())):
            self.end("the run's --timeout has passed")

    def end(self, why: str) -> None:
        """The run ends whatever gdb does (the guest is stopped for good): a gdb waiting
        for the guest is told it was killed (X09), then any client is disconnected."""
        self._ending = why
        conn = self.conn
        if conn is None:
            return
        os.write(self._wake_w, b"!")
        if not self.detached.wait(END_GRACE):       # a waiting gdb is answered, then goes
            conn.drop(why)
            self.detached.wait(END_GRACE)

    def close(self) -> None:
        self._closed.set()
        try:
            self.sock.close()
        except OSError:
            pass
        conn = self.conn
        if conn is not None:
            conn.drop("the stub is closing")
        if self._thread.is_alive():
            self._thread.join(2.0)
        self._turned_away.close()
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.m.debugger is self:
            self.m.debugger = None
            self.m.vcpus.on_parked.remove(self.soft.lift)
            self.m.vcpus.on_release.remove(self.soft.insert)


_GONE = object()          # the client detached or killed the guest: end its session
