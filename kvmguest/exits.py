"""KVM exits as typed records: what ``Vcpu.run()`` returns, and what each means."""

from __future__ import annotations

import ctypes

from . import abi
from .abi import ExitReason


class _Record:
    """An exit record: immutable slots. (Nine dataclasses cost ~7 ms at import, a fixed
    price of every `kvmguest run`, and a frozen dataclass is slow to build per exit.)"""

    __slots__ = ()
    _defaults: dict = {}

    def __init__(self, *args, **kw):
        names = self.__slots__
        values = dict(self._defaults, **dict(zip(names, args)), **kw)
        for name in names:
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        return type(other) is type(self) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self):
        return hash((type(self).__name__, *(getattr(self, n) for n in self.__slots__)))

    def __repr__(self):
        return f"{type(self).__name__}(" + ", ".join(
            f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"


class IoExit(_Record):
    __slots__ = ("port", "size", "count", "out", "data_addr")   # data_addr: in kvm_run

    def __init__(self, port: int, size: int, count: int, out: bool, data_addr: int):
        set_ = object.__setattr__                                  # the hot path: by hand
        set_(self, "port", port)
        set_(self, "size", size)
        set_(self, "count", count)
        set_(self, "out", out)
        set_(self, "data_addr", data_addr)


class MmioExit(_Record):
    __slots__ = ("gpa", "length", "is_write", "data_addr")   # data: 8 bytes in kvm_run
    _defaults = {"data_addr": 0}


class DebugExit(_Record):
    """KVM_SET_GUEST_DEBUG stopped the guest: exception 1 (#DB: a step or a hardware
    breakpoint, ``dr6`` says which) or 3 (#BP: an int3), at ``pc`` (linear)."""
    __slots__ = ("exception", "pc", "dr6", "dr7")


class HaltExit(_Record):
    __slots__ = ()


class ShutdownExit(_Record):
    __slots__ = ()


class FailEntryExit(_Record):
    __slots__ = ("hardware_reason",)


class InternalErrorExit(_Record):
    __slots__ = ("suberror", "insn")        # insn: the instruction bytes, when reported


class SystemEventExit(_Record):
    __slots__ = ("type",)


class DirtyRingFullExit(_Record):
    __slots__ = ()


class OtherExit(_Record):
    __slots__ = ("reason",)


Exit = (IoExit | MmioExit | DebugExit | HaltExit | ShutdownExit | FailEntryExit | InternalErrorExit
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
    if reason == ExitReason.KVM_EXIT_DEBUG:
        d = run.exit.debug.arch
        return DebugExit(d.exception, d.pc, d.dr6, d.dr7)
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
