"""The vCPU start state the PVH boot protocol requires, and the guest's CPUID."""

from __future__ import annotations

import ctypes
import struct

from .. import abi
from . import layout

# PVH: flat 32-bit code and data, a busy TSS with limit 0x67.
CODE_SEL, DATA_SEL, TSS_SEL = 0x08, 0x10, 0x18
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
EFER_LMA = 1 << 10             # long mode active


def gdt_entry(flags: int, base: int, limit: int) -> int:
    return (((base & 0xFF000000) << (56 - 24)) | ((flags & 0x0000F0FF) << 40)
            | ((limit & 0x000F0000) << (48 - 16)) | ((base & 0x00FFFFFF) << 16)
            | (limit & 0x0000FFFF))


def _segment(entry: int, selector: int) -> abi.kvm_segment:
    """The kvm_segment (hidden descriptor state) for a GDT entry."""
    flags = (entry >> 40) & 0xF0FF
    g = (flags >> 15) & 1
    raw_limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    present = (flags >> 7) & 1
    return abi.kvm_segment(
        base=((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24),
        limit=(raw_limit << 12) | 0xFFF if g else raw_limit,
        selector=selector, type=flags & 0xF, present=present, dpl=(flags >> 5) & 3,
        db=(flags >> 14) & 1, s=(flags >> 4) & 1, l=(flags >> 13) & 1, g=g,
        avl=(flags >> 12) & 1, unusable=0 if present else 1)


BOOT_GDT = [
    0,
    gdt_entry(0xC09B, 0, 0xFFFFF),   # code: 32-bit, 4 GiB, execute/read, accessed
    gdt_entry(0xC093, 0, 0xFFFFF),   # data: 32-bit, 4 GiB, read/write, accessed
    gdt_entry(0x008B, 0, 0x67),      # tss: 32-bit busy TSS
]


def setup_gdt(memory) -> None:
    memory.write(layout.BOOT_GDT, struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT))


def setup_sregs(sregs: abi.kvm_sregs) -> None:
    """32-bit protected mode, paging off, flat segments: the PVH start state."""
    code, data = _segment(BOOT_GDT[1], CODE_SEL), _segment(BOOT_GDT[2], DATA_SEL)
    sregs.cs = code
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, data)
    sregs.tr = _segment(BOOT_GDT[3], TSS_SEL)
    sregs.gdt.base, sregs.gdt.limit = layout.BOOT_GDT, 8 * len(BOOT_GDT) - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET
    sregs.cr3 = sregs.cr4 = sregs.efer = 0


def setup_regs(entry: int, start_info: int) -> abi.kvm_regs:
    """rip at the PVH entry, rbx = hvm_start_info, interrupts off."""
    return abi.kvm_regs(rip=entry, rbx=start_info, rflags=0x2)


def reset_to_real_mode(vcpu, vector: int) -> None:
    """Put ``vcpu`` in real mode at ``vector`` (CS = vector >> 4, IP = vector & 15), as
    firmware does when it resumes from S3: paging and long mode off, flat 64 KiB segments."""
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        selector = vector >> 4 if name == "cs" else 0
        setattr(sregs, name, abi.kvm_segment(base=selector << 4, limit=0xFFFF,
                                             selector=selector, type=0xB if name == "cs" else 3,
                                             present=1, s=1))
    sregs.gdt.base, sregs.gdt.limit = 0, 0xFFFF
    sregs.idt.base, sregs.idt.limit = 0, 0x3FF
    sregs.cr0 = X86_CR0_ET
    sregs.cr3 = sregs.cr4 = sregs.efer = 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs(abi.kvm_regs(rip=vector & 0xF, rflags=0x2))


def copy_cpuid(cpuid):
    """An independent copy of a kvm_cpuid2 (each vCPU gets its own)."""
    out = type(cpuid)()
    ctypes.memmove(ctypes.addressof(out), ctypes.addressof(cpuid), ctypes.sizeof(cpuid))
    return out


def _bits_for(n: int) -> int:
    """APIC-ID bits that hold ``n`` distinct values (0 for one)."""
    return (n - 1).bit_length()


def setup_cpuid(cpuid, index: int = 0, count: int = 1) -> None:
    """The host's supported CPUID, made consistent for vCPU ``index`` of ``count``: APIC ID =
    index (leaf 1 and the x2APIC topology leaves 0xB/0x1F), one package of ``count``
    cores with one thread each, x2APIC available, the hypervisor bit set."""
    shift = _bits_for(count)
    for e in cpuid.entries[:cpuid.hdr.nent]:
        if e.function == 1:
            e.ecx |= 1 << 31 | 1 << 21                 # hypervisor, x2APIC
            e.ebx = (e.ebx & 0x0000FFFF) | (index << 24) | (min(count, 255) << 16)
            if count > 1:
                e.edx |= 1 << 28                       # HTT: ebx[23:16] is valid
        elif e.function in (0xB, 0x1F):
            level = e.ecx & 0xFF
            if level == 0:                             # SMT: one thread per core
                e.eax, e.ebx, e.ecx = 0, 1, (1 << 8)
            elif level == 1:                           # core: count cores per package
                e.eax, e.ebx, e.ecx = shift, count, 1 | (2 << 8)
            else:
                e.eax = e.ebx = 0
                e.ecx = level
            e.edx = index
        elif e.function == 4 and e.eax & 0x1F:         # cores per package - 1
            e.eax = (e.eax & 0x03FFFFFF) | ((count - 1) << 26)
            e.eax &= ~(0xFFF << 14)                    # threads sharing this cache - 1 = 0
        elif e.function == 0x80000008:
            e.ecx = (e.ecx & ~0xF0FF) | (count - 1) | (shift << 12)
