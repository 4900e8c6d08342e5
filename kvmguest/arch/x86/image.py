"""Kernel images: read a kernel file once, find how it boots (PVH, multiboot v1, or a
Linux bzImage whose payload is a PVH ELF) and check its loadable segments, before any VM
exists.

A kernel is an ELF with the PVH entry note (``XEN_ELFNOTE_PHYS32_ENTRY``), or a file with
a multiboot v1 header in its first 8 KiB (an ELF, or any file when the header's address
fields say where it loads). Every failure is a :class:`BootError` naming the file and
what is wrong, raised before anything is written to guest memory."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

from ...files import open_regular
from . import layout, linux, multiboot, pvh
from .kernel import (MAX_KERNEL, MULTIBOOT, PVH, BootError, Kernel, Segment, check_segments, read_at,
                     read_file)

_parsed: dict[tuple, Kernel] = {}
MAX_NOTES = 1 << 20          # bytes of ELF notes read (a kernel's are a few hundred)
MAX_PHDRS_BYTES = 1 << 20    # bytes of program headers read


def parse_kernel(path: str | Path) -> Kernel:
    """Read and check a kernel; raise BootError naming what is wrong. An ELF is checked
    from its headers and notes alone: its segments are read when it is loaded, straight
    into guest RAM (kernel.write_segments).

    A kernel already parsed is reused while its file is unchanged (same inode, size and
    mtime): parsing takes milliseconds, which would dominate a small guest's boot."""
    path = str(path)
    fd = open_regular(path, "kernel", BootError)
    try:
        st = os.fstat(fd)
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        key = (path, *identity)
        if key in _parsed:
            return _parsed[key]
        try:
            head = os.pread(fd, multiboot.SEARCH_BYTES, 0)
        except OSError as err:
            raise BootError(f"{path}: cannot read kernel: {err.strerror}") from err
        elf, bzimage = head[:4] == b"\x7fELF", linux.is_bzimage(head)
        header = None if elf or bzimage else multiboot.find_header(path, head)
        if not elf and not bzimage and header is None:
            raise BootError(f"{path}: not an ELF file, a Linux bzImage or a file with a "
                            "multiboot header")
        if st.st_size > MAX_KERNEL:
            raise BootError(f"{path}: {st.st_size >> 20} MiB is too large for a kernel "
                            f"(limit {MAX_KERNEL >> 20} MiB)")
        if elf:
            kernel = _parse_elf(path, _FileBytes(fd, path, st.st_size), head)
        elif bzimage:
            image = linux.vmlinux_from_bzimage(path, read_file(fd, path, st.st_size, "kernel"))
            kernel = _parse_elf(path, _Bytes(image, path), image[:multiboot.SEARCH_BYTES],
                                image=image)
        else:
            kernel = multiboot.kernel_from_header(path, st.st_size, header)
    finally:
        os.close(fd)
    kernel = dataclasses.replace(kernel, identity=identity)
    check_segments(kernel)
    if len(_parsed) > 32:
        _parsed.clear()
    _parsed[key] = kernel
    return kernel


class _FileBytes:
    """Ranges of a kernel file, read when asked (bounds checked against its size)."""

    def __init__(self, fd: int, path: str, size: int):
        self.fd, self.path, self.size = fd, path, size

    def read(self, offset: int, length: int) -> bytes:
        return read_at(self.fd, self.path, offset, length, "kernel")


class _Bytes:
    """Ranges of a kernel already in memory (a bzImage's vmlinux)."""

    def __init__(self, data, path: str):
        self.data, self.path, self.size = data, path, len(data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])


def _parse_elf(path: str, src, head: bytes, image=None) -> Kernel:
    segments, entry, pvh_entry, notes = _elf(path, src)
    is_linux = image is not None or LINUX_NOTE in notes
    if pvh_entry is not None:
        return Kernel(path, pvh_entry, segments, PVH, linux=is_linux, image=image)
    header = multiboot.find_header(path, head)
    if header is not None:
        return dataclasses.replace(multiboot.kernel_from_elf(path, segments, entry, header),
                                   image=image)
    if is_linux:
        raise BootError(f"{path}: a Linux kernel without the PVH entry note: kvmguest "
                        "boots Linux through PVH (CONFIG_PVH=y, as Debian's and Fedora's "
                        "kernels have)")
    raise BootError(f"{path}: no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) and no "
                    "multiboot header: not a PVH or multiboot kernel")


# ELF, as much as booting needs: the file header, program headers, PT_NOTE notes.
# (Read with struct: pyelftools' import alone took ~45 ms of every `kvmguest run`.)
EM_386, EM_X86_64 = 3, 62
_MACHINES = {2: "SPARC", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "S390", 40: "ARM",
             183: "AArch64", 243: "RISC-V", 258: "LoongArch"}
PT_LOAD, PT_NOTE = 1, 4
_EHDR = {1: struct.Struct("<16sHHIIIIIHHHHHH"), 2: struct.Struct("<16sHHIQQQIHHHHHH")}
_PHDR = {1: struct.Struct("<IIIIIIII"), 2: struct.Struct("<IIQQQQQQ")}
LINUX_NOTE = b"Linux"        # the owner of Linux's own ELF notes (build salt, LTO info)


def _phdrs(path: str, src):
    """(e_entry, [(type, offset, vaddr, paddr, filesz, memsz)]) of an ELF32/ELF64 file."""
    raw = src.read(0, min(src.size, _EHDR[2].size))
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
    if phoff + phnum * phentsize > src.size:
        raise BootError(f"{path}: truncated ELF: program headers run past the end of the file")
    if phnum * phentsize > MAX_PHDRS_BYTES:
        raise BootError(f"{path}: malformed ELF: {phnum} program headers")
    table = src.read(phoff, phnum * phentsize)
    out = []
    for i in range(phnum):
        f = ph.unpack_from(table, i * phentsize)
        if cls == 1:       # p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, ...
            out.append((f[0], f[1], f[2], f[3], f[4], f[5]))
        else:              # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz
            out.append((f[0], f[2], f[3], f[4], f[5], f[6]))
    return entry, out


def _elf(path: str, src):
    """(segments by address, the ELF entry translated to a physical address, PVH entry,
    the owners of its notes). Segments are checked against the file, not read."""
    entry, phdrs = _phdrs(path, src)
    segments, pvh_entry, phys_entry, owners = [], None, None, set()
    for ptype, off, vaddr, paddr, filesz, memsz in phdrs:
        if ptype == PT_LOAD and memsz:
            if off + filesz > src.size:
                raise BootError(f"{path}: truncated: segment at {paddr:#x} needs bytes up to "
                                f"{off + filesz}, file has {src.size}")
            if filesz > memsz:
                raise BootError(f"{path}: segment at {paddr:#x} has filesz > memsz")
            if memsz > MAX_KERNEL:
                raise BootError(f"{path}: segment at {paddr:#x} is {memsz >> 20} MiB (limit "
                                f"{MAX_KERNEL >> 20} MiB)")
            segments.append(Segment(paddr, off, filesz, memsz))
            if vaddr <= entry < vaddr + memsz:
                phys_entry = entry - vaddr + paddr
        elif ptype == PT_NOTE:
            if off + filesz > src.size:
                raise BootError(f"{path}: truncated: note segment runs past the end of the file")
            if filesz > MAX_NOTES:
                raise BootError(f"{path}: malformed ELF: a note segment of {filesz} bytes")
            found, names = _notes(src.read(off, filesz), path)
            owners |= names
            if pvh_entry is None:
                pvh_entry = found
    if not segments:
        raise BootError(f"{path}: no loadable segments")
    return tuple(sorted(segments, key=lambda s: s.paddr)), phys_entry, pvh_entry, owners


def _notes(notes: bytes, path: str) -> tuple[int | None, set[bytes]]:
    """The PVH entry from an ELF note segment (namesz, descsz, type, name, desc; each
    padded to 4 bytes), or None; and the owners (names) of its notes."""
    pos, entry, owners = 0, None, set()
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name_at = pos + 12
        desc_at = name_at + ((namesz + 3) & ~3)
        end = desc_at + ((descsz + 3) & ~3)
        if desc_at + descsz > len(notes):
            raise BootError(f"{path}: malformed ELF: a note runs past its segment")
        name = notes[name_at:name_at + namesz].rstrip(b"\0")
        owners.add(name)
        if name == b"Xen" and ntype == layout.XEN_ELFNOTE_PHYS32_ENTRY and entry is None:
            if descsz not in (4, 8):
                raise BootError(f"{path}: PVH entry note has {descsz} bytes, want 4 or 8")
            entry = int.from_bytes(notes[desc_at:desc_at + 4], "little")
        pos = end
    return entry, owners


LOADERS = {PVH: pvh, MULTIBOOT: multiboot}     # each: check(...) and boot(...)


def loader(kernel: Kernel):
    """The boot protocol's module for ``kernel``: ``check(kernel, regions, cmdline,
    modules)`` before any VM, ``boot(memory, kernel, cmdline, modules, platform, rsdp)``
    -> the boot CPU's start registers."""
    return LOADERS[kernel.protocol]
