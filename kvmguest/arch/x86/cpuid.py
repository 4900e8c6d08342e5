"""The guest's CPUID: the host's supported leaves, made consistent for each vCPU of the
machine (APIC IDs, topology, x2APIC, the hypervisor bit); cpumodel.py applies QEMU-style
-cpu models and +/-features on top."""

from __future__ import annotations

import ctypes


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
