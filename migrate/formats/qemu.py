"""Reading QEMU's migration files: the RAM of a `migrate file:` save, mapped-ram or not.

QEMU >= 9 with the ``mapped-ram`` capability (with or without multifd and direct-io)
writes, in the RAM section's first record, one header per RAM block giving the offset
of a page bitmap and of a page area where page ``i`` lives at ``pages_offset + i *
page_size`` — the layout kvmguest's own snapshots use. Without mapped-ram the pages are
records in the stream. Both are read here; nothing else of QEMU's stream is interpreted:

    "QEVM" u32 version 3 | configuration section | ram SECTION_START ... footer |
    ram SECTION_PART/END ... | device sections (skipped) | EOF | VM description (JSON)

Device state comes only after the RAM section's end, so it is never parsed: the reader
stops there and checks that the file ends with QEMU's VM description (which it writes
last), the sign of a complete save. Every length and offset is checked against the file
before use; anything off is a SnapshotError naming it and its offset.

Memory follows what the file holds, never what it declares: a stream's pages are kept
as arrays of the records present (a block declared 1 TiB with three records costs three
entries), and a mapped-ram bitmap is read a chunk at a time, counted packed and walked
as runs (:meth:`QemuBlock.segments`), never unpacked whole.
"""

from __future__ import annotations

import json
import os
import struct
from array import array
from dataclasses import dataclass, field

import numpy as np

from migrate.format import QEMU_MAGIC, SnapshotError, count_bits, unpack_bits
from migrate.formats.base import QEMU, Loaded, SnapshotReader, Source
from migrate.pageio import runs_of_mask

FILE_VERSION = 3
RAM_VERSION = 4
MAPPED_RAM_HEADER = struct.Struct(">IQQQ")     # version, page size, bitmap, pages offsets
MAPPED_RAM_VERSION = 1

# Section types (migration/savevm.c) and RAM record flags (migration/ram.c).
EOF, SECTION_START, SECTION_PART, SECTION_END, SECTION_FULL = 0x00, 0x01, 0x02, 0x03, 0x04
SUBSECTION, VMDESCRIPTION, CONFIGURATION, COMMAND, SECTION_FOOTER = 0x05, 0x06, 0x07, 0x08, 0x7E
FLAG_ZERO, FLAG_MEM_SIZE, FLAG_PAGE, FLAG_EOS = 0x02, 0x04, 0x08, 0x10
FLAG_CONTINUE, FLAG_XBZRLE, FLAG_HOOK, FLAG_COMPRESS, FLAG_MULTIFD_FLUSH = (
    0x20, 0x40, 0x80, 0x100, 0x200)
_KNOWN_FLAGS = FLAG_ZERO | FLAG_MEM_SIZE | FLAG_PAGE | FLAG_EOS | FLAG_CONTINUE \
    | FLAG_MULTIFD_FLUSH
MAX_BLOCKS = 4096
VMDESC_SEARCH = 16 << 20         # QEMU's own analyzer looks in the last 10 MiB
BITMAP_CHUNK = 1 << 20           # bytes of a mapped-ram bitmap read at a time


@dataclass
class QemuBlock:
    name: str
    size: int
    page_size: int
    pages_present: int = 0                 # pages whose data the file holds
    pages_offset: int = 0                  # mapped-ram: page i at pages_offset + i * page_size
    bitmap_offset: int = 0
    # stream: the pages with data, sorted, and the file offset of each one's last record
    page_index: np.ndarray | None = None
    page_offsets: np.ndarray | None = None
    records: int = 0
    zero_records: int = 0
    # stream, while parsing: every record's page and offset (-1: a zero page), in order
    _seen_index: array = field(default_factory=lambda: array("q"), repr=False)
    _seen_offsets: array = field(default_factory=lambda: array("q"), repr=False)

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    @property
    def bitmap_length(self) -> int:
        return -(-self.npages // 64) * 8

    def count_bitmap(self, fd: int) -> None:
        """pages_present of a mapped-ram block, from its bitmap read a chunk at a time."""
        total = 0
        for pos in range(0, self.bitmap_length, BITMAP_CHUNK):
            raw = os.pread(fd, min(BITMAP_CHUNK, self.bitmap_length - pos),
                           self.bitmap_offset + pos)
            full, rest = divmod(min(self.npages - pos * 8, len(raw) * 8), 8)
            total += count_bits(raw[:full])            # bits past the last page do not count
            if rest:
                total += bin(raw[full] & ((1 << rest) - 1)).count("1")
        self.pages_present = total

    def add_record(self, index: int, offset: int | None) -> None:
        """A stream record of page ``index``: its data at ``offset``, or None (zero)."""
        self._seen_index.append(index)
        self._seen_offsets.append(-1 if offset is None else offset)
        if offset is None:
            self.zero_records += 1
        else:
            self.records += 1

    def finish_records(self) -> None:
        """A stream's records -> the last record of each page, sorted by page."""
        idx = np.frombuffer(self._seen_index, dtype=np.int64)
        offs = np.frombuffer(self._seen_offsets, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        idx, offs = idx[order], offs[order]
        last = np.ones(len(idx), dtype=np.bool_)
        last[:-1] = idx[1:] != idx[:-1]                # the last record of a page wins
        idx, offs = idx[last], offs[last]
        data = offs >= 0
        self.page_index, self.page_offsets = idx[data], offs[data]
        self.pages_present = len(self.page_index)
        self._seen_index, self._seen_offsets = array("q"), array("q")

    def segments(self, fd: int):
        """(first page, file offset, pages): runs of pages with data, contiguous in RAM and
        in the file, in page order; memory bounded by a chunk of the bitmap."""
        ps = self.page_size
        if self.page_index is not None:
            idx, offs = self.page_index, self.page_offsets
            if not len(idx):
                return
            breaks = np.flatnonzero((np.diff(idx) != 1) | (np.diff(offs) != ps)) + 1
            starts = np.concatenate(([0], breaks))
            ends = np.concatenate((breaks, [len(idx)]))
            for s, e in zip(starts.tolist(), ends.tolist()):
                yield int(idx[s]), int(offs[s]), e - s
            return
        pending = None                                 # a run may cross chunk boundaries
        for pos in range(0, self.bitmap_length, BITMAP_CHUNK):
            raw = os.pread(fd, min(BITMAP_CHUNK, self.bitmap_length - pos),
                           self.bitmap_offset + pos)
            first = pos * 8
            bits = unpack_bits(raw, 0, min(len(raw) * 8, self.npages - first))
            for s, e in runs_of_mask(bits).tolist():
                s, e = s + first, e + first
                if pending is not None and pending[1] == s:
                    pending = (pending[0], e)
                    continue
                if pending is not None:
                    yield pending[0], self.pages_offset + pending[0] * ps, pending[1] - pending[0]
                pending = (s, e)
        if pending is not None:
            yield pending[0], self.pages_offset + pending[0] * ps, pending[1] - pending[0]


@dataclass
class QemuFile:
    version: int
    machine: str
    capabilities: list[str]
    page_size: int
    mapped_ram: bool
    blocks: list[QemuBlock] = field(default_factory=list)
    vmdesc_length: int = 0

    @property
    def ram_size(self) -> int:
        return sum(b.size for b in self.blocks)


class _Cursor:
    """Big-endian reads at a position of an fd, each checked against the file's size."""

    def __init__(self, fd: int, size: int, pos: int = 0):
        self.fd, self.size, self.pos = fd, size, pos

    def _fits(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise SnapshotError(f"QEMU file: {what} at offset {self.pos} runs past the end "
                                f"of the file ({self.size} bytes): truncated?")

    def read(self, n: int, what: str) -> bytes:
        self._fits(n, what)
        data = os.pread(self.fd, n, self.pos)
        if len(data) != n:
            raise SnapshotError(f"QEMU file: short read of {what} at offset {self.pos}")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self._fits(n, what)
        self.pos += n

    def u8(self, what: str) -> int:
        return self.read(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack(">H", self.read(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack(">I", self.read(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack(">Q", self.read(8, what))[0]

    def name(self, length: int, what: str) -> str:
        raw = self.read(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SnapshotError(f"QEMU file: {what} at offset {self.pos - length} is not "
                                "text: damaged?") from None

    def short_name(self, what: str) -> str:
        return self.name(self.u8(f"{what} length"), what)

    def peek(self) -> int | None:
        return os.pread(self.fd, 1, self.pos)[0] if self.pos < self.size else None


def _configuration(c: _Cursor) -> tuple[str, list[str], int]:
    """The configuration section: machine type, capabilities, target page size."""
    machine = c.name(c.u32("machine type length"), "machine type")
    caps: list[str] = []
    page_bits = 12
    while c.peek() == SUBSECTION:
        c.pos += 1
        at = c.pos
        name = c.short_name("configuration subsection name")
        c.u32("subsection version")
        if name == "configuration/target-page-bits":
            page_bits = c.u32("target page bits")
        elif name == "configuration/capabilities":
            count = c.u32("capability count")
            if count > 256:
                raise SnapshotError(f"QEMU file: {count} capabilities at offset {at}: damaged?")
            caps = [c.short_name("capability") for _ in range(count)]
        elif name == "configuration/uuid":
            c.read(16, "uuid")
        else:
            raise SnapshotError(f"QEMU file: configuration subsection {name!r} at offset {at} "
                                "is not one kvmguest knows how to skip")
    if not 9 <= page_bits <= 30:
        raise SnapshotError(f"QEMU file: target page bits {page_bits}: damaged?")
    return machine, caps, 1 << page_bits


def _ram_records(c: _Cursor, q: QemuFile, by_name: dict) -> None:
    """RAM records up to and including EOS (one section's worth)."""
    current: QemuBlock | None = None
    ps = q.page_size
    while True:
        at = c.pos
        word = c.u64("RAM record")
        flags, addr = word & (ps - 1), word & ~(ps - 1)
        if flags & ~_KNOWN_FLAGS:
            what = ("XBZRLE" if flags & FLAG_XBZRLE else "compressed" if flags & FLAG_COMPRESS
                    else "RDMA hook" if flags & FLAG_HOOK else f"flags {flags:#x}")
            raise SnapshotError(f"QEMU file: RAM record at offset {at} uses {what}, which "
                                "kvmguest does not read")
        if flags & FLAG_MEM_SIZE:
            _ram_blocks(c, q, addr, by_name)
        if flags & (FLAG_ZERO | FLAG_PAGE):
            if q.mapped_ram:
                raise SnapshotError(f"QEMU file: a page record at offset {at} in a mapped-ram "
                                    "file: damaged?")
            if not flags & FLAG_CONTINUE:
                name = c.short_name("RAM block name")
                current = by_name.get(name)
                if current is None:
                    raise SnapshotError(f"QEMU file: page record at offset {at} names RAM "
                                        f"block {name!r}, which the file never declared")
            elif current is None:
                raise SnapshotError(f"QEMU file: page record at offset {at} continues a block "
                                    "when none was named: damaged?")
            if addr >= current.size:
                raise SnapshotError(f"QEMU file: page at {addr:#x} beyond RAM block "
                                    f"{current.name!r} ({current.size:#x} bytes), record at "
                                    f"offset {at}")
            if flags & FLAG_ZERO:
                c.u8("zero page fill byte")
                current.add_record(addr // ps, None)
            else:
                current.add_record(addr // ps, c.pos)
                c.skip(ps, "page")
        if flags & FLAG_EOS:
            return


def _ram_blocks(c: _Cursor, q: QemuFile, total: int, by_name: dict) -> None:
    if q.blocks:
        raise SnapshotError(f"QEMU file: a second RAM block list at offset {c.pos}: damaged?")
    if "postcopy-ram" in q.capabilities:
        raise SnapshotError("QEMU file saved with postcopy-ram: its block list may carry "
                            "page sizes kvmguest does not read")
    remaining = total
    while remaining > 0:
        at = c.pos
        name = c.short_name("RAM block name")
        size = c.u64("RAM block length")
        if size == 0 or size % q.page_size or size > remaining or name in by_name \
                or len(q.blocks) >= MAX_BLOCKS:
            raise SnapshotError(f"QEMU file: RAM block {name!r} at offset {at} has length "
                                f"{size:#x} (of {remaining:#x} left to declare): damaged?")
        remaining -= size
        if "x-ignore-shared" in q.capabilities:
            c.u64("RAM block address")
        block = QemuBlock(name, size, q.page_size)
        if q.mapped_ram:
            _mapped_header(c, q, block)
        q.blocks.append(block)
        by_name[name] = block


def _mapped_header(c: _Cursor, q: QemuFile, b: QemuBlock) -> None:
    at = c.pos
    version, page_size, bitmap_offset, pages_offset = MAPPED_RAM_HEADER.unpack(
        c.read(MAPPED_RAM_HEADER.size, f"mapped-ram header of {b.name!r}"))
    if version != MAPPED_RAM_VERSION or page_size != q.page_size:
        raise SnapshotError(f"QEMU file: mapped-ram header of {b.name!r} at offset {at} has "
                            f"version {version}, page size {page_size}: not readable here")
    bitmap_len = b.bitmap_length
    if not (c.pos <= bitmap_offset and bitmap_offset + bitmap_len <= pages_offset
            and pages_offset + b.size <= c.size):
        raise SnapshotError(f"QEMU file: mapped-ram block {b.name!r}: bitmap at "
                            f"{bitmap_offset:#x}, pages at {pages_offset:#x}+{b.size:#x} do not "
                            f"fit the file ({c.size} bytes): truncated or damaged?")
    b.bitmap_offset, b.pages_offset = bitmap_offset, pages_offset
    b.count_bitmap(c.fd)
    c.pos = pages_offset + b.size          # QEMU's stream carries on after the page area


def _vmdesc_length(fd: int, size: int) -> int:
    """The length of the VM description QEMU writes last (EOF byte, 0x06, be32 length,
    JSON), or 0 when the file does not end with one."""
    start = max(0, size - VMDESC_SEARCH)
    tail = os.pread(fd, size - start, start)
    at = len(tail)
    for _ in range(64):              # candidates: 0x00 0x06 len32 '{', the last ones first
        at = tail.rfind(b"\0\x06", 0, at)
        if at < 0:
            return 0
        p = at + 1
        length = len(tail) - p - 5
        if tail[p + 1:p + 5] == struct.pack(">I", length) and tail[p + 5:p + 6] == b"{":
            try:
                desc = json.loads(tail[p + 5:])
            except (ValueError, RecursionError):
                return 0
            return length if isinstance(desc, dict) and "devices" in desc else 0
    return 0


def read_qemu(fd: int) -> QemuFile:
    """Parse a QEMU migration file's configuration and RAM; raise SnapshotError if it is
    damaged, incomplete, or uses a form of RAM record kvmguest does not read."""
    size = os.fstat(fd).st_size
    c = _Cursor(fd, size)
    if c.read(4, "magic") != QEMU_MAGIC:
        raise SnapshotError("not a QEMU migration file")
    version = c.u32("file version")
    if version != FILE_VERSION:
        raise SnapshotError(f"QEMU file version {version}; kvmguest reads version 3")
    if c.u8("configuration section") != CONFIGURATION:
        raise SnapshotError("QEMU file without a configuration section (QEMU < 2.x?): not "
                            "readable here")
    machine, caps, page_size = _configuration(c)
    q = QemuFile(version, machine, caps, page_size, "mapped-ram" in caps)
    by_name: dict[str, QemuBlock] = {}
    ram_id = None
    ended = False
    while not ended:
        at = c.pos
        kind = c.u8("section type")
        if kind in (SECTION_START, SECTION_FULL):
            sid = c.u32("section id")
            name = c.short_name("section name")
            c.u32("instance id")
            sversion = c.u32("section version")
            if kind == SECTION_FULL or name != "ram" or ram_id is not None:
                raise SnapshotError(f"QEMU file: section {name!r} at offset {at} before the "
                                    "RAM section ended: not readable here")
            if sversion != RAM_VERSION:
                raise SnapshotError(f"QEMU file: RAM section version {sversion}; kvmguest "
                                    f"reads version {RAM_VERSION}")
            ram_id = sid
            _ram_records(c, q, by_name)
        elif kind in (SECTION_PART, SECTION_END):
            sid = c.u32("section id")
            if sid != ram_id:
                raise SnapshotError(f"QEMU file: section id {sid} at offset {at} is not the "
                                    "RAM section's: not readable here")
            _ram_records(c, q, by_name)
            ended = kind == SECTION_END
        elif kind == COMMAND:
            c.u16("command")
            c.read(c.u16("command length"), "command data")
            continue
        elif kind == EOF:
            break
        else:
            raise SnapshotError(f"QEMU file: unexpected section type {kind:#x} at offset {at}: "
                                "damaged?")
        if c.peek() == SECTION_FOOTER:
            c.pos += 1
            if c.u32("section footer") != ram_id:
                raise SnapshotError(f"QEMU file: section footer at offset {c.pos - 4} does "
                                    "not match: damaged?")
    if not q.blocks:
        raise SnapshotError("QEMU file has no RAM blocks")
    if not ended:
        raise SnapshotError("QEMU file: the RAM section never ends: an interrupted save?")
    q.vmdesc_length = _vmdesc_length(fd, size)
    if not q.vmdesc_length:
        raise SnapshotError("QEMU file does not end with QEMU's VM description: an "
                            "incomplete save (or one made with suppress-vmdesc)")
    if not q.mapped_ram:
        for b in q.blocks:
            b.finish_records()
    return q


def describe_qemu(info: dict, path: str, fd: int) -> None:
    q = read_qemu(fd)
    blocks = []
    for b in q.blocks:
        d = {"name": b.name, "size": b.size, "pages": b.npages, "pages_present": b.pages_present}
        if q.mapped_ram:
            d.update(pages_offset=b.pages_offset, bitmap_offset=b.bitmap_offset)
        else:
            d.update(records=b.records, zero_records=b.zero_records)
        blocks.append(d)
    info.update(valid=True, format="qemu mapped-ram" if q.mapped_ram else "qemu stream",
                version=q.version, machine=q.machine, capabilities=q.capabilities,
                page_size=q.page_size, ram_size=q.ram_size,
                pages_present=sum(b["pages_present"] for b in blocks), blocks=blocks,
                vmdesc_length=q.vmdesc_length)


def qemu_sources(fd: int) -> tuple[str, list[Source]]:
    q = read_qemu(fd)
    kind = "QEMU " + ("mapped-ram" if q.mapped_ram else "stream") + " file"
    return kind, [Source(b.name, b.size, b.page_size, b.pages_present,
                         lambda b=b: b.segments(fd)) for b in q.blocks]


class QemuReader(SnapshotReader):
    kind, what = QEMU, "a QEMU migration file"

    def load(self, lazy, threads, progress) -> Loaded:
        # The mapped-ram reader refuses it in the words every reader of ours uses.
        from migrate.formats.mapped import MappedReader
        return MappedReader(self.path, self.fd).load(lazy, threads, progress)

    def describe(self, info):
        describe_qemu(info, self.path, self.fd)

    def export_sources(self):
        return qemu_sources(self.fd)
