"""What a crashed guest looks like to its user: why the vCPU cannot go on after an exit
(``crash_message``) and its registers with the bytes at rip (``describe_cpu``). The KVM
layer (exits.py) only decodes exits; the words are here."""

from __future__ import annotations

from ... import abi
from ...abi import ExitReason
from ...exits import (DebugExit, Exit, FailEntryExit, HaltExit, InternalErrorExit, MmioExit,
                      ShutdownExit, SystemEventExit)
from ...kvm import KvmError
from . import regs
from .complete import describe


def crash_message(ex: Exit) -> str | None:
    """Why the guest cannot go on after ``ex`` (None: it asked to reset or power off)."""
    if isinstance(ex, MmioExit):
        what = "write to" if ex.is_write else "read from"
        return f"guest {what} unmapped guest-physical address {ex.gpa:#x} ({ex.length} bytes)"
    if isinstance(ex, DebugExit):
        return (f"debug exit (exception {ex.exception} at {ex.pc:#x}) with no debugger "
                "attached")
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
        if ex.insn and ex.suberror == abi.InternalError.KVM_INTERNAL_ERROR_EMULATION:
            return (f"this host's KVM cannot emulate the guest's instruction "
                    f"{describe(ex.insn)} (KVM internal error {sub})")
        insn = f" instruction bytes: {ex.insn.hex(' ')}" if ex.insn else ""
        return f"KVM internal error {sub}{insn} (an instruction this host cannot emulate?)"
    if isinstance(ex, SystemEventExit):
        return None
    try:
        name = ExitReason(ex.reason).name
    except ValueError:
        name = str(ex.reason)
    return f"unexpected exit {name}"


def describe_cpu(memory, vcpu, vcpus: int = 1) -> str:
    """Registers and the bytes at rip of ``vcpu`` (named when there are several)."""
    try:
        gp, sregs = vcpu.get_regs(), vcpu.get_sregs()
    except KvmError as err:
        return f"(registers unavailable: {err})"
    names = [n for n, _ in abi.kvm_regs._fields_]
    lines = [f"  vCPU {vcpu.index}:"] if vcpus > 1 else []
    lines += ["  " + "  ".join(f"{n}={getattr(gp, n):#018x}" for n in names[i:i + 4])
              for i in range(0, len(names), 4)]
    lines.append(f"  cr0={sregs.cr0:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} "
                 f"efer={sregs.efer:#x} cs={sregs.cs.selector:#x}")
    gpa = regs.translate(memory, gp.rip + (sregs.cs.base if not sregs.efer & regs.EFER_LMA
                                           else 0), sregs)
    if gpa is not None and memory.is_ram(gpa, 16):
        lines.append(f"  code at rip: {memory.read(gpa, 16).hex(' ')}")
    else:
        lines.append("  code at rip: (not in RAM)")
    return "\n".join(lines)
