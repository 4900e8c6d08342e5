"""x86 registers: the vCPU start state the PVH boot protocol requires (flat 32-bit
segments, a busy TSS), the S3 real-mode restart, the control-register bits by name, and
the walk of a guest's page tables (crash messages, completed instructions)."""

from __future__ import annotations

import struct

from ... import abi
from . import layout

# PVH: flat 32-bit code and data, a busy TSS with limit 0x67.
CODE_SEL, DATA_SEL, TSS_SEL = 0x08, 0x10, 0x18
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_WP = 1 << 16           # write protect: kernel writes honour read-only pages
X86_CR0_PG = 1 << 31
X86_CR4_SMAP = 1 << 21
X86_CR4_LA57 = 1 << 12         # 5-level paging
EFER_LMA = 1 << 10             # long mode active
# Page-table entries (4-level paging).
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_USER = 1 << 2
PTE_LARGE = 1 << 7             # a 1 GiB (PDPTE) or 2 MiB (PDE) page
PHYS_MASK = (1 << 52) - 1
# #PF error code bits.
PF_PRESENT, PF_WRITE, PF_USER = 1 << 0, 1 << 1, 1 << 2


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


def canonical(vaddr: int, sregs: abi.kvm_sregs) -> bool:
    """Is ``vaddr`` canonical in long mode (its top bits copies of bit 47, or of bit 56
    with 5-level paging)? A CPU raises #GP for a memory access at any other."""
    bits = 57 if sregs.cr4 & X86_CR4_LA57 else 48
    top = (vaddr & (1 << 64) - 1) >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


class PageFault(Exception):
    """The access raises #PF: ``cr2`` the faulting linear address, ``code`` the error
    code a CPU pushes (PF_* bits)."""

    def __init__(self, cr2: int, code: int):
        super().__init__(f"#PF at {cr2:#x} (error code {code:#x})")
        self.cr2, self.code = cr2, code


def translate(memory, vaddr: int, sregs: abi.kvm_sregs) -> int | None:
    """Guest-virtual to guest-physical through the guest's page tables (None: unmapped,
    not canonical; or not long mode with paging, which our guests do not use)."""
    try:
        return translate_access(memory, vaddr, sregs)
    except PageFault:
        return None


def translate_access(memory, vaddr: int, sregs: abi.kvm_sregs, write: bool = False,
                     cpl: int = 0, ac: bool = False) -> int | None:
    """Guest-virtual to guest-physical as an access by the CPU: PageFault where a CPU
    would raise #PF (not present; a write to a read-only page at CPL3 or with CR0.WP; a
    user page at CPL3 only; SMAP), None outside 4-level long mode paging or where the
    address is not canonical (the CPU's #GP, which the caller raises)."""
    if not sregs.cr0 & X86_CR0_PG:
        return vaddr & 0xFFFFFFFF
    if not sregs.efer & EFER_LMA or sregs.cr4 & X86_CR4_LA57 or not canonical(vaddr, sregs):
        return None
    user = cpl == 3
    code = (PF_WRITE if write else 0) | (PF_USER if user else 0)
    table = sregs.cr3 & ~0xFFF & PHYS_MASK
    writable = everyone = True
    for level, shift in enumerate((39, 30, 21, 12)):
        try:
            entry = struct.unpack("<Q", memory.read(table + ((vaddr >> shift) & 511) * 8, 8))[0]
        except ValueError:
            return None                # page tables outside RAM: not a walk a CPU finishes
        if not entry & PTE_PRESENT:
            raise PageFault(vaddr, code)
        writable &= bool(entry & PTE_WRITABLE)
        everyone &= bool(entry & PTE_USER)
        if level in (1, 2) and entry & PTE_LARGE or level == 3:
            denied = (user and not everyone) or \
                (write and not writable and (user or sregs.cr0 & X86_CR0_WP)) or \
                (not user and everyone and sregs.cr4 & X86_CR4_SMAP and not ac)
            if denied:
                raise PageFault(vaddr, code | PF_PRESENT)
            mask = (1 << shift) - 1
            return (entry & PHYS_MASK & ~mask) | (vaddr & mask)
        table = entry & PHYS_MASK & ~0xFFF
    return None
