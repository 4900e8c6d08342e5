"""vCPU, VM and machine state as typed records, captured and applied in Firecracker's order.

:class:`VcpuState`, :class:`VmState` and :class:`MachineState` each capture their object,
check themselves, apply themselves, and convert to and from the JSON a snapshot holds
(docs/FORMAT.md); devices own theirs (``save_state``/``restore_state``). Each KVM struct
is kept as the hex of its raw bytes and checked against ``sizeof`` when decoded. Capture
requires parked (or never-run) vCPUs.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field, fields

from . import abi
from .abi import Cap
from .arch.x86.regs import EFER_LMA, X86_CR0_PE
from .devices import check_device_states
from .errors import EXIT_BAD_INPUT, KvmguestError

log = logging.getLogger(__name__)

STATE_FORMAT = "kvmguest-state"
STATE_VERSION = 2              # 2: several vCPUs, LAPIC, irqchip and PIT; 1 still restores
READABLE_VERSIONS = (1, 2)
MAX_VCPUS = 1024
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0


class StateError(KvmguestError, ValueError):
    """Saved state that cannot be applied (wrong sizes, missing fields)."""

    exit_code = EXIT_BAD_INPUT


def _hex(struct) -> str:
    return bytes(struct).hex()


def _load(struct_type, text: str, what: str):
    try:
        data = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise StateError(f"state field {what} is not hex") from None
    if len(data) != ctypes.sizeof(struct_type):
        raise StateError(f"state field {what} is {len(data)} bytes, expected "
                         f"{ctypes.sizeof(struct_type)}")
    return struct_type.from_buffer_copy(data)


def readable_msrs(vcpu, indices: list[int]) -> dict[int, int]:
    """Read every MSR of the list that KVM lets us read (it stops at the first it can't)."""
    values: dict[int, int] = {}
    pending = list(indices)
    while pending:
        got = vcpu.get_msrs(pending)
        values.update(got)
        if len(got) < len(pending):
            log.debug("MSR %#x not readable; skipped", pending[len(got)])
        pending = pending[len(got) + 1:]
    return values


def restore_msrs(vcpu, items: list[tuple[int, int]]) -> None:
    """KVM_SET_MSRS stops at the first MSR it refuses. One it refuses whose current value
    already equals the saved one (e.g. an unused paravirt MSR at 0) is skipped; any other
    is an error naming it."""
    pending = list(items)
    while pending:
        done = vcpu.set_msrs(pending)
        if done >= len(pending):
            return
        index, value = pending[done]
        current = readable_msrs(vcpu, [index]).get(index)
        if current != value:
            raise StateError(f"KVM refused MSR {index:#x} = {value:#x} (now {current!r})")
        log.debug("MSR %#x refused but already %#x; skipped", index, value)
        pending = pending[done + 1:]


def apply_calls(target, calls: list[tuple[str, object]]) -> None:
    """Replay decoded state: ``target.method(argument)`` for each call, in order."""
    for name, arg in calls:
        if name == "msrs":
            restore_msrs(target, arg)
        else:
            getattr(target, name)(arg)


# --- one vCPU ---------------------------------------------------------------------------
_STRUCTS = [("mp_state", abi.kvm_mp_state), ("regs", abi.kvm_regs), ("sregs", abi.kvm_sregs),
            ("xcrs", abi.kvm_xcrs), ("debugregs", abi.kvm_debugregs),
            ("vcpu_events", abi.kvm_vcpu_events)]


def cpuid_from_hex(text: str):
    data = bytes.fromhex(text)
    if len(data) < 8:
        raise StateError("state field cpuid is too short")
    nent = int.from_bytes(data[:4], "little")
    if nent > abi.KVM_MAX_CPUID_ENTRIES or len(data) != 8 + nent * ctypes.sizeof(
            abi.kvm_cpuid_entry2):
        raise StateError("state field cpuid has an inconsistent entry count")
    cpuid = abi.flexible(abi.kvm_cpuid2, abi.kvm_cpuid_entry2, nent)()
    ctypes.memmove(ctypes.addressof(cpuid), data, len(data))
    return cpuid


@dataclass
class VcpuState:
    """One vCPU's architectural state, each KVM struct as the hex of its bytes."""
    cpuid: str
    mp_state: str
    regs: str
    sregs: str
    xsave: str
    xcrs: str
    debugregs: str
    msrs: list
    vcpu_events: str
    lapic: str | None = None          # with the in-kernel irqchip

    def check(self) -> None:
        """Decode every field without touching KVM: StateError if anything is malformed."""
        try:
            cpuid_from_hex(self.cpuid)
            for name, typ in _STRUCTS:
                _load(typ, getattr(self, name), name)
            if self.lapic is not None:
                _load(abi.kvm_lapic_state, self.lapic, "lapic")
            bytes.fromhex(self.xsave)
            if len(self.xsave) < 2 * ctypes.sizeof(abi.kvm_xsave):
                raise StateError("state field xsave is shorter than 4096 bytes")
            if not isinstance(self.msrs, list):
                raise StateError("state field msrs is not a list")
            for pair in self.msrs:
                index, value = pair
                if not (isinstance(index, int) and isinstance(value, int)
                        and 0 <= index < 1 << 32 and 0 <= value < 1 << 64):
                    raise StateError(f"bad MSR entry {pair!r}")
        except (KeyError, TypeError) as err:
            raise StateError(f"vCPU state has a bad field: {err}") from None
        except StateError:
            raise
        except ValueError as err:
            raise StateError(str(err)) from None

    def saved_cpuid(self):
        """The saved CPUID, as the struct KVM_SET_CPUID2 takes."""
        return cpuid_from_hex(self.cpuid)

    def decoded(self, cpuid: bool = True) -> list[tuple[str, object]]:
        """What :meth:`apply` does, each field decoded (and checked) once: the vCPU calls
        in order, as (method, argument); "msrs" is restore_msrs. A reset in place keeps
        this and replays it (apply_calls) instead of decoding the hex every time.

        cpuid -> mp_state -> regs -> sregs -> xsave -> xcrs -> debugregs -> LAPIC ->
        MSRs (TSC before TSC-deadline) -> vcpu events. ``cpuid`` False for a vCPU that has
        run already (a reset in place): KVM refuses to change CPUID then, and it is the
        snapshot's anyway."""
        self.check()
        calls: list[tuple[str, object]] = []
        if cpuid:
            calls.append(("set_cpuid2", cpuid_from_hex(self.cpuid)))  # before what needs it
        calls += [("set_mp_state", _load(abi.kvm_mp_state, self.mp_state, "mp_state")),
                  ("set_regs", _load(abi.kvm_regs, self.regs, "regs")),
                  # sregs before xsave: CR4.OSXSAVE
                  ("set_sregs", _load(abi.kvm_sregs, self.sregs, "sregs")),
                  ("set_xsave", bytes.fromhex(self.xsave)),
                  ("set_xcrs", _load(abi.kvm_xcrs, self.xcrs, "xcrs")),
                  ("set_debugregs", _load(abi.kvm_debugregs, self.debugregs, "debugregs"))]
        if self.lapic is not None:
            # Before the MSRs: the TSC-deadline MSR only takes in the LAPIC's deadline mode.
            calls.append(("set_lapic", _load(abi.kvm_lapic_state, self.lapic, "lapic")))
        msrs = dict((int(i), int(v)) for i, v in self.msrs)
        # The TSC first: the deadline is relative to it.
        ordered = sorted(msrs, key=lambda i: (i != MSR_IA32_TSC, i == MSR_IA32_TSC_DEADLINE, i))
        calls.append(("msrs", [(i, msrs[i]) for i in ordered]))
        calls.append(("set_vcpu_events", _load(abi.kvm_vcpu_events, self.vcpu_events,
                                               "vcpu_events")))
        return calls

    def apply(self, vcpu, cpuid: bool = True) -> None:
        """Put this state into ``vcpu`` (the order is :meth:`decoded`'s)."""
        apply_calls(vcpu, self.decoded(cpuid))

    def to_json(self) -> dict:
        """Field by field (dataclasses.asdict deep-copies: ~0.1 ms a save)."""
        d = {f: getattr(self, f) for f in _VCPU_FIELDS}
        d["msrs"] = [[i, v] for i, v in self.msrs]
        if self.lapic is not None:
            d["lapic"] = self.lapic
        return d

    @classmethod
    def from_json(cls, d) -> "VcpuState":
        if not isinstance(d, dict):
            raise StateError("a vCPU state is not an object")
        try:
            v = cls(**{f.name: d[f.name] for f in fields(cls) if f.name != "lapic"},
                    lapic=d.get("lapic"))
        except KeyError as err:
            raise StateError(f"vCPU state is missing field {err}") from None
        for f in fields(cls):
            value = getattr(v, f.name)
            if f.name != "msrs" and value is not None and not isinstance(value, str):
                raise StateError(f"state field {f.name} is not hex")
        v.check()
        return v


_VCPU_FIELDS = [f.name for f in fields(VcpuState) if f.name not in ("msrs", "lapic")]


def cpuid_bytes(cpuid) -> bytes:
    """A struct kvm_cpuid2 as the bytes a state's ``cpuid`` holds (in hex)."""
    return ctypes.string_at(ctypes.addressof(cpuid),
                            8 + cpuid.hdr.nent * ctypes.sizeof(abi.kvm_cpuid_entry2))


def read_vcpu(vcpu, cpuid, msr_indices: list[int], xsave2_size: int,
              lapic: bool = False) -> dict:
    """A parked vCPU's state as KVM gave it (bytes, and the MSRs as (index, value)
    pairs), not yet encoded: inside a save's downtime only the ioctls run, the hex and
    the records come after (encode_vcpu). mp_state first, then regs, sregs, xsave, xcrs,
    debugregs, the LAPIC, MSRs, vcpu events last (the other reads must not change what is
    pending)."""
    return {"cpuid": cpuid_bytes(cpuid),
            "mp_state": bytes(vcpu.get_mp_state()),
            "regs": bytes(vcpu.get_regs()),
            "sregs": bytes(vcpu.get_sregs()),
            "xsave": vcpu.get_xsave(xsave2_size),
            "xcrs": bytes(vcpu.get_xcrs()),
            "debugregs": bytes(vcpu.get_debugregs()),
            "lapic": bytes(vcpu.get_lapic()) if lapic else None,
            "msrs": readable_msrs(vcpu, msr_indices),
            "vcpu_events": bytes(vcpu.get_vcpu_events())}


def encode_vcpu(raw: dict) -> VcpuState:
    return VcpuState(**{f: raw[f].hex() for f in _VCPU_FIELDS},
                     msrs=[[i, v] for i, v in raw["msrs"].items()],
                     lapic=raw["lapic"].hex() if raw["lapic"] is not None else None)


# --- the VM --------------------------------------------------------------------------------
CHIPS = (abi.IrqChip.KVM_IRQCHIP_PIC_MASTER, abi.IrqChip.KVM_IRQCHIP_PIC_SLAVE,
         abi.IrqChip.KVM_IRQCHIP_IOAPIC)


@dataclass
class VmState:
    """VM-wide state: the KVM clock; with the in-kernel irqchip, the PICs, IOAPIC and
    (unless the machine was made without one) the PIT."""
    clock: str | None = None
    irqchip: list | None = None
    pit2: str | None = None

    @staticmethod
    def read(vm, irqchip: bool, pit: bool = True) -> tuple:
        """The VM-wide state as KVM gave it (structs), encoded by :meth:`encode`."""
        return (vm.get_clock() if vm.check_extension(Cap.KVM_CAP_ADJUST_CLOCK) > 0 else None,
                [vm.get_irqchip(c) for c in CHIPS] if irqchip else None,
                vm.get_pit2() if irqchip and pit else None)

    @classmethod
    def encode(cls, raw: tuple) -> "VmState":
        clock, chips, pit2 = raw
        return cls(clock=_hex(clock) if clock is not None else None,
                   irqchip=[_hex(c) for c in chips] if chips is not None else None,
                   pit2=_hex(pit2) if pit2 is not None else None)

    def check(self) -> None:
        try:
            if self.clock is not None:
                _load(abi.kvm_clock_data, self.clock, "clock")
            if self.irqchip is not None:
                if not isinstance(self.irqchip, list) or len(self.irqchip) != len(CHIPS):
                    raise StateError("irqchip state must hold the two PICs and the IOAPIC")
                for raw, want in zip(self.irqchip, CHIPS):
                    if _load(abi.kvm_irqchip, raw, "irqchip").chip_id != want:
                        raise StateError("irqchip state is out of order")
            if self.pit2 is not None:
                if self.irqchip is None:
                    raise StateError("PIT state without the irqchip")
                _load(abi.kvm_pit_state2, self.pit2, "pit2")
        except TypeError as err:
            raise StateError(f"VM state has a bad field: {err}") from None

    def decoded(self, vm) -> list[tuple[str, object]]:
        """PIT, clock, then the irqchip (after the vCPUs' LAPICs: pending IOAPIC/PIC
        interrupts are delivered to LAPICs that already hold their restored state), as
        (VM method, argument), decoded once.

        The clock is set to its value at the save: guest time continues from the pause,
        it does not jump forward by the time the snapshot sat on disk (nor backwards)."""
        self.check()
        calls: list[tuple[str, object]] = []
        if self.pit2 is not None:
            calls.append(("set_pit2", _load(abi.kvm_pit_state2, self.pit2, "pit2")))
        if self.clock is not None and vm.check_extension(Cap.KVM_CAP_ADJUST_CLOCK) > 0:
            clock = _load(abi.kvm_clock_data, self.clock, "clock")
            calls.append(("set_clock", abi.kvm_clock_data(clock=clock.clock)))
        for raw in self.irqchip or []:
            calls.append(("set_irqchip", _load(abi.kvm_irqchip, raw, "irqchip")))
        return calls

    def apply(self, vm) -> None:
        apply_calls(vm, self.decoded(vm))

    def to_json(self) -> dict:
        return {k: v for k, v in (("clock", self.clock),
                                  ("irqchip", self.irqchip and list(self.irqchip)),
                                  ("pit2", self.pit2)) if v is not None}

    @classmethod
    def from_json(cls, d) -> "VmState":
        if not isinstance(d, dict):
            raise StateError("state field vm is not an object")
        v = cls(d.get("clock"), d.get("irqchip"), d.get("pit2"))
        v.check()
        return v


# --- the machine -----------------------------------------------------------------------------
@dataclass
class MachineState:
    """Everything but RAM: every vCPU, the VM, our devices (each device's own
    save_state/restore_state record), and what the guest was booted with."""
    vcpus: list[VcpuState]
    vm: VmState
    devices: dict
    guest: dict = field(default_factory=dict)
    version: int = STATE_VERSION

    @property
    def irqchip(self) -> bool:
        return self.vm.irqchip is not None

    def check(self) -> None:
        if not 1 <= len(self.vcpus) <= MAX_VCPUS:
            raise StateError(f"state must hold 1 to {MAX_VCPUS} vCPUs")
        if len(self.vcpus) > 1 and not self.irqchip:
            raise StateError("several vCPUs without an irqchip")
        for v in self.vcpus:
            if self.irqchip != (v.lapic is not None):
                raise StateError("LAPIC state does not match the irqchip")
        if not isinstance(self.devices, dict) or "serial" not in self.devices:
            raise StateError("state has no serial device state")
        problem = check_device_states(self.devices)
        if problem:
            raise StateError(problem)

    def apply(self, machine, cpuid: bool = True) -> None:
        """Every vCPU first (all before any runs), VM-wide state after, devices last.
        ``cpuid`` False when the vCPUs have run (VcpuState.apply)."""
        self.decoded(machine, cpuid).apply(machine)

    def decoded(self, machine, cpuid: bool = True) -> "DecodedState":
        """This state decoded for ``machine`` once, to apply (again and again: a reset)."""
        if (len(self.vcpus), self.irqchip) != (len(machine.vcpus), machine.irqchip):
            raise StateError("the machine does not have the saved vCPUs and irqchip")
        return DecodedState([v.decoded(cpuid) for v in self.vcpus], self.vm.decoded(machine.vm),
                            self.devices)

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "version": self.version,
                "vcpus": [v.to_json() for v in self.vcpus], "vm": self.vm.to_json(),
                "devices": self.devices, "guest": self.guest}

    @classmethod
    def from_json(cls, d) -> "MachineState":
        """Decode and check a saved state (any readable version); StateError if not."""
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT \
                or d.get("version") not in READABLE_VERSIONS:
            fmt_, ver = (d.get("format"), d.get("version")) if isinstance(d, dict) else (d, None)
            raise StateError(f"state format {fmt_!r} version {ver!r} is not supported")
        vcpus = d.get("vcpus")
        if not isinstance(vcpus, list) or not 1 <= len(vcpus) <= MAX_VCPUS:
            raise StateError(f"state must hold 1 to {MAX_VCPUS} vCPUs")
        guest = d.get("guest", {})
        state = cls([VcpuState.from_json(v) for v in vcpus], VmState.from_json(d.get("vm", {})),
                    d.get("devices"), guest if isinstance(guest, dict) else {}, d["version"])
        state.check()
        return state


@dataclass
class ReadState:
    """A paused machine's state as read (read_machine), encoded later: a save's downtime
    or a checkpoint's pause holds only the reads (on this host every line of Python run
    right after a pause costs 3-10x what it costs warm)."""
    vcpus: list[dict]
    vm: tuple
    devices: dict
    guest: dict

    def encoded(self) -> MachineState:
        return MachineState(vcpus=[encode_vcpu(v) for v in self.vcpus],
                            vm=VmState.encode(self.vm), devices=self.devices, guest=self.guest)

    def to_json(self) -> dict:
        return self.encoded().to_json()


def read_machine(machine) -> ReadState:
    """Everything but RAM, as read, for a machine whose vCPUs are all parked (or never
    ran): every vCPU is read only once all are parked (a vCPU read while another still
    ran could miss the IPI that one sends it next)."""
    if machine.running and not machine.paused:
        raise RuntimeError("machine must be paused to capture its state")
    xsave_size = machine.kvm.check_extension(Cap.KVM_CAP_XSAVE2)   # 0: use KVM_GET_XSAVE
    indices = machine.msr_indices()
    origin = machine.kernel.path if machine.kernel else machine.origin.get("kernel")
    cmdline = machine.cmdline if machine.kernel else machine.origin.get("cmdline", "")
    linux = machine.kernel.linux if machine.kernel else machine.origin.get("linux", False)
    return ReadState(vcpus=[read_vcpu(t.vcpu, t.cpuid, indices, xsave_size, machine.irqchip)
                            for t in machine.vcpus],
                     vm=machine.platform.read_state(),
                     devices=machine.devices.save_state(),
                     guest={"kernel": origin, "cmdline": cmdline, "memory": machine.memory.size,
                            "linux": linux})


def state_shape(state: MachineState) -> dict:
    """What a restore makes before any state is applied (Machine.prepare_restore): each
    vCPU's CPUID (hex), the irqchip and PIT choice."""
    return {"cpuids": [v.cpuid for v in state.vcpus], "irqchip": state.irqchip,
            "pit": state.vm.pit2 is not None}


def machine_shape(machine) -> dict:
    """state_shape of what a save of the running ``machine`` will hold, read without
    pausing it (a migration's source sends it first)."""
    return {"cpuids": [cpuid_bytes(t.cpuid).hex() for t in machine.vcpus],
            "irqchip": machine.irqchip, "pit": bool(machine.pit)}


# What a save writes: a snapshot's state is MachineState.to_json().
def save_machine(machine) -> dict:
    """Everything but RAM, for a machine whose vCPUs are all parked (or never ran)."""
    return read_machine(machine).to_json()


# The paravirtual MSRs a Linux guest registers with KVM (Documentation/virt/kvm/x86/msr.rst),
# named for `inspect`: a snapshot of a booting Linux must carry every one it wrote.
KVM_PV_MSRS = {0x4B564D00: "kvm-clock wall clock", 0x4B564D01: "kvm-clock system time",
               0x4B564D02: "async PF", 0x4B564D03: "steal time", 0x4B564D04: "PV EOI",
               0x4B564D05: "poll control", 0x4B564D06: "async PF interrupt",
               0x4B564D07: "async PF ack", 0x4B564D08: "migration control"}


def vcpu_summary(state: dict) -> dict:
    """The first vCPU's registers and mode, and the guest's origin, for `inspect`
    (``state`` has passed MachineState.from_json)."""
    v = state["vcpus"][0]
    regs = _load(abi.kvm_regs, v["regs"], "regs")
    sregs = _load(abi.kvm_sregs, v["sregs"], "sregs")
    if sregs.efer & EFER_LMA:
        mode = "64-bit long mode"
    elif sregs.cr0 & X86_CR0_PE:
        mode = "32-bit protected mode"
    else:
        mode = "real mode"
    guest = state.get("guest", {})
    pv = {KVM_PV_MSRS[i]: val for i, val in v["msrs"] if i in KVM_PV_MSRS and val}
    return {"rip": regs.rip, "rsp": regs.rsp, "cr3": sregs.cr3, "mode": mode,
            "msrs": len(v["msrs"]), "pv_msrs": pv, "kernel": guest.get("kernel"), "cmdline": guest.get("cmdline"),
            "xsave_bytes": len(v["xsave"]) // 2, "regs_bytes": ctypes.sizeof(abi.kvm_regs)}


@dataclass
class DecodedState:
    """A MachineState decoded for one machine (MachineState.decoded)."""
    vcpus: list[list[tuple[str, object]]]
    vm: list[tuple[str, object]]
    devices: dict                  # each device's saved state, by name (checked)

    def apply(self, machine) -> None:
        for thread, calls in zip(machine.vcpus, self.vcpus):
            apply_calls(thread.vcpu, calls)
        machine.platform.apply_state(self.vm)
        machine.devices.restore_state(self.devices)
