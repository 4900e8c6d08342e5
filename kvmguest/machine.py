"""A runnable guest: VM + memory + devices + a thread per vCPU, with pause/resume.

    with Machine.boot("guests/build/hello.elf", memory=64 * MiB, vcpus=2) as m:
        result = m.run(timeout=10)
        print(result.exit_code, result.console)

By default the VM has KVM's in-kernel irqchip (PIC, IOAPIC, a LAPIC per vCPU) and PIT;
``irqchip=False`` keeps a polling-only machine with one vCPU. The boot CPU enters the
kernel at its PVH entry; the others wait, as on hardware, for INIT/SIPI from it.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from . import abi
from .arch.x86 import acpi, cpuid, cpumodel, image, layout, linux, quirks, regs
from .arch.x86.kernel import BootError, Module
from .arch.x86.platform import Platform, check_options, open_kvm
from .devices import Devices, acpi_pm
from .devices import virtio as virtio_devices
from .errors import EXIT_TIMEOUT, EXIT_TRIPLE_FAULT, KvmguestError, UsageError
from .arch.x86.complete import Completer, Refused
from .arch.x86.crash import crash_message, describe_cpu
from .exits import DirtyRingFullExit, InternalErrorExit, IoExit, MmioExit, ShutdownExit
from .kvm import Kvm
from .memory import GuestMemory
from .state import StateError, cpuid_from_hex, machine_shape, state_shape
from .vcpu import VcpuThread
from .vcpus import PAUSE_TIMEOUT, PauseTimeout, VcpuSet

__all__ = ["Machine", "GuestResult", "GuestError", "GuestCrashed", "GuestTimeout",
           "GuestTripleFault", "open_kvm"]

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 64 << 20


class GuestError(KvmguestError):
    """The guest did something the VMM cannot continue from."""

    def __init__(self, message: str, console: str = ""):
        super().__init__(message)
        self.console = console


class GuestCrashed(GuestError):
    """Triple fault, failed entry or an emulation failure; the message shows registers."""


class GuestTripleFault(GuestCrashed):
    """KVM_EXIT_SHUTDOWN: the CPU could not deliver a fault (or a kernel's last resort
    to reboot)."""

    exit_code = EXIT_TRIPLE_FAULT


class GuestTimeout(GuestError):
    """The guest did not finish within the timeout."""

    exit_code = EXIT_TIMEOUT


@dataclass
class GuestResult:
    exit_code: int | None   # the value written to the debug-exit port; None if none
    console: str
    seconds: float
    event: str | None = None    # "poweroff", "reset" or "panic" when the guest ended that way
    panic: str = ""             # the panic line, when it panicked


class Machine:
    """One VM: its RAM, ``vcpus`` vCPUs (each in a VcpuThread), a COM1 console, a
    debug-exit port and, by default, the in-kernel irqchip and PIT."""

    debugger = None     # a debugger (front.gdb.target.DebugTarget) sees the exits it may own first
    closed = False
    postcopy = None     # a migration's destination in post-copy: migrate.postcopy.Receiver

    def __init__(self, kernel: str | None = None, memory: int = DEFAULT_MEMORY,
                 cmdline: str = "", stream: Callable[[bytes], None] | None = None,
                 console_capacity: int = 1 << 20, guest_memory: GuestMemory | None = None,
                 kvm: Kvm | None = None, own_kvm: bool = False, vcpus: int = 1,
                 irqchip: bool = True, origin: dict | None = None,
                 modules: list[str] = (), cpu_model: str | None = None, pit: bool = True,
                 dirty_log: str = "auto", ring_entries: int | None = None,
                 cpuids: list | None = None, host_workarounds: bool = True,
                 virtio=(), defer_devices: bool = False, shared_memory: bool = False):
        """Boot ``kernel`` (PVH or multiboot), or (kernel None) build a VM around
        ``guest_memory`` for a restore. A ``kvm`` passed in stays the caller's unless
        ``own_kvm``. ``origin`` records what a restored guest was booted with (kernel,
        cmdline). ``modules`` are files handed to a multiboot kernel (QEMU's -initrd);
        ``cpu_model`` a QEMU-style -cpu string (kvmguest.arch.x86.cpumodel); ``pit`` False
        leaves out the PIT (QEMU's -machine pit=off). ``dirty_log``: "bitmap", "ring" or
        "auto" (the ring where KVM has it and RAM is large enough for the bitmap's full
        scan to cost more; see DIRTY_RING_FROM); ``ring_entries`` forces a ring size.
        ``cpuids`` (a restore): each vCPU's CPUID as saved, instead of the host's.
        ``host_workarounds``: a Linux kernel booted where KVM emulates kernel code
        (kvm_pvm) gets the parameters and CPU model it needs there (arch.x86.linux;
        ``workarounds`` lists what was added). ``virtio``: devices.DeviceSpec of the
        virtio devices (a Linux kernel is told where they are on its command line).
        ``defer_devices`` (prepare_restore): no devices yet; complete_restore adds them.
        ``shared_memory``: RAM in memfds (GuestMemory.shared), which a local migration
        hands to the destination instead of copying it."""
        check_options(vcpus, irqchip, dirty_log)
        if guest_memory is None and memory < layout.MIN_MEMORY:
            raise UsageError(f"memory {memory} is below the minimum "
                             f"{layout.MIN_MEMORY >> 20} MiB")
        self.origin, self.irqchip = dict(origin or {}), irqchip
        if len(virtio) > virtio_devices.MAX_DEVICES:
            raise UsageError(f"{len(virtio)} virtio devices: at most "
                             f"{virtio_devices.MAX_DEVICES}")
        self._plan_boot(kernel, cmdline, cpu_model, modules, host_workarounds, virtio,
                        layout.plan_regions(memory) if guest_memory is None
                        else guest_memory.regions)
        self._own_kvm = kvm is None or own_kvm
        self.kvm = kvm or open_kvm()
        self.platform = self.dirty = self.devices = None
        self.vcpus = VcpuSet()
        self.memory = guest_memory
        self.event: str | None = None    # "poweroff", "reset", "suspend" (S3), "panic", "killed",
        #                                  "timeout"
        self._wake = threading.Event()
        self.guest_requests: queue.Queue | None = None   # see listen_guest_requests()
        self._msr_indices: list[int] | None = None
        self.save_lock = threading.Lock()      # held by the one live save it may have
        try:
            self.platform = Platform(self.kvm, vcpus, memory if guest_memory is None
                                     else guest_memory.size, irqchip, pit, dirty_log,
                                     ring_entries)
            self.vm, self.pit = self.platform.vm, self.platform.pit
            if self.memory is None:
                plan = layout.plan_regions(memory)
                self.memory = (GuestMemory.shared if shared_memory
                               else GuestMemory.anonymous)(plan)
            self.platform.add_memory(self.memory)
            self._add_vcpus(vcpus, cpuids)
            self.dirty = self.platform.dirty_tracker(self.memory, [t.vcpu for t in self.vcpus])
            if not defer_devices:
                self._add_devices(stream, console_capacity, virtio)
        except BaseException:
            self.close()
            raise

    def _add_devices(self, stream, console_capacity: int, virtio) -> None:
        """Our devices (the console first), then the kernel, when there is one."""
        self.devices = Devices(self.memory, len(self.vcpus),
                               self.platform.irq_line if self.irqchip else None, stream,
                               console_capacity, self._power_event, self._rtc_alarm,
                               virtio, self.platform.vm)
        self.serial = self.console = self.devices.serial
        for hold, release in self.devices.virtio.pause_hooks():
            self.vcpus.on_parked.append(hold)
            self.vcpus.on_release.append(release)
        self.serial.watch_panics = bool(self.kernel.linux if self.kernel is not None
                                        else self.origin.get("linux"))
        self.completer = Completer(self.memory, self._xsave_size)
        if self.kernel is not None:
            self._load_kernel()

    def _plan_boot(self, kernel, cmdline, cpu_model, modules, host_workarounds, virtio,
                   regions) -> None:
        """The kernel, its command line (with what this host needs for Linux, unless
        ``host_workarounds`` is off), the CPU model and the modules, all checked: every
        boot error before any VM."""
        self.cmdline, self.workarounds = cmdline, []
        self.kernel = image.parse_kernel(kernel) if kernel is not None else None
        if host_workarounds and self.kernel is not None and self.kernel.linux \
                and quirks.emulating_host():
            self.cmdline, cpu_model, self.workarounds = linux.with_workarounds(cmdline,
                                                                              cpu_model)
        if self.kernel is not None and self.kernel.linux:
            # Where its devices are: the DSDT says so where there are ACPI tables (with
            # the irqchip); the command line where there are none.
            devices = [] if self.irqchip else virtio_devices.kernel_parameters(virtio)
            self.cmdline = " ".join([self.cmdline, *devices]).strip()
            linux.check_cmdline(self.kernel.path, self.cmdline, self.workarounds + devices)
        self.cpu_model = cpumodel.parse(cpu_model) if cpu_model else None
        self._check_kernel(modules, regions)

    def _check_kernel(self, modules, regions) -> None:
        """Check the kernel and its modules against the RAM ``regions``."""
        if modules and self.kernel is None:
            raise BootError("modules (--initrd) go with a kernel")
        self.modules = [Module(path) for path in modules]   # sized, not read yet
        if self.kernel is not None:
            image.loader(self.kernel).check(self.kernel, regions, self.cmdline, self.modules)

    def _add_vcpus(self, count: int, cpuids) -> None:
        """The vCPUs, each with its CPUID: the saved one (a restore), or the host's made
        consistent for it, with the -cpu model applied."""
        supported = self.kvm.get_supported_cpuid() if cpuids is None else None
        for i in range(count):
            v = self.vm.create_vcpu(i)
            thread = VcpuThread(v, self._handle_exit, None, self.memory.fault_was_flush)
            self.vcpus.add(thread)
            if cpuids is not None:
                thread.cpuid = cpuids[i]
            else:
                thread.cpuid = cpuid.copy_cpuid(supported)
                cpuid.setup_cpuid(thread.cpuid, i, count)
                if self.cpu_model is not None:
                    self.cpu_model.apply(thread.cpuid, supported)
            v.set_cpuid2(thread.cpuid)

    @classmethod
    def boot(cls, kernel: str, **kw) -> "Machine":
        """A machine with ``kernel`` loaded, ready to :meth:`start`."""
        return cls(kernel, **kw)

    @classmethod
    def from_state(cls, saved, memory: GuestMemory, **kw) -> "Machine":
        """A machine rebuilt around restored ``memory`` with ``saved`` (a decoded, checked
        MachineState) applied: as many vCPUs, the same irqchip choice; :meth:`start`
        resumes it."""
        disks = kw.pop("disks", None)
        stream, capacity = kw.pop("stream", None), kw.pop("console_capacity", 1 << 20)
        m = cls.prepare_restore(state_shape(saved), memory, **kw)
        try:
            m.complete_restore(saved, stream=stream, console_capacity=capacity, disks=disks)
        except BaseException:
            m.close()
            raise
        return m

    @classmethod
    def prepare_restore(cls, shape: dict, memory: GuestMemory, **kw) -> "Machine":
        """The part of a restore that needs only the machine's shape (state_shape: each
        vCPU's CPUID, the irqchip and PIT choice): the VM, its memory slots and vCPUs. A
        migration's destination makes it while pre-copy runs; :meth:`complete_restore`
        adds the devices and applies the state."""
        return cls(None, guest_memory=memory, vcpus=len(shape["cpuids"]),
                   irqchip=shape["irqchip"], pit=shape["pit"],
                   cpuids=[cpuid_from_hex(h) for h in shape["cpuids"]], defer_devices=True,
                   **kw)

    def complete_restore(self, saved, *, stream=None, console_capacity: int = 1 << 20,
                         disks: dict[str, str] | None = None) -> None:
        """Devices made as ``saved`` had them, then its state applied; StateError if
        ``saved`` is not of the shape the machine was prepared for (nothing applied)."""
        if self.devices is not None or state_shape(saved) != machine_shape(self):
            raise StateError("the state is not of the shape this machine was prepared for")
        self.origin = dict(saved.guest)
        self._add_devices(stream, console_capacity,
                          virtio_devices.specs_from_state(saved.devices, disks))
        problem = self.devices.check_restore(saved.devices)
        if problem:
            raise StateError(f"the snapshot's devices cannot be restored here: {problem}")
        saved.apply(self, cpuid=False)      # each vCPU got its saved CPUID when created

    # --- set-up -----------------------------------------------------------------------
    def _load_kernel(self) -> None:
        """Load the kernel and set the 32-bit start state of the boot CPU (PVH and
        multiboot share it; EAX/EBX differ). With the irqchip, the ACPI tables describe
        the CPUs; the other vCPUs wait for INIT/SIPI."""
        rsdp = acpi.write_tables(self.memory, len(self.vcpus),
                                 self.devices.virtio.resources()) if self.irqchip else 0
        start = image.loader(self.kernel).boot(self.memory, self.kernel, self.cmdline,
                                               self.modules, self.platform, rsdp)
        regs.setup_gdt(self.memory)
        bsp = self.vcpus[0].vcpu
        sregs = bsp.get_sregs()
        regs.setup_sregs(sregs)
        bsp.set_sregs(sregs)
        bsp.set_regs(start)

    def msr_indices(self) -> list[int]:
        """The MSRs to save (KVM_GET_MSR_INDEX_LIST), read once per machine."""
        if self._msr_indices is None:
            self._msr_indices = self.kvm.get_msr_index_list()
        return self._msr_indices

    def _power_event(self, kind: str) -> None:
        """The guest asked to power off, reset or suspend (ACPI PM1 control, 0xcf9)."""
        self.event = kind

    def _rtc_alarm(self) -> None:
        if self.devices.acpi_pm.wake(acpi_pm.STS_RTC):
            self._wake.set()

    def _suspend(self, thread: VcpuThread) -> None:
        """S3 on the vCPU that asked for it (Platform.suspend); a wake clears the event."""
        if self.platform.suspend(self.vcpus, self.memory, thread, self._wake):
            self.event = None

    # --- running ----------------------------------------------------------------------
    @property
    def exits(self) -> int:
        return self.vcpus.exits

    @property
    def first_run_at(self) -> float | None:
        return self.vcpus.first_run_at

    @property
    def error(self) -> BaseException | None:
        """What ended the guest when a vCPU failed (None while it runs or when it ended
        as a guest does)."""
        return self.vcpus.error

    def start(self, paused: bool = False) -> None:
        """Start the vCPUs; ``paused``: stopped before their first instruction, held by
        one pause (``resume_all`` lets them run)."""
        self.vcpus.start(paused)
        if self.postcopy is not None:
            self.postcopy.go()           # a migration's destination: the pages still to come

    def run(self, timeout: float | None = None) -> GuestResult:
        self.start()
        return self.wait(timeout)

    @property
    def running(self) -> bool:
        return self.vcpus.running

    def wait_done(self, timeout: float | None = None) -> bool:
        """Wait until the guest has finished (exit, crash or stop); False on timeout."""
        return self.vcpus.wait_done(timeout)

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for the guest to finish; raise its error, or GuestTimeout (guest stopped)."""
        if not self.vcpus.wait_done(timeout):
            timeout_error = GuestTimeout(f"guest did not finish within {timeout:g} s",
                                         console=self.serial.text())
            self.event = self.event or "timeout"   # set before the vCPUs end: whoever sees
            #                                       them end (a debugger) knows why
            try:
                self.stop()
            except GuestError as err:    # the timeout is what the caller must hear about
                log.error("after the timeout: %s", err)
            raise timeout_error
        self.vcpus.join(1.0)            # the others were told to stop: let them end
        if self.vcpus.error is not None:
            raise self.vcpus.error
        return GuestResult(self.devices.debug_exit.result, self.serial.text(),
                           self.vcpus.finished_at - self.vcpus.started_at,
                           self.event, self.serial.panic_line or "")

    def pause_all(self, timeout: float = PAUSE_TIMEOUT) -> None:
        """Park every vCPU at an instruction boundary (VcpuSet.pause_all: pauses nest);
        GuestError if one does not park within ``timeout`` (the guest runs on)."""
        try:
            self.vcpus.pause_all(timeout)
        except PauseTimeout as err:
            raise GuestError(str(err)) from None

    def resume_all(self) -> None:
        """Release every parked vCPU together (when this ends the last pause)."""
        self.vcpus.resume_all()

    @property
    def paused(self) -> bool:
        return self.vcpus.paused

    def listen_guest_requests(self) -> queue.Queue:
        """From now on a guest's request on the kvmguest port (devices/guest_port.py) holds
        the vCPU that made it, right after its OUT, and is put on the returned queue as
        (request, vCPU index). The listener handles it with the guest paused
        (``pause_all``) and releases the vCPU with the matching ``resume_all``."""
        if self.guest_requests is None:
            self.guest_requests = queue.Queue()
        return self.guest_requests

    def _guest_request(self, thread: VcpuThread) -> None:
        req = self.devices.guest_port.take()
        if self.guest_requests is None:
            return                             # nobody listens: the guest runs on
        thread.park_after_exit()               # parks before it runs again
        self.guest_requests.put((req, thread.index))

    def stop(self, timeout: float = 5.0) -> None:
        """End every vCPU thread (the guest does not run again)."""
        late = self.vcpus.stop(timeout)
        if late:
            raise GuestError(f"vCPU thread {late} did not stop")

    def _handle_exit(self, thread: VcpuThread, ex) -> bool:
        """One exit of one vCPU: port I/O goes to the bus; anything else ends the guest
        (a crash, with the registers, or a reset/power-off). True when it is finished."""
        if isinstance(ex, DirtyRingFullExit):
            self.dirty.on_ring_full(thread.index)
            return False
        if isinstance(ex, IoExit):
            self.devices.bus.handle_io(ex)
            if self.devices.guest_port.request is not None:
                self._guest_request(thread)
            self._check_panic()
            if self.event is not None:
                if self.event == "suspend":
                    self._suspend(thread)
                    return thread.stopping
                return True                   # poweroff or reset: the run ends
            return self.devices.debug_exit.fired.is_set()
        if self.debugger is not None and self.debugger.on_exit(thread, ex):
            return False                      # a breakpoint or watchpoint: it parks
        if isinstance(ex, MmioExit) and self.devices.handle_mmio(ex):
            return self._check_panic()        # hvc0 prints through MMIO
        try:
            if isinstance(ex, InternalErrorExit) and self.completer.complete(thread.vcpu,
                                                                             ex.insn):
                return False                  # an instruction this host's KVM could not do
            crash = crash_message(ex)
        except Refused as err:
            crash = str(err)
        if crash is None:
            return True
        kind = GuestTripleFault if isinstance(ex, ShutdownExit) else GuestCrashed
        raise kind(f"{crash}\n{self.describe_cpu(thread.vcpu)}", self.serial.text())

    def _check_panic(self) -> bool:
        """Did a Linux kernel print its panic line (on any console)? It would spin
        forever: the run ends."""
        if self.serial.panic_line is not None and self.event is None:
            self.event = "panic"
        return self.event == "panic"

    def _xsave_size(self) -> int:
        """KVM_CAP_XSAVE2's size for KVM_GET_XSAVE2 (0: use the 4 KiB KVM_GET_XSAVE)."""
        return self.kvm.check_extension(abi.Cap.KVM_CAP_XSAVE2)

    # --- diagnostics ------------------------------------------------------------------
    def describe_cpu(self, vcpu=None) -> str:
        """Registers and the bytes at rip of ``vcpu`` (the boot CPU by default)."""
        return describe_cpu(self.memory, vcpu or self.vcpus[0].vcpu, len(self.vcpus))

    # --- teardown ---------------------------------------------------------------------
    def close(self) -> None:
        self.closed = True
        if self.devices is not None:
            self.devices.close()
        if any(t.started and not t.done.is_set() for t in self.vcpus):
            try:
                self.stop()
            except GuestError:
                log.error("vCPU thread did not stop; leaking its VM")
                return
        if self.dirty is not None:
            self.dirty.close()          # the rings are mapped from the vCPU fds
        for t in self.vcpus:
            t.vcpu.close()
        if self.platform is not None:
            self.platform.close()
        if self.memory is not None:
            self.memory.close()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

