"""PVH boot: write hvm_start_info (command line, memory map, RSDP) for a kernel whose
ELF carries the XEN_ELFNOTE_PHYS32_ENTRY note (found and checked by boot.image)."""

from __future__ import annotations

import ctypes

from . import layout
from .image import Kernel, check_fits, memory_map, write_segments


class hvm_start_info(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_uint32), ("version", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("nr_modules", ctypes.c_uint32),
                ("modlist_paddr", ctypes.c_uint64), ("cmdline_paddr", ctypes.c_uint64),
                ("rsdp_paddr", ctypes.c_uint64), ("memmap_paddr", ctypes.c_uint64),
                ("memmap_entries", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class hvm_memmap_table_entry(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("type", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


assert ctypes.sizeof(hvm_start_info) == 56 and ctypes.sizeof(hvm_memmap_table_entry) == 24


def load(memory, kernel: Kernel, cmdline: str = "", rsdp_paddr: int = 0) -> int:
    """Write the kernel and the PVH boot structures into guest memory; return start_info.
    ``rsdp_paddr`` is where the ACPI RSDP is (0: no ACPI tables)."""
    blob = check_fits(kernel, memory.regions, cmdline)
    write_segments(memory, kernel)

    memory.write(layout.CMDLINE, blob + b"\0")
    entries = memory_map(memory)
    table = (hvm_memmap_table_entry * len(entries))(
        *[hvm_memmap_table_entry(a, n, t, 0) for a, n, t in entries])
    memory.write(layout.MEMMAP, bytes(table))
    info = hvm_start_info(magic=layout.HVM_START_MAGIC, version=1, cmdline_paddr=layout.CMDLINE,
                          rsdp_paddr=rsdp_paddr, memmap_paddr=layout.MEMMAP,
                          memmap_entries=len(entries))
    memory.write_struct(layout.START_INFO, info)
    return layout.START_INFO
