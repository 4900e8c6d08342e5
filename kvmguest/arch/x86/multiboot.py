"""Multiboot (v1) boot, as GRUB and QEMU's ``-kernel`` do it: kvm-unit-tests' x86 tests
are ELF32 files with a multiboot header and read their environment from the first module.

The header (magic 0x1BADB002, flags, checksum) sits 4-byte aligned in the first 8 KiB.
Flags 0-15 are requirements a loader must refuse when it cannot meet them: we page-align
modules (bit 0) and always give the memory information (bit 1); a video mode (bit 2) or
an unknown bit is refused. Bit 16 means the header says where the image loads (for
files that are not ELF). Entry: 32-bit protected mode, paging off, flat segments,
EAX = 0x2BADB002, EBX = the multiboot information structure (memory sizes, memory map,
command line, modules, boot loader name). The command line the kernel sees starts with
the kernel's path, as GRUB and QEMU pass it (kvm-unit-tests takes it as argv[0])."""

from __future__ import annotations

import os
import struct

from . import firmware, layout, regs
from .kernel import (MULTIBOOT, BootError, Kernel, Segment, check_fits, check_module_names,
                    memory_map, page_up, write_modules, write_segments)

HEADER_MAGIC = 0x1BADB002
BOOT_MAGIC = 0x2BADB002          # in EAX at entry
SEARCH_BYTES = 8192
FLAG_PAGE_ALIGN, FLAG_MEMORY_INFO, FLAG_VIDEO_MODE, FLAG_ADDRESSES = 1, 2, 4, 1 << 16
SUPPORTED_REQUIREMENTS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO

# multiboot_info.flags: which fields are valid.
INFO_MEMORY, INFO_CMDLINE, INFO_MODS, INFO_MMAP, INFO_LOADER_NAME = 1, 4, 8, 0x40, 0x200
INFO_SIZE = 116                  # up to and including the framebuffer fields
# Where the information structure and what it points to go (the PVH start_info page:
# below layout.BOOT_STRUCTS_END, so no segment may overlap them).
INFO = layout.START_INFO
MODULES = INFO + 0x80            # 16 bytes a module
MMAP = INFO + 0x100              # 24 bytes an entry
LOADER_NAME = INFO + 0x400
MODULE_CMDLINES = INFO + 0x500   # NUL-terminated strings, up to the command-line page
MAX_MODULES = 4
LOADER = b"kvmguest\0"


def find_header(path: str, raw: bytes) -> dict | None:
    """The multiboot header's fields, or None when the first 8 KiB have none."""
    end = min(len(raw), SEARCH_BYTES) - 12
    for off in range(0, end + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", raw, off)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            header = {"offset": off, "flags": flags}
            if flags & FLAG_ADDRESSES:
                if off + 32 > len(raw):
                    raise BootError(f"{path}: multiboot header at {off:#x} is truncated")
                names = ("header_addr", "load_addr", "load_end_addr", "bss_end_addr",
                         "entry_addr")
                header.update(zip(names, struct.unpack_from("<5I", raw, off + 12)))
            return header
    return None


def _check_flags(path: str, flags: int) -> None:
    if flags & FLAG_VIDEO_MODE:
        raise BootError(f"{path}: the multiboot header asks for a video mode, which "
                        "kvmguest does not provide (serial console only)")
    unknown = flags & 0xFFFF & ~SUPPORTED_REQUIREMENTS
    if unknown:
        raise BootError(f"{path}: the multiboot header requires features {unknown:#x} that "
                        "kvmguest does not know")


def kernel_from_elf(path: str, segments, entry: int | None, header: dict) -> Kernel:
    """A multiboot ELF: loaded by its program headers (unless the header gives addresses)."""
    _check_flags(path, header["flags"])
    if header["flags"] & FLAG_ADDRESSES:
        raise BootError(f"{path}: an ELF whose multiboot header also gives load addresses "
                        "is ambiguous; kvmguest loads ELF files by their program headers")
    if entry is None:
        raise BootError(f"{path}: the ELF entry point is outside every loadable segment")
    return Kernel(path, entry, segments, MULTIBOOT, header)


def kernel_from_header(path: str, size: int, header: dict) -> Kernel:
    """A multiboot image (``size`` bytes) that is not ELF: the header's address fields
    place it."""
    _check_flags(path, header["flags"])
    if not header["flags"] & FLAG_ADDRESSES:
        raise BootError(f"{path}: not an ELF file, and its multiboot header gives no load "
                        "addresses (flag 16)")
    h = header
    start = h["offset"] - (h["header_addr"] - h["load_addr"])
    if h["header_addr"] < h["load_addr"] or start < 0:
        raise BootError(f"{path}: multiboot header_addr {h['header_addr']:#x} is below "
                        f"load_addr {h['load_addr']:#x} or before the file's start")
    end = size - start + h["load_addr"] if h["load_end_addr"] == 0 else h["load_end_addr"]
    if end < h["load_addr"]:
        raise BootError(f"{path}: multiboot load_end_addr {end:#x} is below load_addr "
                        f"{h['load_addr']:#x}")
    if start + end - h["load_addr"] > size:
        raise BootError(f"{path}: multiboot load_end_addr {end:#x} runs past the file")
    memend = max(end, h["bss_end_addr"])
    return Kernel(path, h["entry_addr"], (Segment(h["load_addr"], start, end - h["load_addr"],
                                                  memend - h["load_addr"]),),
                  MULTIBOOT, header)


def full_cmdline(kernel: Kernel, cmdline: str) -> bytes:
    """The command line a multiboot kernel sees: its path first (as GRUB and QEMU give
    it), as bytes: a path need not be UTF-8."""
    return (os.fsencode(kernel.path) + b" " + cmdline.encode()).rstrip()


def check(kernel: Kernel, regions, cmdline: str, modules=()) -> bytes:
    """Everything load() will check, before a VM exists or a module is read: returns the
    command line."""
    check_module_names(modules, MAX_MODULES, MODULE_CMDLINES)
    extra = sum(page_up(m.size) for m in modules)
    return check_fits(kernel, regions, full_cmdline(kernel, cmdline), extra)


def load(memory, kernel: Kernel, cmdline: str = "", modules=()) -> int:
    """Write the kernel, its modules (``[Module]``, page-aligned after the kernel)
    and the multiboot information; return the information's address (for EBX)."""
    blob = check(kernel, memory.regions, cmdline, modules)
    write_segments(memory, kernel)
    memory.write(layout.CMDLINE, blob + b"\0")

    places, at = [], page_up(kernel.end)          # one after the other, after the kernel
    for m in modules:
        places.append(at)
        at = page_up(at + m.size)
    written = write_modules(memory, modules, places, MODULE_CMDLINES)
    memory.write(MODULES, b"".join(struct.pack("<IIII", start, start + size, name, 0)
                                   for start, size, name in written))

    entries = memory_map(memory)
    memory.write(MMAP, b"".join(struct.pack("<IQQI", 20, a, n, t) for a, n, t in entries))
    memory.write(LOADER_NAME, LOADER)
    low = memory.regions[0]
    upper_end = min(low.gpa + low.size, layout.MMIO_HOLE_START)
    info = bytearray(INFO_SIZE)
    struct.pack_into("<IIIIIII", info, 0,
                     INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME,
                     layout.LOW_RAM_END >> 10, (upper_end - layout.KERNEL_MIN_ADDR) >> 10,
                     0xFFFFFFFF, layout.CMDLINE, len(modules), MODULES)
    struct.pack_into("<II", info, 44, len(entries) * 24, MMAP)
    struct.pack_into("<I", info, 64, LOADER_NAME)
    memory.write(INFO, bytes(info))
    return INFO


def boot(memory, kernel: Kernel, cmdline: str, modules, platform, rsdp: int):
    """The kernel loaded as GRUB and QEMU load a multiboot kernel, with what SeaBIOS
    leaves behind where there is an irqchip (arch.x86.firmware); the boot CPU's start
    registers: EAX the boot magic, EBX the information."""
    info = load(memory, kernel, cmdline, modules)
    if platform.irqchip:
        firmware.apply(memory, platform.vm, platform.pit)
    start = regs.setup_regs(kernel.entry, info)
    start.rax = BOOT_MAGIC
    return start
