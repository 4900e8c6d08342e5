"""Kernel images: read a kernel file once, find how it boots (PVH, multiboot v1, or a
Linux bzImage whose payload is a PVH ELF) and check its loadable segments, before any VM
exists.

A kernel is an ELF with the PVH entry note (``XEN_ELFNOTE_PHYS32_ENTRY``), or a file with
a multiboot v1 header in its first 8 KiB (an ELF, or any file when the header's address
fields say where it loads). Every failure is a :class:`BootError` naming the file and
what is wrong, raised before anything is written to guest memory."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from ...files import open_regular
from . import layout, linux, multiboot
from .kernel import PVH, BootError, Kernel, Segment, check_segments, read_file

_parsed: dict[tuple, Kernel] = {}


def parse_kernel(path: str | Path) -> Kernel:
    """Read and check a kernel; raise BootError naming what is wrong.

    A kernel already parsed is reused while its file is unchanged (same inode, size and
    mtime): parsing takes milliseconds, which would dominate a small guest's boot."""
    path = str(path)
    fd = open_regular(path, "kernel", BootError)
    try:
        st = os.fstat(fd)
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        if key in _parsed:
            return _parsed[key]
        try:
            head = os.pread(fd, multiboot.SEARCH_BYTES, 0)
        except OSError as err:
            raise BootError(f"{path}: cannot read kernel: {err.strerror}") from err
        elf = head[:4] == b"\x7fELF"
        bzimage = not elf and linux.is_bzimage(head)
        if not elf and not bzimage and multiboot.find_header(path, head) is None:
            raise BootError(f"{path}: not an ELF file, a Linux bzImage or a file with a "
                            "multiboot header")
        raw = read_file(fd, path, st.st_size, "kernel")
        if bzimage:
            raw = linux.vmlinux_from_bzimage(path, raw)
    finally:
        os.close(fd)
    kernel = _parse(path, raw)
    if len(_parsed) > 32:
        _parsed.clear()
    _parsed[key] = kernel
    return kernel


def _parse(path: str, raw: bytes) -> Kernel:
    header = multiboot.find_header(path, raw)
    if raw[:4] != b"\x7fELF":
        if header is None:
            raise BootError(f"{path}: not an ELF file and no multiboot header")
        kernel = multiboot.kernel_from_header(path, raw, header)
    else:
        segments, entry, pvh_entry = _elf(path, raw)
        if pvh_entry is not None:
            kernel = Kernel(path, pvh_entry, segments, PVH, linux=_is_linux(raw))
        elif header is not None:
            kernel = multiboot.kernel_from_elf(path, segments, entry, header)
        elif _is_linux(raw):
            raise BootError(f"{path}: a Linux kernel without the PVH entry note: kvmguest "
                            "boots Linux through PVH (CONFIG_PVH=y, as Debian's and Fedora's "
                            "kernels have)")
        else:
            raise BootError(f"{path}: no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) and no "
                            "multiboot header: not a PVH or multiboot kernel")
    check_segments(kernel)
    return kernel


# ELF, as much as booting needs: the file header, program headers, PT_NOTE notes.
# (Read with struct: pyelftools' import alone took ~45 ms of every `kvmguest run`.)
EM_386, EM_X86_64 = 3, 62
_MACHINES = {2: "SPARC", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "S390", 40: "ARM",
             183: "AArch64", 243: "RISC-V", 258: "LoongArch"}
PT_LOAD, PT_NOTE = 1, 4
_EHDR = {1: struct.Struct("<16sHHIIIIIHHHHHH"), 2: struct.Struct("<16sHHIQQQIHHHHHH")}
_PHDR = {1: struct.Struct("<IIIIIIII"), 2: struct.Struct("<IIQQQQQQ")}


def _phdrs(path: str, raw: bytes):
    """(e_entry, [(type, offset, vaddr, paddr, filesz, memsz)]) of an ELF32/ELF64 file."""
    if len(raw) < 16 or raw[4] not in _EHDR:
        raise BootError(f"{path}: malformed ELF: unknown class")
    if raw[5] != 1:
        raise BootError(f"{path}: malformed ELF: not little-endian")
    cls = raw[4]
    if len(raw) < _EHDR[cls].size:
        raise BootError(f"{path}: truncated ELF: the file header is cut short")
    (_, _, machine, _, entry, phoff, _, _, _, phentsize, phnum, _, _, _) = _EHDR[cls].unpack_from(raw)
    if machine not in (EM_386, EM_X86_64):
        raise BootError(f"{path}: ELF for {_MACHINES.get(machine, f'machine {machine}')}, "
                        "not x86")
    ph = _PHDR[cls]
    if phnum and phentsize < ph.size:
        raise BootError(f"{path}: malformed ELF: program header size {phentsize}")
    if phoff + phnum * phentsize > len(raw):
        raise BootError(f"{path}: truncated ELF: program headers run past the end of the file")
    out = []
    for i in range(phnum):
        f = ph.unpack_from(raw, phoff + i * phentsize)
        if cls == 1:       # p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, ...
            out.append((f[0], f[1], f[2], f[3], f[4], f[5]))
        else:              # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz
            out.append((f[0], f[2], f[3], f[4], f[5], f[6]))
    return entry, out


def _elf(path: str, raw: bytes):
    """(segments by address, the ELF entry translated to a physical address, PVH entry)."""
    entry, phdrs = _phdrs(path, raw)
    segments, pvh_entry, phys_entry = [], None, None
    for ptype, off, vaddr, paddr, filesz, memsz in phdrs:
        if ptype == PT_LOAD and memsz:
            if off + filesz > len(raw):
                raise BootError(f"{path}: truncated: segment at {paddr:#x} needs bytes up to "
                                f"{off + filesz}, file has {len(raw)}")
            if filesz > memsz:
                raise BootError(f"{path}: segment at {paddr:#x} has filesz > memsz")
            segments.append(Segment(paddr, raw[off:off + filesz], memsz))
            if vaddr <= entry < vaddr + memsz:
                phys_entry = entry - vaddr + paddr
        elif ptype == PT_NOTE and pvh_entry is None:
            if off + filesz > len(raw):
                raise BootError(f"{path}: truncated: note segment runs past the end of the file")
            pvh_entry = _pvh_entry(raw[off:off + filesz], path)
    if not segments:
        raise BootError(f"{path}: no loadable segments")
    return tuple(sorted(segments, key=lambda s: s.paddr)), phys_entry, pvh_entry


def _pvh_entry(notes: bytes, path: str) -> int | None:
    """The PVH entry from an ELF note segment (namesz, descsz, type, name, desc; each
    padded to 4 bytes), or None."""
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name_at = pos + 12
        desc_at = name_at + ((namesz + 3) & ~3)
        end = desc_at + ((descsz + 3) & ~3)
        if desc_at + descsz > len(notes):
            raise BootError(f"{path}: malformed ELF: a note runs past its segment")
        name = notes[name_at:name_at + namesz].rstrip(b"\0")
        if name == b"Xen" and ntype == layout.XEN_ELFNOTE_PHYS32_ENTRY:
            if descsz not in (4, 8):
                raise BootError(f"{path}: PVH entry note has {descsz} bytes, want 4 or 8")
            return int.from_bytes(notes[desc_at:desc_at + 4], "little")
        pos = end
    return None


def _is_linux(raw: bytes) -> bool:
    """A vmlinux carries "Linux" ELF notes (the build id, the version)."""
    return b"Linux version " in raw[:64 << 20]


