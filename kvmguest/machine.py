"""A runnable guest: VM + memory + devices + a vCPU thread, with pause/resume.

    with Machine("guests/build/hello.elf", memory=64 * MiB) as m:
        result = m.run(timeout=10)
        print(result.exit_code, result.console)
"""

from __future__ import annotations

import ctypes
import logging
import signal
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from . import abi
from .abi import Cap, ExitReason
from .boot import cpu, layout, pvh
from .devices import DebugExit, PortBus, Serial
from .dirty import DirtyLog
from .errors import EXIT_TIMEOUT, KvmguestError
from .kvm import Kvm, KvmError
from .memory import GuestMemory, plan_regions

log = logging.getLogger(__name__)

# The kick that makes KVM_RUN return: a real-time signal of our own (SIGUSR1/2 belong to
# the application embedding us). Its handler does nothing; EINTR is the point.
KICK_SIGNAL = signal.SIGRTMIN + 2
DEFAULT_MEMORY = 64 << 20


class GuestError(KvmguestError):
    """The guest did something the VMM cannot continue from."""

    def __init__(self, message: str, console: str = ""):
        super().__init__(message)
        self.console = console


class GuestCrashed(GuestError):
    """Triple fault, failed entry or an emulation failure; the message shows registers."""


class GuestTimeout(GuestError):
    """The guest did not finish within the timeout."""

    exit_code = EXIT_TIMEOUT


@dataclass
class GuestResult:
    exit_code: int | None   # the value written to the debug-exit port; None if none
    console: str
    seconds: float


_kick_installed = False


def _install_kick_handler() -> bool:
    """A no-op handler for the kick signal: its only job is to make KVM_RUN return EINTR."""
    global _kick_installed
    if not _kick_installed and threading.current_thread() is threading.main_thread():
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            signal.signal(KICK_SIGNAL, lambda *_: None)
        _kick_installed = True
    return _kick_installed


REQUIRED_CAPS = (Cap.KVM_CAP_USER_MEMORY, Cap.KVM_CAP_IMMEDIATE_EXIT, Cap.KVM_CAP_NR_MEMSLOTS)


def open_kvm() -> Kvm:
    """``/dev/kvm``, checked for every capability a Machine needs (KvmUnavailable if not)."""
    kvm = Kvm()
    try:
        kvm.require(*REQUIRED_CAPS)
    except BaseException:
        kvm.close()
        raise
    return kvm


class Machine:
    """One VM with one vCPU, its RAM, a COM1 console and a debug-exit port."""

    def __init__(self, kernel: str | None = None, memory: int = DEFAULT_MEMORY,
                 cmdline: str = "", stream: Callable[[bytes], None] | None = None,
                 console_capacity: int = 1 << 20, guest_memory: GuestMemory | None = None,
                 kvm: Kvm | None = None, own_kvm: bool = False):
        """Boot ``kernel``, or (kernel None) build a VM around ``guest_memory`` for a
        restore. A ``kvm`` passed in stays the caller's unless ``own_kvm``."""
        self.kernel = pvh.parse_kernel(kernel) if kernel is not None else None
        self.cmdline = cmdline
        if guest_memory is None and memory < layout.MIN_MEMORY:
            raise ValueError(f"memory {memory} is below the minimum "
                             f"{layout.MIN_MEMORY >> 20} MiB")
        if self.kernel is not None:  # every boot error before any VM exists
            pvh.check_fits(self.kernel, guest_memory.regions if guest_memory is not None
                           else plan_regions(memory), cmdline)
        self._own_kvm = kvm is None or own_kvm
        self.kvm = kvm or open_kvm()
        self.vm = self.vcpu = None
        self.memory = guest_memory
        try:
            self.kvm.require(*REQUIRED_CAPS)
            self.vm = self.kvm.create_vm()
            self.manual_protect = self.vm.check_extension(
                Cap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) > 0
            if self.manual_protect:
                caps = self.vm.check_extension(Cap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
                self.vm.enable_cap(Cap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                                   caps & (abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                                           | abi.KVM_DIRTY_LOG_INITIALLY_SET))
            if self.kvm.check_extension(Cap.KVM_CAP_SET_TSS_ADDR) > 0:
                self.vm.set_tss_addr(layout.TSS_ADDR)
            if self.memory is None:
                self.memory = GuestMemory.anonymous(memory)
            for r in self.memory.regions:
                self.vm.set_user_memory_region(r.slot, r.gpa, r.size, r.host_addr)
            self.dirty = DirtyLog(self.vm, self.memory, self.manual_protect)
            self.vcpu = self.vm.create_vcpu(0)
            self.cpuid = self.kvm.get_supported_cpuid()
            cpu.setup_cpuid(self.cpuid)
            self.vcpu.set_cpuid2(self.cpuid)
        except BaseException:
            self.close()
            raise

        self.serial = Serial(capacity=console_capacity, stream=stream)
        self.debug_exit = DebugExit()
        self.bus = PortBus()
        self.bus.register(layout.COM1_PORT, 8, self.serial)
        self.bus.register(layout.DEBUG_EXIT_PORT, 4, self.debug_exit)

        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._pause_req = threading.Event()
        self._paused = threading.Event()
        self._resume = threading.Event()
        self.error: BaseException | None = None
        self.origin: dict = {}          # kernel/cmdline a restored guest was booted with
        self._msr_indices: list[int] | None = None
        self.exits = 0
        self._started_at = 0.0
        self.first_run_at: float | None = None   # perf_counter() at the first KVM_RUN
        self._finished_at = 0.0
        if self.kernel is not None:
            try:
                self.boot()
            except BaseException:
                self.close()
                raise

    # --- set-up -----------------------------------------------------------------------
    def boot(self) -> None:
        """Load the kernel and set the PVH start state."""
        start_info = pvh.load(self.memory, self.kernel, self.cmdline)
        cpu.setup_gdt(self.memory)
        sregs = self.vcpu.get_sregs()
        cpu.setup_sregs(sregs)
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(cpu.setup_regs(self.kernel.entry, start_info))

    def msr_indices(self) -> list[int]:
        """The MSRs to save (KVM_GET_MSR_INDEX_LIST), read once per machine."""
        if self._msr_indices is None:
            self._msr_indices = self.kvm.get_msr_index_list()
        return self._msr_indices

    # --- running ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("machine already started")
        if not _install_kick_handler():
            log.warning("kick signal handler not installed (not in the main thread): "
                        "pause waits for the guest's next exit")
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._vcpu_loop, name="vcpu0", daemon=True)
        self._thread.start()

    def run(self, timeout: float | None = None) -> GuestResult:
        self.start()
        return self.wait(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._done.is_set()

    def wait_done(self, timeout: float | None = None) -> bool:
        """Wait until the guest has finished (exit, crash or stop); False on timeout."""
        return self._done.wait(timeout)

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for the guest to finish; raise its error, or GuestTimeout (guest stopped)."""
        if not self._done.wait(timeout):
            timeout_error = GuestTimeout(f"guest did not finish within {timeout:g} s",
                                         console=self.serial.text())
            try:
                self.stop()
            except GuestError as err:    # the timeout is what the caller must hear about
                log.error("after the timeout: %s", err)
            raise timeout_error
        if self.error is not None:
            raise self.error
        return GuestResult(self.debug_exit.result, self.serial.text(),
                           self._finished_at - self._started_at)

    def _kick(self) -> None:
        self.vcpu.run_struct.immediate_exit = 1
        t = self._thread
        if t is not None and t.ident is not None and t.is_alive() and _kick_installed:
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def pause(self, timeout: float = 2.0) -> None:
        """Stop the vCPU at an instruction boundary, with any pending I/O completed."""
        if self._done.is_set() or self._thread is None:
            return
        self._resume.clear()
        self._pause_req.set()
        deadline = time.monotonic() + timeout
        self._kick()
        while not self._paused.wait(0.001):
            if self._done.is_set():
                return
            if time.monotonic() > deadline:
                raise GuestError(f"vCPU did not pause within {timeout:g} s")
            self._kick()

    def resume(self) -> None:
        self._pause_req.clear()
        self._paused.clear()
        self._resume.set()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        """End the vCPU thread (the guest does not run again)."""
        self._stop.set()
        self._resume.set()
        while self._thread is not None and self._thread.is_alive():
            self._kick()
            self._thread.join(0.005)
            timeout -= 0.005
            if timeout <= 0:
                raise GuestError("vCPU thread did not stop")

    def _vcpu_loop(self) -> None:
        run = self.vcpu.run_struct
        self.first_run_at = time.perf_counter()
        try:
            while not self._stop.is_set():
                if self._pause_req.is_set():
                    # Enter once with immediate_exit so KVM completes any pending I/O
                    # (the registers then hold what an IN returned), then park.
                    run.immediate_exit = 1
                    self.vcpu.run()
                    self._paused.set()
                    self._resume.wait()
                    run.immediate_exit = 0
                    continue
                if not self.vcpu.run():
                    if not (self._pause_req.is_set() or self._stop.is_set()):
                        run.immediate_exit = 0
                    continue
                self.exits += 1
                if self._handle_exit(run):
                    break
        except BaseException as err:  # noqa: BLE001 - reported through wait()
            self.error = err
        finally:
            self._finished_at = time.monotonic()
            self._paused.set()
            self._done.set()

    def _handle_exit(self, run: abi.kvm_run) -> bool:
        """Handle one exit; True when the guest is finished."""
        reason = run.exit_reason
        if reason == ExitReason.KVM_EXIT_IO:
            io = run.exit.io
            base = ctypes.addressof(run) + io.data_offset
            size = io.size
            if io.direction == abi.KVM_EXIT_IO_OUT:
                data = ctypes.string_at(base, size * io.count)
                for i in range(io.count):
                    self.bus.write(io.port, size, int.from_bytes(data[i * size:(i + 1) * size],
                                                                 "little"))
            else:
                for i in range(io.count):
                    value = self.bus.read(io.port, size)
                    ctypes.memmove(base + i * size, value.to_bytes(size, "little"), size)
            return self.debug_exit.fired.is_set()
        if reason == ExitReason.KVM_EXIT_MMIO:
            m = run.exit.mmio
            what = "write to" if m.is_write else "read from"
            raise GuestCrashed(f"guest {what} unmapped guest-physical address "
                               f"{m.phys_addr:#x} ({m.len} bytes)\n{self.describe_cpu()}",
                               self.serial.text())
        if reason == ExitReason.KVM_EXIT_HLT:
            raise GuestCrashed("guest halted with no way to wake it (no interrupt source)\n"
                               + self.describe_cpu(), self.serial.text())
        if reason == ExitReason.KVM_EXIT_SHUTDOWN:
            raise GuestCrashed("guest triple-faulted (KVM_EXIT_SHUTDOWN)\n" + self.describe_cpu(),
                               self.serial.text())
        if reason == ExitReason.KVM_EXIT_FAIL_ENTRY:
            f = run.exit.fail_entry
            raise GuestCrashed(f"VM entry failed: hardware reason "
                               f"{f.hardware_entry_failure_reason:#x}\n{self.describe_cpu()}",
                               self.serial.text())
        if reason == ExitReason.KVM_EXIT_INTERNAL_ERROR:
            e = run.exit.emulation_failure
            try:
                sub = abi.InternalError(e.suberror).name
            except ValueError:
                sub = str(e.suberror)
            insn = ""
            if (e.suberror == abi.InternalError.KVM_INTERNAL_ERROR_EMULATION
                    and e.ndata >= 2 and e.flags & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES):
                insn = f" instruction bytes: {bytes(e.insn_bytes[:e.insn_size]).hex(' ')}"
            raise GuestCrashed(f"KVM internal error {sub}{insn} (an instruction this host "
                               f"cannot emulate?)\n{self.describe_cpu()}", self.serial.text())
        if reason == ExitReason.KVM_EXIT_SYSTEM_EVENT:
            return True
        try:
            name = ExitReason(reason).name
        except ValueError:
            name = str(reason)
        raise GuestCrashed(f"unexpected exit {name}\n{self.describe_cpu()}", self.serial.text())

    # --- diagnostics ------------------------------------------------------------------
    def translate(self, vaddr: int, sregs: abi.kvm_sregs) -> int | None:
        """Guest-virtual to guest-physical through the guest's page tables (None: unmapped)."""
        if not sregs.cr0 & (1 << 31):
            return vaddr & 0xFFFFFFFF
        if not sregs.efer & (1 << 10):  # not long mode: not used by our guests
            return None
        table = sregs.cr3 & ~0xFFF & ((1 << 52) - 1)
        for level, shift in enumerate((39, 30, 21, 12)):
            try:
                entry = struct.unpack("<Q", self.memory.read(table + ((vaddr >> shift) & 511) * 8, 8))[0]
            except ValueError:
                return None
            if not entry & 1:
                return None
            if level in (1, 2) and entry & 0x80 or level == 3:
                mask = (1 << shift) - 1
                return (entry & ((1 << 52) - 1) & ~mask) | (vaddr & mask)
            table = entry & ((1 << 52) - 1) & ~0xFFF
        return None

    def describe_cpu(self) -> str:
        """Registers and the bytes at rip, for error messages."""
        try:
            regs, sregs = self.vcpu.get_regs(), self.vcpu.get_sregs()
        except KvmError as err:
            return f"(registers unavailable: {err})"
        names = [n for n, _ in abi.kvm_regs._fields_]
        lines = ["  " + "  ".join(f"{n}={getattr(regs, n):#018x}" for n in names[i:i + 4])
                 for i in range(0, len(names), 4)]
        lines.append(f"  cr0={sregs.cr0:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} "
                     f"efer={sregs.efer:#x} cs={sregs.cs.selector:#x}")
        gpa = self.translate(regs.rip + (sregs.cs.base if not sregs.efer & (1 << 10) else 0),
                             sregs)
        if gpa is not None and self.memory.is_ram(gpa, 16):
            lines.append(f"  code at rip: {self.memory.read(gpa, 16).hex(' ')}")
        else:
            lines.append("  code at rip: (not in RAM)")
        return "\n".join(lines)

    # --- teardown ---------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_thread", None) is not None and self._thread.is_alive():
            try:
                self.stop()
            except GuestError:
                log.error("vCPU thread did not stop; leaking its VM")
                return
        for obj in (getattr(self, "vcpu", None), getattr(self, "vm", None)):
            if obj is not None:
                obj.close()
        if getattr(self, "memory", None) is not None:
            self.memory.close()
        if getattr(self, "_own_kvm", False):
            self.kvm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

