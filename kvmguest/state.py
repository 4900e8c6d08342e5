"""vCPU, VM and device state: capture and apply, in Firecracker's order.

The state is a JSON-able dict; each KVM struct is stored as the hex of its raw bytes and
checked against ``sizeof`` when applied. Capture requires a paused (or never-run) vCPU.
"""

from __future__ import annotations

import ctypes
import logging

from . import abi
from .abi import Cap
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


def save_vcpu(vcpu, cpuid, msr_indices: list[int], xsave2_size: int,
              lapic: bool = False) -> dict:
    """mp_state first, then regs, sregs, xsave, xcrs, debugregs, the LAPIC (with an
    in-kernel irqchip), MSRs, vcpu events last (events last: the other reads must not
    change what is pending)."""
    out = {"cpuid": bytes(cpuid)[:8 + cpuid.hdr.nent * ctypes.sizeof(abi.kvm_cpuid_entry2)].hex()}
    out["mp_state"] = _hex(vcpu.get_mp_state())
    out["regs"] = _hex(vcpu.get_regs())
    out["sregs"] = _hex(vcpu.get_sregs())
    out["xsave"] = vcpu.get_xsave(xsave2_size).hex()
    out["xcrs"] = _hex(vcpu.get_xcrs())
    out["debugregs"] = _hex(vcpu.get_debugregs())
    if lapic:
        out["lapic"] = _hex(vcpu.get_lapic())
    out["msrs"] = [[i, v] for i, v in readable_msrs(vcpu, msr_indices).items()]
    out["vcpu_events"] = _hex(vcpu.get_vcpu_events())
    return out


def _cpuid_from_hex(text: str):
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


def check_vcpu_state(state: dict) -> None:
    """Decode every field without touching KVM: StateError if anything is malformed."""
    try:
        _cpuid_from_hex(state["cpuid"])
        for name, typ in _STRUCTS:
            _load(typ, state[name], name)
        if "lapic" in state:
            _load(abi.kvm_lapic_state, state["lapic"], "lapic")
        bytes.fromhex(state["xsave"])
        if len(state["xsave"]) < 2 * ctypes.sizeof(abi.kvm_xsave):
            raise StateError("state field xsave is shorter than 4096 bytes")
        for pair in state["msrs"]:
            index, value = pair
            if not (isinstance(index, int) and isinstance(value, int)
                    and 0 <= index < 1 << 32 and 0 <= value < 1 << 64):
                raise StateError(f"bad MSR entry {pair!r}")
    except (KeyError, TypeError) as err:
        raise StateError(f"vCPU state is missing or has a bad field: {err}") from None
    except ValueError as err:
        raise StateError(str(err)) from None


_STRUCTS = [("mp_state", abi.kvm_mp_state), ("regs", abi.kvm_regs), ("sregs", abi.kvm_sregs),
            ("xcrs", abi.kvm_xcrs), ("debugregs", abi.kvm_debugregs),
            ("vcpu_events", abi.kvm_vcpu_events)]


def restore_vcpu(vcpu, state: dict) -> None:
    """cpuid -> mp_state -> regs -> sregs -> xsave -> xcrs -> debugregs -> LAPIC -> MSRs
    (TSC before TSC-deadline) -> vcpu events."""
    check_vcpu_state(state)
    vcpu.set_cpuid2(_cpuid_from_hex(state["cpuid"]))      # before anything that depends on it
    vcpu.set_mp_state(_load(abi.kvm_mp_state, state["mp_state"], "mp_state"))
    vcpu.set_regs(_load(abi.kvm_regs, state["regs"], "regs"))
    vcpu.set_sregs(_load(abi.kvm_sregs, state["sregs"], "sregs"))  # before xsave: CR4.OSXSAVE
    vcpu.set_xsave(bytes.fromhex(state["xsave"]))
    vcpu.set_xcrs(_load(abi.kvm_xcrs, state["xcrs"], "xcrs"))
    vcpu.set_debugregs(_load(abi.kvm_debugregs, state["debugregs"], "debugregs"))
    if "lapic" in state:
        # Before the MSRs: the TSC-deadline MSR only takes in the LAPIC's deadline mode.
        vcpu.set_lapic(_load(abi.kvm_lapic_state, state["lapic"], "lapic"))
    msrs = dict((int(i), int(v)) for i, v in state["msrs"])
    # The TSC first: the deadline is relative to it.
    ordered = sorted(msrs, key=lambda i: (i != MSR_IA32_TSC, i == MSR_IA32_TSC_DEADLINE, i))
    restore_msrs(vcpu, [(i, msrs[i]) for i in ordered])
    vcpu.set_vcpu_events(_load(abi.kvm_vcpu_events, state["vcpu_events"], "vcpu_events"))


CHIPS = (abi.IrqChip.KVM_IRQCHIP_PIC_MASTER, abi.IrqChip.KVM_IRQCHIP_PIC_SLAVE,
         abi.IrqChip.KVM_IRQCHIP_IOAPIC)


def save_vm(vm, irqchip: bool) -> dict:
    """The KVM clock; with the in-kernel irqchip, the PICs and IOAPIC and the PIT."""
    out = {}
    if vm.check_extension(Cap.KVM_CAP_ADJUST_CLOCK) > 0:
        out["clock"] = _hex(vm.get_clock())
    if irqchip:
        out["irqchip"] = [_hex(vm.get_irqchip(c)) for c in CHIPS]
        out["pit2"] = _hex(vm.get_pit2())
    return out


def restore_vm(vm, state: dict) -> None:
    """PIT, clock, then the irqchip (after the vCPUs' LAPICs: pending IOAPIC/PIC
    interrupts are delivered to LAPICs that already hold their restored state).

    The clock is set to its value at the save: guest time continues from the pause, it
    does not jump forward by the time the snapshot sat on disk (nor backwards)."""
    if "pit2" in state:
        vm.set_pit2(_load(abi.kvm_pit_state2, state["pit2"], "pit2"))
    if "clock" in state and vm.check_extension(Cap.KVM_CAP_ADJUST_CLOCK) > 0:
        clock = _load(abi.kvm_clock_data, state["clock"], "clock")
        vm.set_clock(abi.kvm_clock_data(clock=clock.clock))
    for raw in state.get("irqchip", []):
        vm.set_irqchip(_load(abi.kvm_irqchip, raw, "irqchip"))


def save_machine(machine) -> dict:
    """Everything but RAM, for a machine whose vCPUs are all parked (or never ran)."""
    if machine.running and not machine.paused:
        raise RuntimeError("machine must be paused to capture its state")
    kvm = machine.kvm
    xsave_size = kvm.check_extension(Cap.KVM_CAP_XSAVE2)     # 0: no XSAVE2, use XSAVE
    indices = machine.msr_indices()
    return {
        "format": STATE_FORMAT, "version": STATE_VERSION,
        "vcpus": [save_vcpu(v, c, indices, xsave_size, lapic=machine.irqchip)
                  for v, c in zip(machine.vcpus, machine.cpuids)],
        "vm": save_vm(machine.vm, machine.irqchip),
        "devices": {"serial": machine.serial.save_state(),
                    "debug_exit": machine.debug_exit.save_state()},
        "guest": {"kernel": machine.kernel.path if machine.kernel else machine.origin.get("kernel"),
                  "cmdline": machine.cmdline if machine.kernel else machine.origin.get("cmdline", ""),
                  "memory": machine.memory.size},
    }


def machine_shape(state: dict) -> tuple[int, bool]:
    """(vCPUs, in-kernel irqchip) of the machine a checked state was saved from."""
    return len(state["vcpus"]), "irqchip" in state.get("vm", {})


def check_machine_state(state: dict) -> None:
    if state.get("format") != STATE_FORMAT or state.get("version") not in READABLE_VERSIONS:
        raise StateError(f"state format {state.get('format')!r} version {state.get('version')!r} "
                         "is not supported")
    vcpus = state.get("vcpus")
    if not isinstance(vcpus, list) or not 1 <= len(vcpus) <= MAX_VCPUS:
        raise StateError(f"state must hold 1 to {MAX_VCPUS} vCPUs")
    vm = state.get("vm", {})
    if not isinstance(vm, dict):
        raise StateError("state field vm is not an object")
    irqchip = "irqchip" in vm
    if len(vcpus) > 1 and not irqchip:
        raise StateError("several vCPUs without an irqchip")
    for v in vcpus:
        if not isinstance(v, dict):
            raise StateError("a vCPU state is not an object")
        check_vcpu_state(v)
        if irqchip != ("lapic" in v):
            raise StateError("LAPIC state does not match the irqchip")
    devices = state.get("devices")
    if not isinstance(devices, dict) or not isinstance(devices.get("serial"), dict) \
            or not isinstance(devices["serial"].get("regs"), dict):
        raise StateError("state has no serial device state")
    try:
        if "clock" in vm:
            _load(abi.kvm_clock_data, vm["clock"], "clock")
        if irqchip:
            chips = vm["irqchip"]
            if not isinstance(chips, list) or len(chips) != len(CHIPS):
                raise StateError("irqchip state must hold the two PICs and the IOAPIC")
            for raw, want in zip(chips, CHIPS):
                if _load(abi.kvm_irqchip, raw, "irqchip").chip_id != want:
                    raise StateError("irqchip state is out of order")
            _load(abi.kvm_pit_state2, vm["pit2"], "pit2")
    except (KeyError, TypeError) as err:
        raise StateError(f"VM state is missing or has a bad field: {err}") from None


def restore_machine(machine, state: dict) -> None:
    """Every vCPU first (all before any runs), VM-wide state after, our devices last."""
    check_machine_state(state)
    if machine_shape(state) != (len(machine.vcpus), machine.irqchip):
        raise StateError("the machine does not have the saved vCPUs and irqchip")
    for vcpu, vstate in zip(machine.vcpus, state["vcpus"]):
        restore_vcpu(vcpu, vstate)
    restore_vm(machine.vm, state.get("vm", {}))
    machine.serial.restore_state(state["devices"]["serial"])
    machine.debug_exit.restore_state(state["devices"].get("debug_exit", {}))


def vcpu_summary(state: dict) -> dict:
    """The first vCPU's registers and mode, and the guest's origin, for `inspect`
    (``state`` has passed check_machine_state)."""
    v = state["vcpus"][0]
    regs = _load(abi.kvm_regs, v["regs"], "regs")
    sregs = _load(abi.kvm_sregs, v["sregs"], "sregs")
    if sregs.efer & (1 << 10):
        mode = "64-bit long mode"
    elif sregs.cr0 & 1:
        mode = "32-bit protected mode"
    else:
        mode = "real mode"
    guest = state.get("guest", {})
    return {"rip": regs.rip, "rsp": regs.rsp, "cr3": sregs.cr3, "mode": mode,
            "msrs": len(v["msrs"]), "kernel": guest.get("kernel"), "cmdline": guest.get("cmdline"),
            "xsave_bytes": len(v["xsave"]) // 2, "regs_bytes": ctypes.sizeof(abi.kvm_regs)}
