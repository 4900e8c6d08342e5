"""A GDB remote stub for a running (or restored) machine: all-stop, each vCPU a thread.

    kvmguest run guests/build/debug.elf --gdb 1234      # waits for gdb
    gdb guests/build/debug.elf -ex 'target remote :1234'

The server: one client at a time (connection.py says who may connect), a table from packet
to handler, stop replies, monitor commands. What it debugs is a DebugTarget (target.py);
the bytes on the wire are wire.py's. Memory is read and written by guest-virtual address
through the selected vCPU's page tables, or physical after ``monitor phys on``.
``monitor snapshot PATH`` saves the stopped guest (the session hands in how); with
continuous checkpoints, ``reverse-continue``/``reverse-stepi`` go back to the newest
checkpoint (the start of the recorded history: nothing is replayed in between).
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time

from kvmguest.arch.x86 import gdbregs
from kvmguest.errors import KvmguestError
from kvmguest.front.gdb import wire
from kvmguest.front.gdb.connection import Connection, listen, peer_uid
from kvmguest.front.gdb.monitor import Monitor
from kvmguest.front.gdb.target import (SIGINT, SIGKILL, SIGTRAP, DebugTarget,
                                       NotSupported, Stop, TargetError)
from kvmguest.front.gdb.wire import hexnum
from kvmguest.loglimit import LogLimit

log = logging.getLogger(__name__)

KILL_GRACE = 5.0                # after a kill: how long gdb may take to hang up
END_GRACE = 1.0                 # end(): how long a waiting gdb has to take its answer
MAX_PACKET = wire.PACKET_SIZE
MAX_READ = (MAX_PACKET - 8) // 2      # bytes of memory one hex reply holds
EXPEDITED = ("rbp", "rsp", "rip")   # sent with every stop reply
class GdbStub:
    """Serves gdb for ``machine``. ``wait``: the machine was started paused (``start(
    paused=True)``) and the stub holds that pause until gdb resumes the guest.
    ``note`` tells the user one line (stderr, through the CLI); ``snapshot(path)`` saves
    the stopped guest and returns a line saying so (``monitor snapshot``); the guest's
    Checkpointer, for reverse execution, comes with :meth:`attach_checkpoints`."""

    def __init__(self, machine, spec: str, wait: bool = True, note=lambda text: None,
                 snapshot=None):
        self.note, self.snapshot = note, snapshot
        self.sock, self.where, self.unix_path = listen(spec)
        self.target = DebugTarget(machine, wait, self._say_once)
        self.monitor = Monitor(self.target, snapshot)
        self.conn: Connection | None = None
        self.stop = Stop(0)
        self.current = 0                      # Hg: the vCPU registers and memory refer to
        self._closed = threading.Event()
        self._said: set[str] = set()
        self._turned_away = LogLimit(first=3, say=note)    # refused connections
        self._to_console: list[str] = []
        self.ended_reported = False
        self._ending: str | None = None         # end(): why the run ends whatever gdb does
        self.detached = threading.Event()       # no gdb client (set), or the last one left
        self.detached.set()
        self._handlers = self._dispatch()
        self._thread = threading.Thread(target=self._serve, name="gdb", daemon=True)

    @property
    def holding(self) -> bool:
        """The stub holds the guest stopped."""
        return self.target.holding

    def start(self) -> None:
        self._thread.start()

    def attach_checkpoints(self, checkpoints) -> None:
        """The guest's Checkpointer: reverse execution goes back to its newest checkpoint
        (``rewind``); it takes none while gdb holds the guest stopped."""
        self.target.checkpoints = checkpoints
        if self.target.holding:
            checkpoints.held.set()

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
            try:
                self.target.clear()
            except KvmguestError as err:
                log.error("gdb stub: after gdb left: %s", err)
            self.conn.close()
            self.conn = None
            self.detached.set()

    def _session(self) -> None:
        if not self.target.holding and not self.target.ended:
            self.target.halt()
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

    # --- packets -----------------------------------------------------------------------
    def _packet(self, pkt: bytes):
        """The answer to one packet (None: none is sent; _GONE: the session ends)."""
        text = pkt.decode("latin-1")
        handler = self._handlers.get(text[:1])
        try:
            return handler(text[1:], pkt[1:]) if handler else ""
        except TargetError as err:
            return f"E{err.errno:02d}"
        except NotSupported:
            return ""
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
            "?": lambda t, _: self.stop.reply() if not self.target.ended else self._ended(),
            "g": lambda t, _: b"".join(self.target.registers(self.current)).hex(),
            "G": lambda t, _: self._write_registers(t),
            "p": lambda t, _: self._read_register(hexnum(t)),
            "P": lambda t, _: self._write_register(t),
            "m": lambda t, _: self._read_memory(t),
            "M": lambda t, _: self._write_memory(*t.split(":", 1), bytes.fromhex),
            "X": lambda _, raw: self._write_memory(*raw.split(b":", 1), wire.unescape),
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
            if self.target.checkpoints is not None:
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
            return (b"l" if last else b"m") + wire.escape(chunk)
        if text == "qfThreadInfo":
            return "m" + ",".join(f"{t.index + 1:x}" for t in self.target.vcpus)
        if text == "qsThreadInfo":
            return "l"
        if text == "qC":
            return f"QC{self.current + 1:x}"
        if text == "qAttached":
            return "1"
        if name.startswith("qThreadExtraInfo"):
            t = self._thread_of(text.split(",", 1)[1])
            return self.target.describe(t.index).encode().hex() if t is not None else "E01"
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
                    t = self._thread_of(tid) if tid else self.target.vcpus[self.current]
                    step = t.index if t is not None else self.current
            return self._resume(step)
        if text.startswith("vKill"):
            return self._kill(vkill=True)
        return ""

    # --- threads, registers, memory --------------------------------------------------------
    def _thread_of(self, tid: str):
        """The VcpuThread for a gdb thread id (1-based; -1 and 0: the current), or None."""
        tid = tid.split(".")[-1] if tid.startswith("p") else tid
        n = hexnum(tid) if tid not in ("-1", "") else 0
        return self.target.thread(self.current if n <= 0 else n - 1)

    def _select_thread(self, arg: str) -> str:
        t = self._thread_of(arg[1:])
        if t is None:
            return "E01"
        if arg[:1] == "g":
            self.current = t.index
        return "OK"

    def _read_register(self, n: int) -> str:
        values = self.target.registers(self.current)
        return values[n].hex() if n < len(values) else "E01"

    def _write_register(self, arg: str) -> str:
        n, _, value = arg.partition("=")
        self.target.set_registers(self.current, {hexnum(n): bytes.fromhex(value)})
        return "OK"

    def _write_registers(self, data: str) -> str:
        raw = bytes.fromhex(data)
        now = self.target.registers(self.current)
        changed = {}
        for i, off in enumerate(gdbregs.OFFSETS):
            new = raw[off:off + len(now[i])]
            if len(new) == len(now[i]) and new != now[i]:
                changed[i] = new
        self.target.set_registers(self.current, changed)
        return "OK"

    def _read_memory(self, arg: str) -> str:
        """``m``: at most what fits one reply (gdb splits its reads by PacketSize and takes
        a shorter answer as the part that could be read)."""
        addr, length = (hexnum(x) for x in arg.split(","))
        return self.target.read_memory(self.current, addr, min(length, MAX_READ)).hex()

    def _write_memory(self, where, data, decode) -> str:
        """``M`` (hex) and ``X`` (binary): the data must be as long as the packet says."""
        addr, length = (hexnum(x) for x in where.split("," if isinstance(where, str) else b","))
        data = decode(data)
        if len(data) != length:
            return "E01"
        self.target.write_memory(self.current, addr, data)
        return "OK"

    def _breakpoint(self, arg: str, insert: bool) -> str:
        kind, addr, size = arg.split(",")[:3]
        addr, size = hexnum(addr), hexnum(size.split(";")[0])
        if kind == "0":
            self.target.software_breakpoint(self.current, addr, insert)
        elif kind == "1":
            self.target.hardware_breakpoint(addr, insert)
        elif kind == "2":
            self.target.write_watchpoint(self.current, addr, size, insert)
        elif kind == "3":
            self.target.read_watchpoint(insert)
        elif kind == "4":
            self.target.access_watchpoint(addr, size, insert)
        else:
            return ""
        return "OK"

    # --- running -----------------------------------------------------------------------
    def _resume(self, step: int | None):
        """Continue every vCPU (``step`` None) or single-step vCPU ``step`` alone; the
        stop reply once the guest has stopped again (or ended)."""
        self._flush_console()
        if self.target.ended:
            return self._ended()
        if step is not None:
            completed, mine = self.target.step(step)
            if self.target.ended:
                return self._ended()
            if not completed:
                self._flush_console()
            return self._report(mine[0] if mine and mine[0].reason else Stop(step))
        pending = self.target.pending()
        if pending is not None:
            return self._report(pending)
        self.target.resume()
        return self._wait_for_stop()

    def _wait_for_stop(self):
        """Wait while the guest runs: a breakpoint, a watchpoint, Ctrl-C or its end."""
        while not self._ending:
            ready, _, _ = select.select([self.conn, self.target.wake_fd], [], [], 0.1)
            if self.target.wake_fd in ready:
                self.target.drain_wake()
                stop = self.target.next_event(self.stop.thread)
                if stop is not None:
                    self.target.halt()
                    self.target.keep_watch_events()
                    return self._report(stop)
            if self.conn in ready:
                pkt = self.conn.read(block=False)
                if pkt is None:
                    return _GONE
                if pkt == "interrupt":
                    self.target.halt()
                    return self._report(Stop(self.current, SIGINT))
            if self.target.ended:
                return self._ended()
        return self._ended()

    def _report(self, stop: Stop) -> str:
        """Make ``stop`` the last stop; gdb takes its vCPU as the one that registers and
        memory now refer to (as if it had sent Hg). The reply carries rbp, rsp and rip
        ("expedited", as gdbserver does), so gdb need not read them all to step on."""
        self.stop, self.current = stop, stop.thread
        try:
            pc = self.target.pc(stop.thread)
        except KvmguestError:
            return stop.reply()
        return stop.reply() + "".join(
            f"{gdbregs.NUMBER[n]:02x}:{pc[n].to_bytes(8, 'little').hex()};" for n in EXPEDITED)

    def _ended(self) -> str:
        """The reply once the guest has ended: its exit status, or SIGSEGV at the crash
        (the registers stay readable until gdb detaches)."""
        self.target.holding = False
        if self._ending or self.target.m.event == "timeout":   # the run's --timeout
            return f"X{SIGKILL:02x}"
        kind, value, crashed = self.target.end_status()
        if crashed is not None and not self.ended_reported:
            self.ended_reported = True
            return self._report(Stop(crashed, value))
        return f"{kind}{value:02x}"

    def _detach_packet(self):
        self.conn.send("OK")
        return _GONE

    def _kill(self, vkill: bool = False):
        """End the guest (no reply to ``k``; gdb closes the connection itself)."""
        self.target.kill()
        return "OK" if vkill else None

    # --- monitor and time ----------------------------------------------------------------
    def _monitor(self, command: str) -> str:
        text = self.monitor.answer(command)
        self._flush_console()
        self.conn.console(text)
        return "OK"

    def _reverse(self):
        """``bc`` and ``bs`` alike: the stopped guest back to the newest committed
        checkpoint, in place, reported as the start of the recorded history."""
        checkpoints = self.target.checkpoints
        if checkpoints is None or not checkpoints.generation:
            return "E01"
        checkpoints.rewind()
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
        if self.target.m.event == "killed":
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
        self.target.wake()
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
        self.target.close()


_GONE = object()          # the client detached or killed the guest: end its session
