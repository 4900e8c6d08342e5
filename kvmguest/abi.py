"""The KVM ABI in one place: ioctl numbers, constants and ctypes structs.

Everything here mirrors ``<linux/kvm.h>`` and ``<asm/kvm.h>`` (x86_64) by name.
Ioctl numbers are computed from the ``_IO/_IOR/_IOW/_IOWR`` rules with the
ctypes struct as the argument type, so a struct of the wrong size yields a wrong
number; ``tests/test_abi.py`` compiles a C program against the system headers
and compares every size, offset and number below.
"""

from __future__ import annotations

import ctypes
import enum
import functools

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

# --- ioctl number encoding (asm-generic/ioctl.h) ---------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    assert size < (1 << _IOC_SIZEBITS), size
    return (direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (
        size << _IOC_SIZESHIFT)


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ, typ, nr, ctypes.sizeof(struct))


def _IOW(typ: int, nr: int, struct) -> int:
    return _IOC(_IOC_WRITE, typ, nr, ctypes.sizeof(struct))


def _IOWR(typ: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, ctypes.sizeof(struct))


KVMIO = 0xAE
KVM_API_VERSION = 12
KVM_NR_INTERRUPTS = 256
PAGE_SIZE = 4096
# A memory slot holds at most this many pages (KVM_MEM_MAX_NR_PAGES, virt/kvm/kvm_main.c).
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1


# --- structs ----------------------------------------------------------------------
class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_regs(ctypes.Structure):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [(n, kvm_segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + [
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_fpu(ctypes.Structure):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
                ("pad1", u8), ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32)]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """Header only; the entries follow (see :func:`flexible`)."""
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(ctypes.Structure):
    """Header only; ``nmsrs`` u32 indices follow."""
    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(ctypes.Structure):
    """Header only; ``nent`` :class:`kvm_cpuid_entry2` follow."""
    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_dirty_gfn(ctypes.Structure):
    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class _ev_exception(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class _ev_interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _ev_nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _ev_smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [("exception", _ev_exception), ("interrupt", _ev_interrupt), ("nmi", _ev_nmi),
                ("sipi_vector", u32), ("flags", u32), ("smi", _ev_smi),
                ("triple_fault_pending", u8), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64),
                ("reserved", u64 * 9)]


class kvm_guest_debug_arch(ctypes.Structure):
    _fields_ = [("debugreg", u64 * 8)]


class kvm_guest_debug(ctypes.Structure):
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


class kvm_xsave(ctypes.Structure):
    """The legacy 4 KiB area; KVM_GET_XSAVE2 may need more (KVM_CAP_XSAVE2 says how much)."""
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * 16), ("padding", u64 * 16)]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_char * 1024)]


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [("count", u32), ("latched_count", u16), ("count_latched", u8),
                ("status_latched", u8), ("status", u8), ("read_state", u8),
                ("write_state", u8), ("write_latch", u8), ("rw_mode", u8), ("mode", u8),
                ("bcd", u8), ("gate", u8), ("count_load_time", ctypes.c_int64)]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", ctypes.c_char * 512)]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32),
                ("pad", u8 * 16)]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", ctypes.c_int32),
                ("flags", u32), ("pad", u8 * 36)]


KVM_IRQFD_FLAG_DEASSIGN = 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


# kvm_run: the shared page mapped from the vcpu fd.  Only the exits we handle are
# spelled out; the rest of the 256-byte union is padding.
class _run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class _run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_emulation_failure(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("flags", u64), ("insn_size", u8),
                ("insn_bytes", u8 * 15)]


class kvm_debug_exit_arch(ctypes.Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class _run_debug(ctypes.Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_exit(ctypes.Union):
    _fields_ = [("hw", _run_hw), ("fail_entry", _run_fail_entry), ("io", _run_io),
                ("mmio", _run_mmio), ("debug", _run_debug), ("internal", _run_internal),
                ("emulation_failure", _run_emulation_failure),
                ("system_event", _run_system_event), ("padding", ctypes.c_char * 256)]


class kvm_run(ctypes.Structure):
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", _run_exit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", ctypes.c_char * 2048)]


# --- ioctl numbers, grouped by the fd they go to ------------------------------------
class SysIoctl(enum.IntEnum):
    KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
    KVM_CREATE_VM = _IO(KVMIO, 0x01)
    KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
    KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
    KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
    KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)


class VmIoctl(enum.IntEnum):
    KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
    KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
    KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
    KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
    KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, u64)
    KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
    KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
    KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
    KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
    KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
    KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)
    KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
    KVM_SET_CLOCK = _IOW(KVMIO, 0x7b, kvm_clock_data)
    KVM_GET_CLOCK = _IOR(KVMIO, 0x7c, kvm_clock_data)
    KVM_GET_PIT2 = _IOR(KVMIO, 0x9f, kvm_pit_state2)
    KVM_SET_PIT2 = _IOW(KVMIO, 0xa0, kvm_pit_state2)
    KVM_ENABLE_CAP = _IOW(KVMIO, 0xa3, kvm_enable_cap)
    KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xc0, kvm_clear_dirty_log)
    KVM_RESET_DIRTY_RINGS = _IO(KVMIO, 0xc7)


class VcpuIoctl(enum.IntEnum):
    KVM_RUN = _IO(KVMIO, 0x80)
    KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
    KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
    KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
    KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
    KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
    KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
    KVM_GET_FPU = _IOR(KVMIO, 0x8c, kvm_fpu)
    KVM_SET_FPU = _IOW(KVMIO, 0x8d, kvm_fpu)
    KVM_GET_LAPIC = _IOR(KVMIO, 0x8e, kvm_lapic_state)
    KVM_SET_LAPIC = _IOW(KVMIO, 0x8f, kvm_lapic_state)
    KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
    KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
    KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
    KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
    KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9f, kvm_vcpu_events)
    KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xa0, kvm_vcpu_events)
    KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9b, kvm_guest_debug)
    KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xa1, kvm_debugregs)
    KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xa2, kvm_debugregs)
    KVM_GET_XSAVE = _IOR(KVMIO, 0xa4, kvm_xsave)
    KVM_SET_XSAVE = _IOW(KVMIO, 0xa5, kvm_xsave)
    KVM_GET_XCRS = _IOR(KVMIO, 0xa6, kvm_xcrs)
    KVM_SET_XCRS = _IOW(KVMIO, 0xa7, kvm_xcrs)
    KVM_GET_XSAVE2 = _IOR(KVMIO, 0xcf, kvm_xsave)


# --- constants ----------------------------------------------------------------------
class Cap(enum.IntEnum):
    KVM_CAP_IRQCHIP = 0
    KVM_CAP_USER_MEMORY = 3
    KVM_CAP_SET_TSS_ADDR = 4
    KVM_CAP_EXT_CPUID = 7
    KVM_CAP_NR_VCPUS = 9
    KVM_CAP_NR_MEMSLOTS = 10
    KVM_CAP_SYNC_MMU = 16
    KVM_CAP_PIT2 = 33
    KVM_CAP_ADJUST_CLOCK = 39
    KVM_CAP_VCPU_EVENTS = 41
    KVM_CAP_SET_GUEST_DEBUG = 23
    KVM_CAP_DEBUGREGS = 50
    KVM_CAP_READONLY_MEM = 81
    KVM_CAP_XSAVE = 55
    KVM_CAP_XCRS = 56
    KVM_CAP_MAX_VCPUS = 66
    KVM_CAP_IMMEDIATE_EXIT = 136
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
    KVM_CAP_DIRTY_LOG_RING = 192
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
    KVM_CAP_XSAVE2 = 208
    KVM_CAP_SET_GUEST_DEBUG2 = 195


class ExitReason(enum.IntEnum):
    KVM_EXIT_UNKNOWN = 0
    KVM_EXIT_EXCEPTION = 1
    KVM_EXIT_IO = 2
    KVM_EXIT_HYPERCALL = 3
    KVM_EXIT_DEBUG = 4
    KVM_EXIT_HLT = 5
    KVM_EXIT_MMIO = 6
    KVM_EXIT_IRQ_WINDOW_OPEN = 7
    KVM_EXIT_SHUTDOWN = 8
    KVM_EXIT_FAIL_ENTRY = 9
    KVM_EXIT_INTR = 10
    KVM_EXIT_SET_TPR = 11
    KVM_EXIT_TPR_ACCESS = 12
    KVM_EXIT_NMI = 16
    KVM_EXIT_INTERNAL_ERROR = 17
    KVM_EXIT_SYSTEM_EVENT = 24
    KVM_EXIT_DIRTY_RING_FULL = 31


class InternalError(enum.IntEnum):
    KVM_INTERNAL_ERROR_EMULATION = 1
    KVM_INTERNAL_ERROR_SIMUL_EX = 2
    KVM_INTERNAL_ERROR_DELIVERY_EV = 3
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4


KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class MemFlag(enum.IntFlag):
    KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
    KVM_MEM_READONLY = 1 << 1


KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
# The dirty ring: per vCPU, at this page offset of the vCPU's mmap; entry flags.
KVM_DIRTY_LOG_PAGE_OFFSET = 64
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_HALTED = 3


class IrqChip(enum.IntEnum):
    KVM_IRQCHIP_PIC_MASTER = 0
    KVM_IRQCHIP_PIC_SLAVE = 1
    KVM_IRQCHIP_IOAPIC = 2


KVM_PIT_SPEAKER_DUMMY = 1


class GuestDebug(enum.IntFlag):
    """KVM_SET_GUEST_DEBUG's control word (x86)."""
    KVM_GUESTDBG_ENABLE = 0x1
    KVM_GUESTDBG_SINGLESTEP = 0x2
    KVM_GUESTDBG_USE_SW_BP = 0x10000
    KVM_GUESTDBG_USE_HW_BP = 0x20000
    KVM_GUESTDBG_INJECT_DB = 0x40000
    KVM_GUESTDBG_INJECT_BP = 0x80000
    KVM_GUESTDBG_BLOCKIRQ = 0x100000

KVM_MAX_CPUID_ENTRIES = 256

# Every struct, for the ABI test (name in the C headers -> ctypes type).
STRUCTS = {c.__name__: c for c in (
    kvm_userspace_memory_region, kvm_regs, kvm_segment, kvm_dtable, kvm_sregs, kvm_fpu,
    kvm_msr_entry, kvm_msrs, kvm_msr_list, kvm_cpuid_entry2, kvm_cpuid2, kvm_dirty_log,
    kvm_clear_dirty_log, kvm_dirty_gfn, kvm_enable_cap, kvm_mp_state, kvm_vcpu_events, kvm_debugregs,
    kvm_guest_debug, kvm_guest_debug_arch, kvm_debug_exit_arch,
    kvm_xsave, kvm_xcr, kvm_xcrs, kvm_lapic_state, kvm_pit_channel_state, kvm_pit_state2,
    kvm_pit_config, kvm_clock_data, kvm_irqchip, kvm_irq_level, kvm_irqfd, kvm_ioeventfd,
    kvm_run)}

IOCTLS = {m.name: int(m) for group in (SysIoctl, VmIoctl, VcpuIoctl) for m in group}

CONSTANTS = {m.name: int(m) for group in (Cap, ExitReason, InternalError, IrqChip,
                                                             GuestDebug)
             for m in group}
CONSTANTS.update({
    "KVM_API_VERSION": KVM_API_VERSION,
    "KVM_IRQFD_FLAG_DEASSIGN": KVM_IRQFD_FLAG_DEASSIGN,
    "KVM_IOEVENTFD_FLAG_DEASSIGN": KVM_IOEVENTFD_FLAG_DEASSIGN,
    "KVM_MEM_LOG_DIRTY_PAGES": int(MemFlag.KVM_MEM_LOG_DIRTY_PAGES),
    "KVM_MEM_READONLY": int(MemFlag.KVM_MEM_READONLY),
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE": KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    "KVM_DIRTY_LOG_INITIALLY_SET": KVM_DIRTY_LOG_INITIALLY_SET,
    "KVM_DIRTY_LOG_PAGE_OFFSET": KVM_DIRTY_LOG_PAGE_OFFSET,
    "KVM_DIRTY_GFN_F_DIRTY": KVM_DIRTY_GFN_F_DIRTY,
    "KVM_DIRTY_GFN_F_RESET": KVM_DIRTY_GFN_F_RESET,
    "KVM_EXIT_IO_IN": KVM_EXIT_IO_IN,
    "KVM_EXIT_IO_OUT": KVM_EXIT_IO_OUT,
    "KVM_MP_STATE_RUNNABLE": KVM_MP_STATE_RUNNABLE,
    "KVM_MP_STATE_UNINITIALIZED": KVM_MP_STATE_UNINITIALIZED,
    "KVM_MP_STATE_HALTED": KVM_MP_STATE_HALTED,
    "KVM_PIT_SPEAKER_DUMMY": KVM_PIT_SPEAKER_DUMMY,
    "KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES":
        KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
})


@functools.lru_cache(maxsize=64)
def flexible(header: type, entry, count: int):
    """A ctypes type for a struct with a trailing flexible array of ``count`` entries
    (made once per shape: building a ctypes type costs ~0.1 ms, inside a pause)."""
    return type(header.__name__ + f"_{count}", (ctypes.Structure,),
                {"_fields_": [("hdr", header), ("entries", entry * count)]})
