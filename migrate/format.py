"""The snapshot format of docs/FORMAT.md: plan the layout, pack and parse, validate.

Pure Python and numpy, no KVM. Every problem found in a file is a :class:`SnapshotError`
with a one-line message naming it; nothing here allocates more than a small multiple of
the file's size, whatever the file claims.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from kvmguest.errors import EXIT_BAD_INPUT, KvmguestError
from kvmguest.memory import DEVICE_SPACE, PAGE_SIZE
from kvmguest.state import STATE_FORMAT

MAGIC = b"KVMGSNAP"
STREAM_MAGIC = b"KVMGSTRM"        # the streaming baseline (migrate/formats/stream.py)
CHECKPOINT_MAGIC = b"KVMGCKPT"    # continuous checkpoints (migrate/checkpoint.py)
QEMU_MAGIC = b"QEVM"              # QEMU's migration files (migrate/formats/qemu.py reads their RAM)
VERSION = 2                      # 2: state of several vCPUs, LAPICs, irqchip, PIT
READABLE_VERSIONS = (1, 2)       # a version-1 file (one vCPU, no irqchip) restores as is
FLAG_COMPLETE = 1 << 0
HEADER_SIZE = 4096
SECTION_ALIGN = 4096
PAGES_ALIGN = 1 << 20
BLOCK_ENTRY_SIZE = 128
MAX_BLOCKS = 32
MAX_SLOT = 1 << 15               # KVM's memory slot ids (address space 0) a file may name
MAX_STATE = 16 << 20
NAME_LEN = 32


@dataclass(frozen=True)
class Field:
    """One fixed-size field of an on-disk record: name, struct code, meaning."""
    name: str
    code: str
    doc: str

    @property
    def size(self) -> int:
        return struct.calcsize("<" + self.code)

    @property
    def doc_type(self) -> str:
        """The type as docs/FORMAT.md writes it."""
        return {"I": "u32", "Q": "u64"}.get(self.code, f"{self.size} bytes")


class Record:
    """A fixed-size little-endian record described by a field table: the single
    description from which packing, parsing, the fuzz tests and the check of
    docs/FORMAT.md's tables all derive. Fields named ``reserved`` are written as zero."""

    def __init__(self, fields: list[Field]):
        self.fields = fields
        self.struct = struct.Struct("<" + "".join(f.code for f in fields))
        self.size = self.struct.size
        self.offsets, pos = {}, 0
        for f in fields:
            self.offsets[f.name] = pos
            pos += f.size

    def code(self, name: str) -> str:
        return "<" + next(f.code for f in self.fields if f.name == name)

    def pack(self, **values) -> bytes:
        return self.struct.pack(*(values.get(f.name, b"" if f.code.endswith("s") else 0)
                                  for f in self.fields))

    def unpack(self, data, offset: int = 0) -> dict:
        return dict(zip((f.name for f in self.fields), self.struct.unpack_from(data, offset)))


HEADER = Record([
    Field("magic", "8s", "`KVMGSNAP`"),
    Field("version", "I", "2 (1 is still read)"),
    Field("flags", "I", "bit 0 `COMPLETE`: set only by the last write of a finished save"),
    Field("page_size", "I", "4096"),
    Field("nblocks", "I", f"RAM blocks, 1 to {MAX_BLOCKS}"),
    Field("table_offset", "Q", "4096"),
    Field("table_length", "Q", "`nblocks * 128`"),
    Field("state_offset", "Q", "where the state JSON starts"),
    Field("state_length", "Q", "its length in bytes (at most 16 MiB)"),
    Field("file_size", "Q", "the exact size of the file"),
    Field("table_crc", "I", "CRC of the block table's `table_length` bytes"),
    Field("state_crc", "I", "CRC of the state's `state_length` bytes"),
    Field("reserved", "52s", "zero"),
    Field("header_crc", "I", "CRC of header bytes 0-123"),
])
BLOCK = Record([
    Field("name", "32s", "UTF-8, NUL-padded (`ram-low`, `ram-high`)"),
    Field("gpa", "Q", "guest-physical base, page aligned"),
    Field("size", "Q", "bytes, a multiple of page_size, > 0"),
    Field("page_size", "I", "4096"),
    Field("slot", "I", "KVM memory slot"),
    Field("bitmap_offset", "Q", "4 KiB aligned"),
    Field("bitmap_length", "Q", "`align(ceil(npages / 8), 8)` bytes"),
    Field("pages_offset", "Q", "1 MiB aligned"),
    Field("pages_length", "Q", "equals `size`"),
    Field("pages_present", "Q", "number of bits set in the bitmap"),
    Field("bitmap_crc", "I", "CRC of the bitmap's `bitmap_length` bytes"),
    Field("flags", "I", "zero (no block flags are defined)"),
    Field("reserved", "24s", "zero"),
])
_HEADER_CRC_AT = HEADER.offsets["header_crc"]
assert HEADER.size == _HEADER_CRC_AT + 4 and BLOCK.size == BLOCK_ENTRY_SIZE


class SnapshotError(KvmguestError, ValueError):
    """A snapshot file is not usable; the message names the problem."""

    exit_code = EXIT_BAD_INPUT


def align(x: int, a: int) -> int:
    return -(-x // a) * a


def crc(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass
class Block:
    name: str
    gpa: int
    size: int
    slot: int
    page_size: int = PAGE_SIZE
    bitmap_offset: int = 0
    bitmap_length: int = 0
    pages_offset: int = 0
    pages_present: int = 0
    bitmap_crc: int = 0

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    def page_offset(self, index: int) -> int:
        return self.pages_offset + index * self.page_size


@dataclass
class Layout:
    blocks: list[Block]
    table_offset: int = HEADER_SIZE
    state_offset: int = 0

    @property
    def table_length(self) -> int:
        return len(self.blocks) * BLOCK_ENTRY_SIZE

    @property
    def pages_end(self) -> int:
        return max(b.pages_offset + b.size for b in self.blocks)


def unpack_bits(raw: bytes, first: int, last: int) -> np.ndarray:
    """Bits [first, last) of a little-endian bitmap, one bool each."""
    lo = first // 8
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8, count=-(-last // 8) - lo,
                                       offset=lo), bitorder="little")
    return bits[first - lo * 8:last - lo * 8].view(np.bool_)


def count_bits(raw: bytes) -> int:
    words = np.frombuffer(raw, dtype=np.uint8)
    if hasattr(np, "bitwise_count"):             # numpy >= 2: no unpacked copy at all
        return int(np.bitwise_count(words).sum(dtype=np.int64))
    return int(np.count_nonzero(np.unpackbits(words)))


def bitmap_length(npages: int) -> int:
    return align(-(-npages // 8), 8)


def plan(blocks: list[tuple[str, int, int, int]]) -> Layout:
    """Offsets for (name, gpa, size, slot) blocks; a pure function of the list."""
    if not 1 <= len(blocks) <= MAX_BLOCKS:
        raise SnapshotError(f"{len(blocks)} RAM blocks; 1 to {MAX_BLOCKS} are supported")
    out = [Block(name, gpa, size, slot) for name, gpa, size, slot in sorted(blocks, key=lambda b: b[1])]
    pos = align(HEADER_SIZE + len(out) * BLOCK_ENTRY_SIZE, SECTION_ALIGN)
    for b in out:
        b.bitmap_offset = pos
        b.bitmap_length = bitmap_length(b.npages)
        pos = align(pos + b.bitmap_length, SECTION_ALIGN)
    for b in out:
        b.pages_offset = align(pos, PAGES_ALIGN)
        pos = b.pages_offset + b.size
    return Layout(out, HEADER_SIZE, align(pos, SECTION_ALIGN))


def max_file_size(layout: Layout, state_length: int) -> int:
    """The bound of docs/FORMAT.md for this layout (the file size is exactly this)."""
    return layout.state_offset + align(state_length, SECTION_ALIGN)


def documented_bound(ram_size: int, nblocks: int, state_length: int) -> int:
    """FORMAT.md's closed-form bound: RAM + n MiB + bitmaps + a few KiB + state."""
    return (ram_size + HEADER_SIZE + SECTION_ALIGN + nblocks * (PAGES_ALIGN + SECTION_ALIGN)
            + ram_size // (PAGE_SIZE * 8) + 8 * nblocks + align(state_length, SECTION_ALIGN))


# --- packing -----------------------------------------------------------------------------
def pack_table(layout: Layout) -> bytes:
    out = bytearray()
    for b in layout.blocks:
        name = b.name.encode()
        if len(name) > NAME_LEN:
            raise SnapshotError(f"block name {b.name!r} is longer than {NAME_LEN} bytes")
        out += BLOCK.pack(name=name, gpa=b.gpa, size=b.size, page_size=b.page_size,
                          slot=b.slot, bitmap_offset=b.bitmap_offset,
                          bitmap_length=b.bitmap_length, pages_offset=b.pages_offset,
                          pages_length=b.size, pages_present=b.pages_present,
                          bitmap_crc=b.bitmap_crc)
    return bytes(out)


def pack_header(layout: Layout, *, complete: bool, state_length: int = 0,
                table_crc: int = 0, state_crc: int = 0) -> bytes:
    fields = dict(magic=MAGIC, version=VERSION, flags=FLAG_COMPLETE if complete else 0,
                  page_size=PAGE_SIZE, nblocks=len(layout.blocks),
                  table_offset=layout.table_offset, table_length=layout.table_length,
                  state_offset=layout.state_offset, state_length=state_length,
                  file_size=max_file_size(layout, state_length) if complete else 0,
                  table_crc=table_crc, state_crc=state_crc)
    body = HEADER.pack(**fields)[:_HEADER_CRC_AT]
    header_crc = crc(body) if complete else 0
    return (body + struct.pack("<I", header_crc)).ljust(HEADER_SIZE, b"\0")


def pad(data: bytes) -> bytes:
    return data + b"\0" * (align(len(data), SECTION_ALIGN) - len(data))


def pack_bitmap(present: np.ndarray, length: int) -> bytes:
    """bool per page -> the on-disk bitmap of ``length`` bytes (LSB-first)."""
    packed = np.packbits(present.astype(np.bool_), bitorder="little").tobytes()
    return packed.ljust(length, b"\0")


def encode_state(state: dict) -> bytes:
    data = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_STATE:
        raise SnapshotError(f"state is {len(data)} bytes; the limit is {MAX_STATE}")
    return data


# --- parsing and validation ---------------------------------------------------------------
@dataclass
class Snapshot:
    """A fully validated snapshot: layout, presence bitmaps and decoded state.

    ``bitmaps`` are the blocks' page bitmaps as read (validated); ``present`` (one bool a
    page, per block) is made from them on first use: a lazy restore only needs the bits
    of the pages the file holds data for (``present_range``), and a bool array of a 16
    GiB guest's 4 million pages costs ~4 ms here just to fault in."""
    path: str
    file_size: int
    layout: Layout
    bitmaps: list[bytes] = field(default_factory=list)
    state: dict = field(default_factory=dict)
    state_length: int = 0
    version: int = VERSION

    @functools.cached_property
    def present(self) -> list[np.ndarray]:
        return [unpack_bits(raw, 0, b.npages) for raw, b in zip(self.bitmaps, self.layout.blocks)]

    def present_range(self, i: int, first: int, last: int) -> np.ndarray:
        """Block ``i``'s presence bits for pages [first, last)."""
        if "present" in self.__dict__:
            return self.present[i][first:last]
        return unpack_bits(self.bitmaps[i], first, last)

    @property
    def ram_size(self) -> int:
        """Guest RAM (the blocks of device memory, a disk's overlay, not counted)."""
        return sum(b.size for b in self.layout.blocks if b.gpa < DEVICE_SPACE)

    @property
    def pages_present(self) -> int:
        return sum(b.pages_present for b in self.layout.blocks)


def parse_json(raw: bytes, what: str):
    """JSON from a file, or SnapshotError naming ``what`` (not JSON, not UTF-8, or nested
    deeper than the parser goes)."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise SnapshotError(f"{what} does not decode: {err}") from None
    except RecursionError:
        raise SnapshotError(f"{what} is nested too deeply to be kvmguest's") from None


def _read_exact(fd: int, offset: int, length: int, what: str, file_size: int) -> bytes:
    if offset < 0 or length < 0 or offset + length > file_size:
        raise SnapshotError(f"{what} at {offset}+{length} runs past the end of the file "
                            f"({file_size} bytes): truncated?")
    try:
        data = os.pread(fd, length, offset)
    except OSError as err:
        raise SnapshotError(f"{what}: cannot read: {err.strerror}") from None
    if len(data) != length:
        raise SnapshotError(f"{what}: short read ({len(data)} of {length} bytes)")
    return data


def read_snapshot(path: str, fd: int | None = None) -> Snapshot:
    """Open and validate everything but page contents; raise SnapshotError if anything is off."""
    own = fd is None
    if own:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise SnapshotError(f"cannot open {path}: {err.strerror}") from err
    try:
        return _validate(path, fd)
    finally:
        if own:
            os.close(fd)


def _validate(path: str, fd: int) -> Snapshot:
    size = os.fstat(fd).st_size
    if size < HEADER_SIZE:
        raise SnapshotError(f"file is {size} bytes, shorter than the {HEADER_SIZE}-byte "
                            "header: truncated or not a snapshot")
    head = _read_exact(fd, 0, HEADER_SIZE, "header", size)
    if head[:8] != MAGIC:
        if head[:8] == STREAM_MAGIC:
            raise SnapshotError("this is a streaming-format snapshot; restore it with the "
                                "stream reader (kvmguest restore detects it)")
        if head[:4] == QEMU_MAGIC:
            raise SnapshotError("this is a QEMU migration file: kvmguest reads its RAM "
                                "(inspect, export-ram) but does not restore QEMU's machine")
        raise SnapshotError("not a kvmguest snapshot (bad magic)")
    h = HEADER.unpack(head)
    version, flags, page_size, nblocks = h["version"], h["flags"], h["page_size"], h["nblocks"]
    table_offset, table_length = h["table_offset"], h["table_length"]
    state_offset, state_length, file_size = h["state_offset"], h["state_length"], h["file_size"]
    table_crc, state_crc, header_crc = h["table_crc"], h["state_crc"], h["header_crc"]
    if version not in READABLE_VERSIONS:
        raise SnapshotError(f"snapshot format version {version}; this kvmguest reads "
                            f"versions {', '.join(map(str, READABLE_VERSIONS))}")
    if not flags & FLAG_COMPLETE:
        raise SnapshotError("snapshot is incomplete: the save that wrote it did not finish")
    if header_crc != crc(head[:_HEADER_CRC_AT]):
        raise SnapshotError("header checksum mismatch: the header is corrupt")
    if flags & ~FLAG_COMPLETE:
        raise SnapshotError(f"unknown header flags {flags:#x}")
    if h["reserved"].strip(b"\0"):
        raise SnapshotError("header reserved bytes are not zero")
    if page_size != PAGE_SIZE:
        raise SnapshotError(f"page size {page_size}; only {PAGE_SIZE} is supported")
    if not 1 <= nblocks <= MAX_BLOCKS:
        raise SnapshotError(f"block count {nblocks} out of range 1..{MAX_BLOCKS}")
    if file_size != size:
        raise SnapshotError(f"file is {size} bytes but the header says {file_size}: "
                            + ("truncated" if size < file_size else "trailing data"))
    if table_offset != HEADER_SIZE or table_length != nblocks * BLOCK_ENTRY_SIZE:
        raise SnapshotError(f"block table at {table_offset}+{table_length} does not match "
                            f"{nblocks} blocks")
    table = _read_exact(fd, table_offset, table_length, "block table", size)
    if crc(table) != table_crc:
        raise SnapshotError("block table checksum mismatch: the block table is corrupt")

    blocks = []
    for i in range(nblocks):
        e = BLOCK.unpack(table, i * BLOCK_ENTRY_SIZE)
        name, gpa, bsize, bpage, slot = e["name"], e["gpa"], e["size"], e["page_size"], e["slot"]
        bm_off, bm_len, pg_off, pg_len = (e["bitmap_offset"], e["bitmap_length"],
                                          e["pages_offset"], e["pages_length"])
        present, bm_crc, bflags = e["pages_present"], e["bitmap_crc"], e["flags"]
        try:
            name_s = name.rstrip(b"\0").decode()
        except UnicodeDecodeError:
            raise SnapshotError(f"block {i}: name is not UTF-8") from None
        where = f"block {i} ({name_s!r})"
        if bpage != PAGE_SIZE:
            raise SnapshotError(f"{where}: page size {bpage}, expected {PAGE_SIZE}")
        if bsize == 0 or bsize % PAGE_SIZE or gpa % PAGE_SIZE:
            raise SnapshotError(f"{where}: base {gpa:#x} / size {bsize:#x} not page aligned")
        if pg_len != bsize:
            raise SnapshotError(f"{where}: page area length {pg_len} differs from size {bsize}")
        if bm_len != bitmap_length(bsize // PAGE_SIZE):
            raise SnapshotError(f"{where}: bitmap length {bm_len} does not match "
                                f"{bsize // PAGE_SIZE} pages")
        if pg_off % PAGES_ALIGN or bm_off % SECTION_ALIGN:
            raise SnapshotError(f"{where}: misaligned page area or bitmap offset")
        if bflags:
            raise SnapshotError(f"{where}: unknown block flags {bflags:#x}")
        if e["reserved"].strip(b"\0"):
            raise SnapshotError(f"{where}: reserved bytes are not zero")
        if blocks and gpa <= blocks[-1].gpa:
            raise SnapshotError(f"{where}: blocks are not in ascending guest-physical order")
        if present > bsize // PAGE_SIZE:
            raise SnapshotError(f"{where}: {present} pages present of {bsize // PAGE_SIZE}")
        blocks.append(Block(name_s, gpa, bsize, slot, PAGE_SIZE, bm_off, bm_len, pg_off,
                            present, bm_crc))
    layout = Layout(blocks, table_offset, state_offset)

    # Sections must lie inside the file and not overlap one another.
    sections = [(0, HEADER_SIZE, "header"), (table_offset, table_length, "block table"),
                (state_offset, state_length, "state")]
    for b in blocks:
        sections += [(b.bitmap_offset, b.bitmap_length, f"bitmap of {b.name!r}"),
                     (b.pages_offset, b.size, f"page area of {b.name!r}")]
    for off, length, what in sections:
        if off + length > size:
            raise SnapshotError(f"{what} at {off}+{length} runs past the end of the file "
                                f"({size} bytes)")
    ordered = sorted(sections)
    for (o1, l1, w1), (o2, _, w2) in zip(ordered, ordered[1:]):
        if o1 + l1 > o2:
            raise SnapshotError(f"{w1} overlaps {w2} in the file")
    by_gpa = sorted(blocks, key=lambda b: b.gpa)
    for a, b in zip(by_gpa, by_gpa[1:]):
        if a.gpa + a.size > b.gpa:
            raise SnapshotError(f"blocks {a.name!r} and {b.name!r} overlap in guest memory")
    if len({b.slot for b in blocks}) != len(blocks):
        raise SnapshotError("two blocks claim the same memory slot")

    bitmaps = []
    for b in blocks:
        raw = _read_exact(fd, b.bitmap_offset, b.bitmap_length, f"bitmap of {b.name!r}", size)
        if crc(raw) != b.bitmap_crc:
            raise SnapshotError(f"bitmap of {b.name!r}: checksum mismatch")
        if unpack_bits(raw, b.npages, len(raw) * 8).any():
            raise SnapshotError(f"bitmap of {b.name!r} has bits set past its last page")
        counted = count_bits(raw)
        if counted != b.pages_present:
            raise SnapshotError(f"bitmap of {b.name!r}: {counted} bits set but "
                                f"{b.pages_present} pages recorded")
        bitmaps.append(raw)

    if state_offset % SECTION_ALIGN or state_offset < layout.pages_end:
        raise SnapshotError("state section is misplaced")
    if state_length > MAX_STATE:
        raise SnapshotError(f"state length {state_length} exceeds {MAX_STATE}")
    if size != state_offset + align(state_length, SECTION_ALIGN):
        raise SnapshotError("file size does not match the end of the state section")
    raw_state = _read_exact(fd, state_offset, state_length, "state", size)
    if crc(raw_state) != state_crc:
        raise SnapshotError("state checksum mismatch: the vCPU/device state is corrupt")
    state = parse_json(raw_state, "state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SnapshotError("state section is not kvmguest state")
    return Snapshot(path, size, layout, bitmaps, state, state_length, version)


def with_present(layout: Layout, present: list[np.ndarray]) -> Layout:
    """A copy of ``layout`` whose blocks carry the counts and CRCs of these bitmaps."""
    blocks = []
    for b, bits in zip(layout.blocks, present):
        data = pack_bitmap(bits, b.bitmap_length)
        blocks.append(replace(b, pages_present=int(bits.sum()), bitmap_crc=crc(data)))
    return Layout(blocks, layout.table_offset, layout.state_offset)
