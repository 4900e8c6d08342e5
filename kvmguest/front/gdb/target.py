"""A machine as a debugger sees it: its vCPUs as threads, their registers, memory (through
a vCPU's page tables, or guest-physical), breakpoints, watchpoints, single steps, and why
the guest stopped. Nothing here knows gdb's packets (server.py does).

What a stop is: every vCPU parked (``Machine.pause_all``), the target holding that pause
until the debugger resumes the guest.

- Software breakpoints: an ``int3`` written into guest RAM while the guest runs, and lifted
  out whenever the vCPUs are parked (``VcpuSet.on_parked``), so a save, a checkpoint or a
  memory read never sees it. A hit arrives as KVM's debug exit (#BP, with
  ``KVM_GUESTDBG_USE_SW_BP``) or, where KVM cannot emulate ``int3`` in kernel code
  (kvm_pvm), as an emulation failure at it; an ``int3`` that is not ours goes to the
  guest as #BP.
- Hardware breakpoints: DR0-3 through ``KVM_SET_GUEST_DEBUG`` (arch.x86.debugregs).
- Write watchpoints: the watched pages are made read-only to the guest (their memory slot
  split around them, arch.x86.platform); a guest write to them comes back as an MMIO exit,
  which the target carries out and, when it touched the watched bytes, reports. Exact on
  every host and at every CPL.
- Access watchpoints: debug registers, where the host fires them (not kvm_pvm: refused).

A single step runs one vCPU alone (``VcpuSet.run_one``) with SINGLESTEP|BLOCKIRQ, so it
never lands in an interrupt handler."""

from __future__ import annotations

import ctypes
import os
import select
import threading
from collections import deque

from kvmguest import abi
from kvmguest.abi import GuestDebug
from kvmguest.arch.x86 import debugregs, gdbregs, quirks, regs
from kvmguest.arch.x86.platform import MAX_PROTECTED_PAGES
from kvmguest.arch.x86.complete import Completer
from kvmguest.errors import KvmguestError
from kvmguest.exits import DebugExit, InternalErrorExit, MmioExit

PAGE = abi.PAGE_SIZE
STEP_TIMEOUT = 1.0              # a step that has not completed by then is reported anyway
SIGINT, SIGTRAP, SIGKILL, SIGSEGV = 2, 5, 9, 11
EFAULT, EBUSY, EINVAL, ENOSPC = 14, 16, 22, 28


class TargetError(Exception):
    """The target cannot do what was asked: ``errno`` says why (gdb's Enn replies)."""

    def __init__(self, errno: int):
        super().__init__(errno)
        self.errno = errno


class NotSupported(Exception):
    """Something this target does not offer (gdb is answered with an empty reply)."""


class Stop:
    """Why the guest stopped: the signal, the vCPU, and what gdb is told of the reason."""

    def __init__(self, thread: int, signal: int = SIGTRAP, reason: str = ""):
        self.thread, self.signal, self.reason = thread, signal, reason

    def reply(self) -> str:
        return f"T{self.signal:02x}thread:{self.thread + 1:x};{self.reason}"


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


class DebugTarget:
    """``machine`` under a debugger. ``holding``: the machine was started paused and the
    target holds that pause; ``say(key, text)`` tells the user, once per key, why
    something is refused. A guest's Checkpointer (``checkpoints``) takes none while the
    target holds the guest."""

    def __init__(self, machine, holding: bool, say):
        self.m, self.say = machine, say
        self.holding = holding
        self.checkpoints = None
        self.phys = False
        self.soft = SoftBreakpoints(machine.memory)
        self.hard: dict[int, int] = {}        # linear address -> DR index (execution)
        self.data: dict[tuple[int, int], int] = {}   # access watchpoints: (addr, len) -> DR
        self.watches: dict[tuple[int, int], list[tuple[int, int]]] = {}  # -> gpa pieces
        self.events: deque[Stop] = deque()
        self._events_lock = threading.Lock()
        self.wake_fd, self._wake_w = os.pipe()   # readable when an event was queued
        machine.debugger = self
        machine.vcpus.on_parked.append(self.soft.lift)
        machine.vcpus.on_release.append(self.soft.insert)

    @property
    def vcpus(self):
        return self.m.vcpus

    @property
    def ended(self) -> bool:
        return self.m.vcpus.done.is_set()

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
            Completer.deliver_bp(thread.vcpu)   # the guest's own int3
            return None
        hit = debugregs.hit(ex.dr6)
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

    # --- stopping and running ------------------------------------------------------------
    def halt(self) -> None:
        """Stop the guest (all vCPUs parked) and hold it so."""
        if not self.holding and not self.ended:
            self.m.pause_all()
            self.holding = True
            if self.checkpoints is not None:
                self.checkpoints.held.set()

    def release(self) -> None:
        if self.holding:
            self.holding = False
            if self.checkpoints is not None:
                self.checkpoints.held.clear()
            self.m.resume_all()

    def resume(self) -> None:
        """Let every vCPU run, each armed with the breakpoints."""
        for t in self.m.vcpus:
            self._arm(t, False)
        self.drain_wake()
        self.release()

    def step(self, index: int) -> tuple[bool, list[Stop]]:
        """Run vCPU ``index`` alone for one instruction: whether it completed, and the
        events it raised meanwhile."""
        thread = self.m.vcpus[index]
        self._arm(thread, True)          # left armed: every resume arms each vCPU afresh
        self.drain_wake()
        completed = self.m.vcpus.run_one(thread, STEP_TIMEOUT)
        with self._events_lock:
            mine = [e for e in self.events if e.thread == index]
            for e in mine:
                self.events.remove(e)
        if not completed and not self.ended and quirks.emulating_host() \
                and thread.vcpu.get_sregs().cs.selector & 3 == 3:
            self.say("cpl3", "kvmguest: this host's KVM (kvm_pvm) runs CPL3 code natively: "
                     "single steps and breakpoints there do not stop it\n")
        return completed, mine

    def _arm(self, thread, step: bool) -> None:
        """KVM_SET_GUEST_DEBUG for ``thread``: the breakpoints, and a single step."""
        control = GuestDebug.KVM_GUESTDBG_ENABLE | GuestDebug.KVM_GUESTDBG_USE_SW_BP
        if step:
            control |= GuestDebug.KVM_GUESTDBG_SINGLESTEP | GuestDebug.KVM_GUESTDBG_BLOCKIRQ
        dr = debugregs.arm(self.hard, self.data)
        if dr is not None:
            control |= GuestDebug.KVM_GUESTDBG_USE_HW_BP
        thread.vcpu.set_guest_debug(int(control), dr or [0] * 8)

    def kill(self) -> None:
        if not self.ended:
            self.m.event = "killed"
        self.m.vcpus.stop()
        self.holding = False

    def clear(self) -> None:
        """The debugger left: no breakpoint or watchpoint stays, KVM debugging is off,
        the guest runs on."""
        self.soft.at.clear()
        self.hard.clear()
        self.data.clear()
        try:
            if self.watches:
                self.halt()        # no vCPU is between a watched write's exit and its handler
                self.watches.clear()
                self._protect()
            if not self.ended:
                for t in self.m.vcpus:
                    t.vcpu.set_guest_debug(0)
        finally:
            self.release()

    # --- events --------------------------------------------------------------------------
    def pending(self) -> Stop | None:
        with self._events_lock:
            return self.events.popleft() if self.events else None

    def next_event(self, last_thread: int) -> Stop | None:
        """The event to report: another vCPU's before ``last_thread``'s, so that every
        vCPU's breakpoint hits get their turn."""
        with self._events_lock:
            if not self.events:
                return None
            stop = next((e for e in self.events if e.thread != last_thread), self.events[0])
            self.events.remove(stop)
            return stop

    def keep_watch_events(self) -> None:
        """After a stop, other vCPUs' breakpoint hits are dropped (they hit again when the
        guest resumes); a watched write has happened and is kept for the next resume."""
        with self._events_lock:
            kept = [e for e in self.events if e.reason.startswith("watch")]
            self.events.clear()
            self.events.extend(kept)

    def wake(self) -> None:
        os.write(self._wake_w, b"!")

    def drain_wake(self) -> None:
        while select.select([self.wake_fd], [], [], 0)[0]:
            os.read(self.wake_fd, 4096)

    def end_status(self) -> tuple[str, int, int | None]:
        """How the guest ended: ("W", exit code, None), or ("X", SIGSEGV, the vCPU that
        crashed)."""
        if self.m.vcpus.error is not None:
            return "X", SIGSEGV, next((t.index for t in self.m.vcpus if t.error is not None), 0)
        code = self.m.devices.debug_exit.result
        return "W", (code if code is not None else 0) & 0xFF, None

    # --- threads and registers -----------------------------------------------------------
    def thread(self, n: int):
        """vCPU ``n`` (0-based), or None."""
        return self.m.vcpus[n] if 0 <= n < len(self.m.vcpus) else None

    def describe(self, index: int) -> str:
        t = self.m.vcpus[index]
        try:
            s = t.vcpu.get_sregs()
            mp = t.vcpu.get_mp_state().mp_state
        except KvmguestError:
            return f"vCPU {index}"
        mode = ("long mode" if s.efer & regs.EFER_LMA else
                "protected mode" if s.cr0 & regs.X86_CR0_PE else "real mode")
        state = {abi.KVM_MP_STATE_UNINITIALIZED: ", waiting for INIT/SIPI",
                 abi.KVM_MP_STATE_HALTED: ", halted"}.get(mp, "")
        return f"vCPU {index}, {mode}, CPL{s.cs.selector & 3}{state}"

    def registers(self, index: int) -> list[bytes]:
        """vCPU ``index``'s registers in gdb's order (arch.x86.gdbregs)."""
        v = self.m.vcpus[index].vcpu
        return gdbregs.values(v.get_regs(), v.get_sregs(), v.get_fpu())

    def set_registers(self, index: int, changed: dict[int, bytes]) -> None:
        """Write registers (gdb's numbers) of vCPU ``index``."""
        if any(not 0 <= n < len(gdbregs.REGISTERS) for n in changed):
            raise TargetError(EINVAL)
        v = self.m.vcpus[index].vcpu
        r, s, f = v.get_regs(), v.get_sregs(), v.get_fpu()
        touched = {gdbregs.write(n, raw, r, s, f) for n, raw in changed.items()}
        if "regs" in touched:
            v.set_regs(r)
        if "sregs" in touched:
            v.set_sregs(s)
        if "fpu" in touched:
            v.set_fpu(f)

    def pc(self, index: int) -> dict[str, int]:
        r = self.m.vcpus[index].vcpu.get_regs()
        return {"rbp": r.rbp, "rsp": r.rsp, "rip": r.rip}

    # --- memory --------------------------------------------------------------------------
    def _pieces(self, index: int, addr: int, length: int):
        """(guest-physical, length) runs for ``length`` bytes at ``addr``, stopping at the
        first byte that is not mapped or not RAM."""
        sregs = None if self.phys else self.m.vcpus[index].vcpu.get_sregs()
        out = []
        while length > 0:
            n = min(length, PAGE - (addr & (PAGE - 1)))
            gpa = addr if sregs is None else regs.translate(self.m.memory, addr, sregs)
            if gpa is None or not self.m.memory.is_ram(gpa, n):
                break
            out.append((gpa, n))
            addr, length = addr + n, length - n
        return out

    def read_memory(self, index: int, addr: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``addr``: fewer where the memory stops being mapped
        RAM; TargetError when not even the first byte is."""
        data = b"".join(self.m.memory.read(g, n) for g, n in self._pieces(index, addr, length))
        if length and not data:
            raise TargetError(EFAULT)
        return data

    def write_memory(self, index: int, addr: int, data: bytes) -> None:
        pieces = self._pieces(index, addr, len(data))
        if sum(n for _, n in pieces) != len(data):
            raise TargetError(EFAULT)
        for gpa, n in pieces:
            self.m.memory.write(gpa, data[:n])
            data = data[n:]

    # --- breakpoints and watchpoints -------------------------------------------------------
    def software_breakpoint(self, index: int, addr: int, insert: bool) -> None:
        if not insert:
            self.soft.at.pop(addr, None)
            return
        pieces = self._pieces(index, addr, 1)
        if not pieces:
            raise TargetError(EFAULT)
        self.soft.at[addr] = pieces[0][0]

    def hardware_breakpoint(self, addr: int, insert: bool) -> None:
        if not insert:
            self.hard.pop(addr, None)
        elif addr not in self.hard:
            self.hard[addr] = self._free_debug_register()

    def _free_debug_register(self) -> int:
        used = set(self.hard.values()) | set(self.data.values())
        free = next((i for i in range(debugregs.COUNT) if i not in used), None)
        if free is None:
            raise TargetError(ENOSPC)         # all four in use: gdb says so
        return free

    def read_watchpoint(self, insert: bool) -> None:
        if insert:
            self.say("rwatch", "kvmguest: x86 debug registers cannot watch reads alone: read "
                     "watchpoints are refused (awatch watches reads and writes where the host "
                     "fires it; watch, writes)\n")
            raise NotSupported

    def access_watchpoint(self, addr: int, size: int, insert: bool) -> None:
        """An access watchpoint in a debug register (x86 has none for reads alone: gdb's
        ``rwatch`` is refused, as on native x86)."""
        if not insert:
            self.data.pop((addr, size), None)
            return
        if quirks.emulating_host():
            self.say("data-dr", "kvmguest: this host's KVM (kvm_pvm) never fires "
                     "debug-register data watchpoints: access watchpoints are refused "
                     "(write watchpoints work: `watch`)\n")
            raise NotSupported
        if size not in debugregs.DR7_LEN or addr % size:
            raise TargetError(EINVAL)
        self.data[(addr, size)] = self._free_debug_register()

    def write_watchpoint(self, index: int, addr: int, size: int, insert: bool) -> None:
        key = (addr, size)
        if not insert:
            if self.watches.pop(key, None) is not None:
                self._protect()
            return
        if self.m.dirty.enabled:
            self.say("watch-dirty", "kvmguest: a write watchpoint cannot be set while the "
                     "guest's pages are being tracked (checkpoints or a save)\n")
            raise TargetError(EBUSY)
        pieces = self._pieces(index, addr, size)
        if sum(n for _, n in pieces) != size:
            raise TargetError(EFAULT)
        if len(self._watched_pages() | {g & ~(PAGE - 1) for g, _ in pieces}) \
                > MAX_PROTECTED_PAGES:
            self.say("watch-cap", f"kvmguest: write watchpoints hold at most "
                     f"{MAX_PROTECTED_PAGES} pages read-only at once (each page is a memory "
                     "slot of its own); this one is refused\n")
            raise TargetError(ENOSPC)
        self.watches[key] = pieces
        try:
            self._protect()
        except KvmguestError:
            del self.watches[key]
            self._protect()
            raise

    def _watched_pages(self) -> set[int]:
        # Each piece lies within one page (_pieces splits at page boundaries).
        return {g & ~(PAGE - 1) for pieces in self.watches.values() for g, _ in pieces}

    def _protect(self) -> None:
        self.m.platform.protect_pages(self.m.memory, self._watched_pages())

    def close(self) -> None:
        for fd in (self.wake_fd, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.m.debugger is self:
            self.m.debugger = None
            self.m.vcpus.on_parked.remove(self.soft.lift)
            self.m.vcpus.on_release.remove(self.soft.insert)
