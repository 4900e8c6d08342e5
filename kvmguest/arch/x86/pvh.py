"""PVH boot: write hvm_start_info (command line, memory map, RSDP) for a kernel whose
ELF carries the XEN_ELFNOTE_PHYS32_ENTRY note (found and checked by boot.image)."""

from __future__ import annotations

import ctypes

from . import layout, regs
from .kernel import (Kernel, check_fits, check_module_names, memory_map, place_modules,
                    write_modules, write_segments)


class hvm_start_info(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_uint32), ("version", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("nr_modules", ctypes.c_uint32),
                ("modlist_paddr", ctypes.c_uint64), ("cmdline_paddr", ctypes.c_uint64),
                ("rsdp_paddr", ctypes.c_uint64), ("memmap_paddr", ctypes.c_uint64),
                ("memmap_entries", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class hvm_memmap_table_entry(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("type", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class hvm_modlist_entry(ctypes.Structure):
    _fields_ = [("paddr", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("cmdline_paddr", ctypes.c_uint64), ("reserved", ctypes.c_uint64)]


assert ctypes.sizeof(hvm_start_info) == 56 and ctypes.sizeof(hvm_memmap_table_entry) == 24
assert ctypes.sizeof(hvm_modlist_entry) == 32
MAX_MODULES = (layout.PVH_MODULE_NAMES - layout.PVH_MODLIST) // 32


def check(kernel: Kernel, regions, cmdline: str, modules=()) -> tuple[bytes, list[int]]:
    """Everything load() checks, before a VM exists or a module is read: the encoded
    command line and where each module goes."""
    check_module_names(modules, MAX_MODULES, layout.PVH_MODULE_NAMES)
    return check_fits(kernel, regions, cmdline), place_modules(kernel, regions, modules)


def load(memory, kernel: Kernel, cmdline: str = "", rsdp_paddr: int = 0, modules=()) -> int:
    """Write the kernel, its modules and the PVH boot structures into guest memory;
    return start_info. ``rsdp_paddr`` is where the ACPI RSDP is (0: no ACPI tables)."""
    blob, places = check(kernel, memory.regions, cmdline, modules)
    write_segments(memory, kernel)
    entries = [hvm_modlist_entry(at, size, name_at, 0) for at, size, name_at in
               write_modules(memory, modules, places, layout.PVH_MODULE_NAMES)]
    if entries:
        memory.write(layout.PVH_MODLIST, bytes((hvm_modlist_entry * len(entries))(*entries)))

    memory.write(layout.CMDLINE, blob + b"\0")
    memmap = memory_map(memory)
    assert len(memmap) <= layout.MEMMAP_MAX_ENTRIES      # two RAM slots, holes: a handful
    table = (hvm_memmap_table_entry * len(memmap))(
        *[hvm_memmap_table_entry(a, n, t, 0) for a, n, t in memmap])
    memory.write(layout.MEMMAP, bytes(table))
    info = hvm_start_info(magic=layout.HVM_START_MAGIC, version=1, cmdline_paddr=layout.CMDLINE,
                          rsdp_paddr=rsdp_paddr, memmap_paddr=layout.MEMMAP,
                          memmap_entries=len(memmap),
                          nr_modules=len(modules),
                          modlist_paddr=layout.PVH_MODLIST if modules else 0)
    memory.write_struct(layout.START_INFO, info)
    return layout.START_INFO


def boot(memory, kernel: Kernel, cmdline: str, modules, platform, rsdp: int):
    """The kernel loaded for PVH; the boot CPU's start registers (EBX: start_info)."""
    info = load(memory, kernel, cmdline, rsdp_paddr=rsdp, modules=modules)
    return regs.setup_regs(kernel.entry, info)
