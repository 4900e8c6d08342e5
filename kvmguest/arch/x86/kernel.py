"""What every boot protocol shares: a checked kernel (its segments and entry), the
modules handed to it, where they go and how they are written, the memory map, and
BootError. image.py finds which protocol a file boots with; pvh.py, multiboot.py and
linux.py are the protocols."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ...abi import PAGE_SIZE
from ...errors import EXIT_BAD_INPUT, KvmguestError
from ...files import open_regular
from . import layout

PVH, MULTIBOOT = "pvh", "multiboot"
MAX_KERNEL = 512 << 20       # bytes; a bigger file is not a kernel for these guests


class BootError(KvmguestError, ValueError):
    """The kernel cannot be booted: not an ELF, no entry, bad segments, ..."""

    exit_code = EXIT_BAD_INPUT


@dataclass(frozen=True)
class Segment:
    """A loadable segment: ``filesz`` bytes at ``offset`` of the kernel's bytes (its file,
    or the image a bzImage decompressed to) go to ``paddr``; the rest of ``memsz`` is
    zeroed. Nothing is read until the kernel is loaded, after every check."""
    paddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class Kernel:
    """A checked kernel, ready to load: its boot protocol, segments, 32-bit entry point."""
    path: str
    entry: int
    segments: tuple[Segment, ...]
    protocol: str = PVH
    header: dict = field(default_factory=dict)     # the multiboot header's fields
    linux: bool = False               # a Linux kernel: a bzImage, or an ELF with Linux's notes
    image: bytes | bytearray | None = field(default=None, repr=False)  # a bzImage's vmlinux
    identity: tuple = ()              # the file's (inode, size, mtime) when it was checked

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


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
    if size > MAX_KERNEL:
        raise BootError(f"{path}: {size >> 20} MiB is too large for a {what} "
                        f"(limit {MAX_KERNEL >> 20} MiB)")
    return read_at(fd, path, 0, size, what)


def read_at(fd: int, path: str, offset: int, size: int, what: str) -> bytes:
    """``size`` bytes of ``fd`` at ``offset`` (BootError when the file is shorter)."""
    try:
        raw = os.pread(fd, size, offset)
        while len(raw) < size:
            more = os.pread(fd, size - len(raw), offset + len(raw))
            if not more:
                raise BootError(f"{path}: the {what} ends before byte {offset + size}")
            raw += more
        return raw
    except OSError as err:
        raise BootError(f"{path}: cannot read {what}: {err.strerror}") from err


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
    """Each segment read once, straight into guest memory (from the image a bzImage
    decompressed to, or from the file, which must be the one that was checked), and what
    the file does not hold (BSS) zeroed."""
    if kernel.image is not None:
        view = memoryview(kernel.image)
        for s in kernel.segments:
            memory.write(s.paddr, view[s.offset:s.offset + s.filesz])
    else:
        fd = open_regular(kernel.path, "kernel", BootError)
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns) != kernel.identity:
                raise BootError(f"{kernel.path}: the kernel file changed after it was checked")
            for s in kernel.segments:
                try:
                    got = memory.fill_from(s.paddr, fd, s.filesz, s.offset)
                except OSError as err:
                    raise BootError(f"{kernel.path}: cannot read kernel: {err.strerror}") \
                        from err
                if got != s.filesz:
                    raise BootError(f"{kernel.path}: the kernel file became shorter while "
                                    "it was read")
        finally:
            os.close(fd)
    for s in kernel.segments:
        if s.memsz > s.filesz:
            memory.zero(s.paddr + s.filesz, s.memsz - s.filesz)


def page_up(n: int) -> int:
    return -(-n // PAGE_SIZE) * PAGE_SIZE
