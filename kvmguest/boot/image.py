"""Kernel images: read a kernel file once, find how it boots (PVH or multiboot v1) and
check its loadable segments, before any VM exists.

A kernel is an ELF with the PVH entry note (``XEN_ELFNOTE_PHYS32_ENTRY``), or a file with
a multiboot v1 header in its first 8 KiB (an ELF, or any file when the header's address
fields say where it loads). Every failure is a :class:`BootError` naming the file and
what is wrong, raised before anything is written to guest memory."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..abi import PAGE_SIZE
from ..errors import EXIT_BAD_INPUT, KvmguestError
from ..files import open_regular
from . import layout

PVH, MULTIBOOT = "pvh", "multiboot"
MAX_KERNEL = 512 << 20       # bytes; a bigger file is not a kernel for these guests


class BootError(KvmguestError, ValueError):
    """The kernel cannot be booted: not an ELF, no entry, bad segments, ..."""

    exit_code = EXIT_BAD_INPUT


@dataclass(frozen=True)
class Segment:
    paddr: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class Kernel:
    """A checked kernel, ready to load: its boot protocol, segments, 32-bit entry point."""
    path: str
    entry: int
    segments: tuple[Segment, ...]
    protocol: str = PVH
    header: dict = field(default_factory=dict)     # the multiboot header's fields

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


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
        from . import multiboot
        try:
            head = os.pread(fd, multiboot.SEARCH_BYTES, 0)
        except OSError as err:
            raise BootError(f"{path}: cannot read kernel: {err.strerror}") from err
        from . import linux
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


class Module:
    """A module (QEMU's ``-initrd``): its path and size, checked; its bytes are read
    straight into guest RAM when the kernel is loaded (never held in the VMM first)."""

    def __init__(self, path: str):
        fd = open_regular(path, "module", BootError)
        try:
            self.size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        self.path = path
        if self.size == 0:
            raise BootError(f"module {path} is empty (or a special file whose size is not "
                            "known, like those in /proc)")
        if self.size > MAX_KERNEL:
            raise BootError(f"module {path}: {self.size >> 20} MiB is too large (limit "
                            f"{MAX_KERNEL >> 20} MiB)")

    def read_into(self, memory, gpa: int) -> None:
        fd = open_regular(self.path, "module", BootError)
        try:
            if memory.fill_from(gpa, fd, self.size) != self.size:
                raise BootError(f"module {self.path} became shorter while it was read")
        except OSError as err:
            raise BootError(f"cannot read module {self.path}: {err.strerror}") from err
        finally:
            os.close(fd)


def check_module_names(modules, most: int, names_at: int) -> None:
    """The limits both protocols share: at most ``most`` modules, and their names
    (NUL-terminated, written from ``names_at``) ending before the command line's page."""
    if len(modules) > most:
        raise BootError(f"{len(modules)} modules: at most {most}")
    if names_at + sum(len(os.fsencode(m.path)) + 1 for m in modules) > layout.CMDLINE:
        raise BootError("module names are too long")


def write_modules(memory, modules, places, names_at: int) -> list[tuple[int, int, int]]:
    """Each module read into guest RAM at its place and its name written from
    ``names_at``: (address, size, name's address) of each, for the protocol's table."""
    out = []
    for m, at in zip(modules, places):
        m.read_into(memory, at)
        name = os.fsencode(m.path) + b"\0"
        memory.write(names_at, name)
        out.append((at, m.size, names_at))
        names_at += len(name)
    return out


def place_modules(kernel: Kernel, regions, modules) -> list[int]:
    """Where modules go for a PVH kernel (Linux's initrd is module 0): page-aligned, from
    the top of the first RAM region down, as QEMU places an initrd, above the kernel;
    BootError if they do not fit."""
    low = min(regions, key=lambda r: r.gpa)
    top, floor, out = low.gpa + low.size, page_up(kernel.end), []
    for m in modules:
        top = (top - m.size) & ~(PAGE_SIZE - 1)
        if top < floor:
            need = sum(page_up(x.size) for x in modules) + floor
            raise BootError(f"{kernel.path}: the kernel and {len(modules)} module(s) need "
                            f"{need >> 20} MiB or more of RAM below 3 GiB; give the guest "
                            "more memory")
        out.append(top)
    return out


def read_file(fd: int, path: str, size: int, what: str) -> bytes:
    """A kernel's (or module's) bytes, read whole, its size capped at MAX_KERNEL."""
    try:
        if size > MAX_KERNEL:
            raise BootError(f"{path}: {size >> 20} MiB is too large for a {what} "
                            f"(limit {MAX_KERNEL >> 20} MiB)")
        raw = os.pread(fd, size, 0)
        while len(raw) < size:
            more = os.pread(fd, size - len(raw), len(raw))
            if not more:
                break
            raw += more
        return raw
    except OSError as err:
        raise BootError(f"{path}: cannot read {what}: {err.strerror}") from err


def _parse(path: str, raw: bytes) -> Kernel:
    from . import multiboot             # the multiboot header format lives there
    header = multiboot.find_header(path, raw)
    if raw[:4] != b"\x7fELF":
        if header is None:
            raise BootError(f"{path}: not an ELF file and no multiboot header")
        kernel = multiboot.kernel_from_header(path, raw, header)
    else:
        segments, entry, pvh_entry = _elf(path, raw)
        if pvh_entry is not None:
            kernel = Kernel(path, pvh_entry, segments, PVH)
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


def check_segments(kernel: Kernel) -> None:
    """Segments must not overlap each other or the boot structures, and must hold the
    entry point; a 32-bit entry means everything loads below 4 GiB."""
    path, ordered = kernel.path, kernel.segments
    for a, b in zip(ordered, ordered[1:]):
        if a.paddr + a.memsz > b.paddr:
            raise BootError(f"{path}: segments at {a.paddr:#x} and {b.paddr:#x} overlap")
    for s in ordered:
        if s.paddr < layout.BOOT_STRUCTS_END:
            raise BootError(f"{path}: segment at {s.paddr:#x} overlaps the boot structures "
                            f"below {layout.BOOT_STRUCTS_END:#x}")
        if s.paddr < layout.KERNEL_MIN_ADDR and s.paddr + s.memsz > layout.LOW_RAM_END:
            raise BootError(f"{path}: segment at {s.paddr:#x}+{s.memsz:#x} overlaps the "
                            f"legacy BIOS area [{layout.LOW_RAM_END:#x}, "
                            f"{layout.KERNEL_MIN_ADDR:#x}) (ACPI tables, BIOS stubs)")
    if not any(s.paddr <= kernel.entry < s.paddr + s.memsz for s in ordered):
        raise BootError(f"{path}: {kernel.protocol} entry {kernel.entry:#x} is outside every "
                        "loadable segment")


def check_fits(kernel: Kernel, regions, cmdline: str | bytes = "", extra: int = 0) -> bytes:
    """Check the kernel and command line against a RAM layout, before any VM exists.

    ``regions`` are objects with ``gpa`` and ``size`` (RegionSpec or Region); ``extra``
    bytes (multiboot modules) must fit after the kernel too. Returns the encoded command
    line."""
    blob = cmdline if isinstance(cmdline, bytes) else cmdline.encode()
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
    if extra:
        start = page_up(kernel.end)
        if not any(r.gpa <= start and start + extra <= r.gpa + r.size for r in regions):
            raise BootError(f"{kernel.path}: the kernel and its {extra} bytes of modules need "
                            f"{(start + extra) >> 20} MiB or more of RAM below 3 GiB; "
                            f"give the guest more memory")
    return blob


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


def write_segments(memory, kernel: Kernel) -> None:
    """Copy the segments into guest memory and zero what the file does not hold (BSS)."""
    for s in kernel.segments:
        memory.write(s.paddr, s.data)
        if s.memsz > len(s.data):
            memory.zero(s.paddr + len(s.data), s.memsz - len(s.data))


def page_up(n: int) -> int:
    return -(-n // PAGE_SIZE) * PAGE_SIZE
