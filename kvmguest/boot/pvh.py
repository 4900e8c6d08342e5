"""PVH ELF loader: checks the kernel, copies PT_LOAD segments, zeroes BSS, finds the
XEN_ELFNOTE_PHYS32_ENTRY note and writes hvm_start_info with command line and memory map.

Every failure is a :class:`BootError` naming the step and the file, raised before the
VMM has written anything to guest memory."""

from __future__ import annotations

import ctypes
import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..errors import EXIT_BAD_INPUT, KvmguestError
from ..files import open_regular
from . import layout


class BootError(KvmguestError, ValueError):
    """The kernel cannot be booted: not an ELF, no PVH note, bad segments, ..."""

    exit_code = EXIT_BAD_INPUT


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


@dataclass(frozen=True)
class Segment:
    paddr: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class Kernel:
    """A checked PVH kernel, ready to load: segments and the 32-bit entry point."""
    path: str
    entry: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


_parsed: dict[tuple, Kernel] = {}


def parse_kernel(path: str | Path) -> Kernel:
    """Read and check a PVH ELF kernel; raise BootError naming what is wrong.

    A kernel already parsed is reused while its file is unchanged (same inode, size and
    mtime): pyelftools takes milliseconds, which would dominate a small guest's boot."""
    path = str(path)
    fd = open_regular(path, "kernel", BootError)
    try:
        st = os.fstat(fd)
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        if key in _parsed:
            return _parsed[key]
        raw = _read_kernel(fd, path, st.st_size)
    finally:
        os.close(fd)
    kernel = _parse(path, raw)
    if len(_parsed) > 32:
        _parsed.clear()
    _parsed[key] = kernel
    return kernel


MAX_KERNEL = 512 << 20       # bytes; a bigger file is not a kernel for these guests


def _read_kernel(fd: int, path: str, size: int) -> bytes:
    """A kernel file's bytes: its ELF magic is checked before the rest is read, and its
    size is capped."""
    try:
        if os.pread(fd, 4, 0) != b"\x7fELF":
            raise BootError(f"{path}: not an ELF file")
        if size > MAX_KERNEL:
            raise BootError(f"{path}: {size >> 20} MiB is too large for a kernel "
                            f"(limit {MAX_KERNEL >> 20} MiB)")
        raw = os.pread(fd, size, 0)
        while len(raw) < size:
            more = os.pread(fd, size - len(raw), len(raw))
            if not more:
                break
            raw += more
        return raw
    except OSError as err:
        raise BootError(f"{path}: cannot read kernel: {err.strerror}") from err


def _parse(path: str, raw: bytes) -> Kernel:
    if raw[:4] != b"\x7fELF":
        raise BootError(f"{path}: not an ELF file")
    try:
        elf = ELFFile(io.BytesIO(raw))
        machine = elf["e_machine"]
        if machine not in ("EM_X86_64", "EM_386"):
            raise BootError(f"{path}: ELF for {machine}, not x86")
        segments, entry = [], None
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_memsz"]:
                off, filesz = seg["p_offset"], seg["p_filesz"]
                if off + filesz > len(raw):
                    raise BootError(f"{path}: truncated: segment at {seg['p_paddr']:#x} "
                                    f"needs bytes up to {off + filesz}, file has {len(raw)}")
                if filesz > seg["p_memsz"]:
                    raise BootError(f"{path}: segment at {seg['p_paddr']:#x} has filesz > memsz")
                segments.append(Segment(seg["p_paddr"], raw[off:off + filesz], seg["p_memsz"]))
            elif seg["p_type"] == "PT_NOTE":
                entry = _pvh_entry(seg, raw, path) if entry is None else entry
    except ELFError as err:
        raise BootError(f"{path}: malformed ELF: {err}") from err
    except struct.error as err:
        raise BootError(f"{path}: truncated ELF: {err}") from err
    if not segments:
        raise BootError(f"{path}: no loadable segments")
    if entry is None:
        raise BootError(f"{path}: no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); "
                        "not a PVH kernel")
    ordered = sorted(segments, key=lambda s: s.paddr)
    for a, b in zip(ordered, ordered[1:]):
        if a.paddr + a.memsz > b.paddr:
            raise BootError(f"{path}: segments at {a.paddr:#x} and {b.paddr:#x} overlap")
    for s in ordered:
        if s.paddr < layout.BOOT_STRUCTS_END:
            raise BootError(f"{path}: segment at {s.paddr:#x} overlaps the boot structures "
                            f"below {layout.BOOT_STRUCTS_END:#x}")
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in ordered):
        raise BootError(f"{path}: PVH entry {entry:#x} is outside every loadable segment")
    return Kernel(path, entry, tuple(ordered))


def _pvh_entry(seg, raw: bytes, path: str) -> int | None:
    off, size = seg["p_offset"], seg["p_filesz"]
    if off + size > len(raw):
        raise BootError(f"{path}: truncated: note segment runs past the end of the file")
    for note in seg.iter_notes():
        if note["n_name"] == "Xen" and note["n_type"] == layout.XEN_ELFNOTE_PHYS32_ENTRY:
            desc = note["n_descdata"]
            if isinstance(desc, str):
                desc = desc.encode("latin-1")
            if len(desc) not in (4, 8):
                raise BootError(f"{path}: PVH entry note has {len(desc)} bytes, want 4 or 8")
            return int.from_bytes(desc[:4], "little")
    return None


def memory_map(memory) -> list[tuple[int, int, int]]:
    """The e820-style map the guest sees: (addr, size, type)."""
    entries = []
    for r in memory.regions:
        if r.gpa == 0:
            entries.append((0, min(layout.LOW_RAM_END, r.size), layout.E820_RAM))
            if r.size > layout.LOW_RAM_END:
                entries.append((layout.LOW_RAM_END, min(r.size, layout.KERNEL_MIN_ADDR)
                                - layout.LOW_RAM_END, layout.E820_RESERVED))
            if r.size > layout.KERNEL_MIN_ADDR:
                entries.append((layout.KERNEL_MIN_ADDR, r.size - layout.KERNEL_MIN_ADDR,
                                layout.E820_RAM))
        else:
            entries.append((r.gpa, r.size, layout.E820_RAM))
    return entries


def check_fits(kernel: Kernel, regions, cmdline: str = "") -> bytes:
    """Check the kernel and command line against a RAM layout, before any VM exists.

    ``regions`` are objects with ``gpa`` and ``size`` (RegionSpec or Region). Returns the
    encoded command line."""
    blob = cmdline.encode()
    if b"\0" in blob:
        raise BootError("command line contains a NUL byte")
    if len(blob) >= layout.CMDLINE_MAX:
        raise BootError(f"command line is {len(blob)} bytes; the limit is "
                        f"{layout.CMDLINE_MAX - 1}")
    total = sum(r.size for r in regions)
    for s in kernel.segments:
        if not any(r.gpa <= s.paddr and s.paddr + s.memsz <= r.gpa + r.size for r in regions):
            raise BootError(f"{kernel.path}: segment at {s.paddr:#x}+{s.memsz:#x} is outside "
                            f"guest RAM ({total >> 20} MiB); give the guest more memory")
    return blob


def load(memory, kernel: Kernel, cmdline: str = "", rsdp_paddr: int = 0) -> int:
    """Write the kernel and the PVH boot structures into guest memory; return start_info.
    ``rsdp_paddr`` is where the ACPI RSDP is (0: no ACPI tables)."""
    blob = check_fits(kernel, memory.regions, cmdline)
    for s in kernel.segments:
        memory.write(s.paddr, s.data)
        if s.memsz > len(s.data):
            memory.zero(s.paddr + len(s.data), s.memsz - len(s.data))

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
