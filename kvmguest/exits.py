"""KVM exits as typed records: what ``Vcpu.run()`` returns, and what each means."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from . import abi
from .abi import ExitReason


@dataclass(frozen=True)
class IoExit:
    port: int
    size: int
    count: int
    out: bool
    data_addr: int          # where KVM keeps the data in the kvm_run page


@dataclass(frozen=True)
class MmioExit:
    gpa: int
    length: int
    is_write: bool
    data_addr: int = 0      # the 8 data bytes in the kvm_run page (written, or to fill)


@dataclass(frozen=True)
class HaltExit:
    pass


@dataclass(frozen=True)
class ShutdownExit:
    pass


@dataclass(frozen=True)
class FailEntryExit:
    hardware_reason: int


@dataclass(frozen=True)
class InternalErrorExit:
    suberror: int
    insn: bytes             # the instruction bytes, when KVM reports them


@dataclass(frozen=True)
class SystemEventExit:
    type: int


@dataclass(frozen=True)
class DirtyRingFullExit:
    pass


@dataclass(frozen=True)
class OtherExit:
    reason: int


Exit = (IoExit | MmioExit | HaltExit | ShutdownExit | FailEntryExit | InternalErrorExit
        | SystemEventExit | DirtyRingFullExit | OtherExit)


def decode_exit(run: abi.kvm_run) -> Exit:
    """The kvm_run page after an exit, as a typed record."""
    reason = run.exit_reason
    if reason == ExitReason.KVM_EXIT_IO:
        io = run.exit.io
        return IoExit(io.port, io.size, io.count, io.direction == abi.KVM_EXIT_IO_OUT,
                      ctypes.addressof(run) + io.data_offset)
    if reason == ExitReason.KVM_EXIT_MMIO:
        m = run.exit.mmio
        return MmioExit(m.phys_addr, m.len, bool(m.is_write), ctypes.addressof(m.data))
    if reason == ExitReason.KVM_EXIT_HLT:
        return HaltExit()
    if reason == ExitReason.KVM_EXIT_SHUTDOWN:
        return ShutdownExit()
    if reason == ExitReason.KVM_EXIT_FAIL_ENTRY:
        return FailEntryExit(run.exit.fail_entry.hardware_entry_failure_reason)
    if reason == ExitReason.KVM_EXIT_INTERNAL_ERROR:
        e = run.exit.emulation_failure
        insn = b""
        if (e.suberror == abi.InternalError.KVM_INTERNAL_ERROR_EMULATION and e.ndata >= 2
                and e.flags & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES):
            insn = bytes(e.insn_bytes[:e.insn_size])
        return InternalErrorExit(e.suberror, insn)
    if reason == ExitReason.KVM_EXIT_DIRTY_RING_FULL:
        return DirtyRingFullExit()
    if reason == ExitReason.KVM_EXIT_SYSTEM_EVENT:
        return SystemEventExit(run.exit.system_event.type)
    return OtherExit(reason)




def crash_message(ex: Exit) -> str | None:
    """Why the guest cannot go on after ``ex`` (None: it asked to reset or power off)."""
    if isinstance(ex, MmioExit):
        what = "write to" if ex.is_write else "read from"
        return f"guest {what} unmapped guest-physical address {ex.gpa:#x} ({ex.length} bytes)"
    if isinstance(ex, HaltExit):
        return "guest halted with no way to wake it (no interrupt source)"
    if isinstance(ex, ShutdownExit):
        return "guest triple-faulted (KVM_EXIT_SHUTDOWN)"
    if isinstance(ex, FailEntryExit):
        return f"VM entry failed: hardware reason {ex.hardware_reason:#x}"
    if isinstance(ex, InternalErrorExit):
        try:
            sub = abi.InternalError(ex.suberror).name
        except ValueError:
            sub = str(ex.suberror)
        insn = f" instruction bytes: {ex.insn.hex(' ')}" if ex.insn else ""
        return f"KVM internal error {sub}{insn} (an instruction this host cannot emulate?)"
    if isinstance(ex, SystemEventExit):
        return None
    try:
        name = ExitReason(ex.reason).name
    except ValueError:
        name = str(ex.reason)
    return f"unexpected exit {name}"
