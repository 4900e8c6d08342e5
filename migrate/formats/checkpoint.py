"""The continuous-checkpoint file (docs/FORMAT.md, "Continuous checkpoints"): its layout
(superblock, two state slots, records, the journal and page areas), its records, and
reading it back: validated whole before anything is allocated, then loaded (the latest
committed checkpoint, with its journal applied). migrate/checkpoint.py writes it."""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from kvmguest.memory import PAGE_SIZE, GuestMemory, Region
from kvmguest.state import vcpu_summary

from migrate.format import CHECKPOINT_MAGIC as MAGIC
from migrate.format import (MAX_BLOCKS, MAX_SLOT, Block, Field, Record, SnapshotError,
                            parse_json)
from migrate.formats.base import CHECKPOINT, Loaded, SnapshotReader, decode_state, region_specs
from migrate.pageio import data_extents, pread_into

log = logging.getLogger(__name__)
PAGE = PAGE_SIZE
VERSION = 1
SLOT_OFFSETS = (4096, 8192)
HEADER_END = 12288
ALIGN = 1 << 20
RECORD_MAGIC = b"CKPTRECD"
COMMITTED, APPLIED = 1, 2
# The superblock's fixed part (the JSON layout and a CRC32 of everything before it follow)
# and a record (in one 512-byte sector of its slot): packed, parsed and checked against
# docs/FORMAT.md from these tables.
SUPER = Record([
    Field("magic", "8s", "`KVMGCKPT`"),
    Field("version", "I", "1"),
    Field("layout_length", "I", "bytes of the JSON layout at 16; a CRC32 of bytes "
          "0 to 16 + layout_length follows it"),
])
RECORD = Record([
    Field("magic", "8s", "`CKPTRECD`"),
    Field("generation", "Q", "the checkpoint's number, from 1"),
    Field("kind", "I", "1 committed, 2 applied"),
    Field("state_slot", "I", "0 or 1"),
    Field("state_len", "I", "bytes of state JSON in that slot"),
    Field("state_crc", "I", "CRC32 of them"),
    Field("journal_pages", "Q", "pages in the journal (0 for checkpoint 1)"),
    Field("journal_crc", "I", "CRC32 of the journal's page numbers and pages"),
    Field("time_ns", "Q", "when it was taken, ns since the epoch"),
    Field("pages_written", "Q", "pages it changed"),
    Field("record_crc", "I", "CRC32 of bytes 0-59"),
])
_RECORD_CRC_AT = RECORD.offsets["record_crc"]
HISTORY = 100                                    # checkpoints described in each state
RECORD_ENV = "KVMGUEST_CKPT_RECORD"              # tests: log what each checkpoint held
# Tests: with KVMGUEST_FAULT_POINT=ckpt-<phase> the process kills itself in that phase of
# checkpoint FAULT_GENERATION (so that an earlier one is committed); with
# KVMGUEST_CKPT_POWERLOSS=<seed> it first undoes, at random, whole or torn, the writes
# made since the last fsync: what a power cut may leave of them.
FAULT_GENERATION = 3
POWERLOSS_ENV = "KVMGUEST_CKPT_POWERLOSS"
SECTOR = 512


def _align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


@dataclass
class CheckpointLayout:
    blocks: list                 # dicts: name, gpa, size, slot, pages_offset
    journal_offset: int
    journal_size: int
    state_offsets: list
    state_size: int

    @property
    def file_size(self) -> int:
        return self.journal_offset + self.journal_size

    @property
    def pages(self) -> int:
        """Pages of guest RAM, over all blocks (the journal numbers them in that order)."""
        return sum(b["size"] for b in self.blocks) // PAGE

    def to_json(self) -> dict:
        return self.__dict__.copy()


def plan_checkpoint(memory: GuestMemory, vcpus: int) -> CheckpointLayout:
    state_size = _align(max(1 << 20, vcpus * (64 << 10)), PAGE)
    return _place([(r.gpa, r.size, r.slot) for r in memory.saved_regions], state_size)


def _place(regions, state_size: int) -> CheckpointLayout:
    """The layout of a file for ``regions`` ((gpa, size, slot), in gpa order): header,
    two state slots, a page area per block, the journal. A file's layout must be exactly
    this (read_layout), so that no section can overlap another or leave the file."""
    at = _align(HEADER_END)
    states = [at, at + state_size]
    at = _align(at + 2 * state_size)
    blocks = []
    for i, (gpa, size, slot) in enumerate(regions):
        blocks.append({"name": f"ram{i}", "gpa": gpa, "size": size, "slot": slot,
                       "pages_offset": at})
        at = _align(at + size)
    pages = sum(size for _, size, _ in regions) // PAGE
    return CheckpointLayout(blocks, at, _align(pages * (8 + PAGE)), states, state_size)


@dataclass
class CheckpointRecord:
    generation: int
    kind: int
    state_slot: int
    state_len: int
    state_crc: int
    journal_pages: int
    journal_crc: int
    time_ns: int
    pages_written: int

    def pack(self) -> bytes:
        raw = bytearray(RECORD.pack(magic=RECORD_MAGIC, **dataclasses.asdict(self)))
        struct.pack_into("<I", raw, _RECORD_CRC_AT, zlib.crc32(raw[:_RECORD_CRC_AT]))
        return bytes(raw).ljust(512, b"\0")

    @classmethod
    def parse(cls, raw: bytes) -> "CheckpointRecord | None":
        if len(raw) < RECORD.size or raw[:8] != RECORD_MAGIC:
            return None
        f = RECORD.unpack(raw)
        if f["record_crc"] != zlib.crc32(raw[:_RECORD_CRC_AT]):
            return None
        r = cls(**{k: f[k] for k in cls.__dataclass_fields__})
        return r if r.kind in (COMMITTED, APPLIED) and r.state_slot in (0, 1) else None

    @property
    def order(self) -> tuple:
        return (self.generation, self.kind)


def read_records(fd: int) -> list:
    """The record in each slot (None where a slot holds no valid record)."""
    return [CheckpointRecord.parse(os.pread(fd, 512, off)) for off in SLOT_OFFSETS]


def latest(records) -> tuple[int, "CheckpointRecord | None"]:
    """(slot, record) of the latest valid record; (-1, None) if there is none."""
    best = (-1, None)
    for i, r in enumerate(records):
        if r is not None and (best[1] is None or r.order > best[1].order):
            best = (i, r)
    return best


# --- writing ------------------------------------------------------------------------------
# --- reading ------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A checkpoint file, checked: its layout, latest record and decoded state."""
    path: str
    layout: CheckpointLayout
    record: CheckpointRecord
    state: dict
    decoded: object               # the state as a checked MachineState
    history: list = field(default_factory=list)


def _block(b: dict) -> Block:
    return Block(b["name"], b["gpa"], b["size"], b["slot"], pages_offset=b["pages_offset"])


MAX_STATE_SIZE = 64 << 20           # a state slot: 64 KiB per vCPU, 1 MiB at least
JOURNAL_CHUNK = 4096                # journal pages read (checked, applied) at a time


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63


def _check_layout(d, path: str) -> CheckpointLayout:
    """The superblock's layout, every field type-checked, and exactly the layout
    kvmguest writes for those blocks (_place): SnapshotError otherwise."""
    def bad(why: str) -> SnapshotError:
        return SnapshotError(f"{path}: checkpoint layout {why}")
    if not isinstance(d, dict):
        raise bad("is not an object")
    blocks = d.get("blocks")
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= MAX_BLOCKS:
        raise bad(f"must list 1 to {MAX_BLOCKS} blocks")
    keys = {"name", "gpa", "size", "slot", "pages_offset"}
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or set(b) != keys:
            raise bad(f"block {i} is not an object of {', '.join(sorted(keys))}")
        if not all(_whole(b[k]) for k in keys - {"name"}):
            raise bad(f"block {i} has a field that is not a whole number")
        if not (b["size"] and b["size"] % PAGE == 0 and b["gpa"] % PAGE == 0):
            raise bad(f"block {i} is not whole pages (base {b['gpa']:#x}, size {b['size']:#x})")
        if b["slot"] >= MAX_SLOT:
            raise bad(f"block {i} names memory slot {b['slot']}")
    for a, b in zip(blocks, blocks[1:]):
        if b["gpa"] < a["gpa"] + a["size"]:
            raise bad("has blocks out of order or overlapping in guest memory")
    if len({b["slot"] for b in blocks}) != len(blocks):
        raise bad("has two blocks in one memory slot")
    size = d.get("state_size")
    if not _whole(size) or not (1 << 20) <= size <= MAX_STATE_SIZE or size % PAGE:
        raise bad(f"has a state slot size of {size!r}")
    expected = _place([(b["gpa"], b["size"], b["slot"]) for b in blocks], size)
    found = CheckpointLayout(blocks, d.get("journal_offset"), d.get("journal_size"),
                   d.get("state_offsets"), size)
    if found.to_json() != expected.to_json():
        raise bad("is not the layout kvmguest writes for its blocks (moved or resized "
                  "sections)")
    return expected


def read_layout(fd: int, path: str) -> CheckpointLayout:
    head = os.pread(fd, SLOT_OFFSETS[0], 0)
    if len(head) < SUPER.size or head[:8] != MAGIC:
        raise SnapshotError(f"{path}: not a kvmguest checkpoint file")
    f = SUPER.unpack(head)
    version, n = f["version"], f["layout_length"]
    if version != VERSION:
        raise SnapshotError(f"{path}: checkpoint version {version} is not supported")
    if SUPER.size + n + 4 > len(head) or struct.unpack_from(
            "<I", head, SUPER.size + n)[0] != zlib.crc32(head[:SUPER.size + n]):
        raise SnapshotError(f"{path}: checkpoint superblock is damaged (checksum)")
    return _check_layout(parse_json(head[SUPER.size:SUPER.size + n],
                                    f"{path}: checkpoint layout"), path)


def _journal_numbers(fd: int, layout: CheckpointLayout, record: CheckpointRecord, path: str):
    """The journal's page numbers, a chunk at a time (memory does not follow what a
    record claims)."""
    n, at = record.journal_pages, layout.journal_offset
    for first in range(0, n, JOURNAL_CHUNK):
        k = min(JOURNAL_CHUNK, n - first)
        numbers = np.frombuffer(os.pread(fd, 8 * k, at + 8 * first), dtype="<u8")
        if len(numbers) != k:
            raise SnapshotError(f"{path}: journal is truncated")
        yield numbers


def _journal_pages(fd: int, layout: CheckpointLayout, record: CheckpointRecord, path: str):
    """(page numbers, page data) of the journal, a chunk at a time."""
    n, at = record.journal_pages, layout.journal_offset
    for first, numbers in zip(range(0, n, JOURNAL_CHUNK),
                              _journal_numbers(fd, layout, record, path)):
        data = np.empty((len(numbers), PAGE), np.uint8)
        if not pread_into(fd, data, at + 8 * n + first * PAGE):
            raise SnapshotError(f"{path}: journal is truncated")
        yield numbers, data


def _journal_crc(fd: int, layout: CheckpointLayout, record: CheckpointRecord, path: str, memory=None) -> None:
    """Check the journal (numbers within the guest's pages, then the CRC over numbers and
    data, as written); with ``memory``, its pages are applied on the way (the caller
    drops that memory if this raises)."""
    total = layout.pages
    crc = 0
    for numbers in _journal_numbers(fd, layout, record, path):
        if int(numbers.max()) >= total:
            raise SnapshotError(f"{path}: journal of checkpoint {record.generation} names a "
                                "page beyond its guest's memory")
        crc = zlib.crc32(numbers.tobytes(), crc)
    for numbers, data in _journal_pages(fd, layout, record, path):
        crc = zlib.crc32(data, crc)
        if memory is not None:
            _apply_journal(memory, layout, numbers, data)
    if crc != record.journal_crc:
        raise SnapshotError(f"{path}: journal of checkpoint {record.generation} is damaged")


def validated_checkpoint(path: str, fd: int) -> Checkpoint:
    """Everything a restore checks before memory is allocated: superblock and layout,
    the latest record, its journal (size, page numbers, CRC) and state (CRC, decodes)."""
    layout = read_layout(fd, path)
    size = os.fstat(fd).st_size
    if size < layout.file_size:
        raise SnapshotError(f"{path}: checkpoint file is truncated ({size} of "
                            f"{layout.file_size} bytes)")
    region_specs([_block(b) for b in layout.blocks])
    _, record = latest(read_records(fd))
    if record is None:
        raise SnapshotError(f"{path}: no complete checkpoint yet")
    if not 0 < record.state_len <= layout.state_size:
        raise SnapshotError(f"{path}: state of checkpoint {record.generation} is "
                            f"{record.state_len} bytes; its slot holds {layout.state_size}")
    total = layout.pages
    if record.journal_pages > total:
        raise SnapshotError(f"{path}: checkpoint {record.generation} claims a journal of "
                            f"{record.journal_pages} pages; its guest has {total}")
    raw = os.pread(fd, record.state_len, layout.state_offsets[record.state_slot])
    if len(raw) != record.state_len or zlib.crc32(raw) != record.state_crc:
        raise SnapshotError(f"{path}: state of checkpoint {record.generation} is damaged")
    d = parse_json(raw, f"{path}: state of checkpoint {record.generation}")
    if not isinstance(d, dict) or not isinstance(d.get("state"), dict) \
            or not isinstance(d.get("checkpoints", []), list):
        raise SnapshotError(f"{path}: state of checkpoint {record.generation} is not "
                            "kvmguest state")
    if record.kind == COMMITTED and record.journal_pages:
        _journal_crc(fd, layout, record, path)
    return Checkpoint(path, layout, record, d["state"], decode_state(d["state"]),
                      d.get("checkpoints", []))


def _apply_journal(memory: GuestMemory, layout: CheckpointLayout, numbers, data) -> None:
    base = 0
    for b in layout.blocks:
        npages = b["size"] // PAGE
        sel = (numbers >= base) & (numbers < base + npages)
        if sel.any():
            region = memory.region_of_slot(b["slot"])
            region.pages()[(numbers[sel] - base).astype(np.int64)] = data[sel]
        base += npages


def load_checkpoint(ck: Checkpoint, fd: int) -> tuple[GuestMemory, int]:
    """Guest memory holding the checkpoint: the page areas, then its journal over them."""
    specs = region_specs([_block(b) for b in ck.layout.blocks])
    memory = GuestMemory([Region(s) for s in specs])
    try:
        loaded = 0
        for b in ck.layout.blocks:
            region = memory.region_of_slot(b["slot"])
            start, end = b["pages_offset"], b["pages_offset"] + b["size"]
            for s, e in data_extents(fd, start, end):
                s, e = max(s, start), min(e, end)
                pread_into(fd, region.array[s - start:e - start], s)
                loaded += (e - s) // PAGE
        if ck.record.kind == COMMITTED and ck.record.journal_pages:
            # Checked by validated_checkpoint(), and again as it is applied: a file changed since
            # fails here, and the memory is dropped (the guest never starts from it).
            _journal_crc(fd, ck.layout, ck.record, ck.path, memory)
        return memory, loaded
    except BaseException:
        memory.close()
        raise


def describe_checkpoint(info: dict, path: str, fd: int) -> None:
    ck = validated_checkpoint(path, fd)
    r = ck.record
    info.update(valid=True, format="checkpoint", version=VERSION,
                ram_size=sum(b["size"] for b in ck.layout.blocks),
                blocks=[{"name": b["name"], "slot": b["slot"], "gpa": b["gpa"],
                         "size": b["size"], "pages": b["size"] // PAGE_SIZE,
                         "pages_offset": b["pages_offset"]} for b in ck.layout.blocks],
                checkpoints=r.generation, checkpoint_time_ns=r.time_ns,
                journal_pending=r.kind == COMMITTED and r.journal_pages > 0,
                history=ck.history, state=vcpu_summary(ck.state),
                vcpus=len(ck.state["vcpus"]), irqchip="irqchip" in ck.state.get("vm", {}))


class CheckpointReader(SnapshotReader):
    kind, what = CHECKPOINT, "a checkpoint file"

    def load(self, lazy, threads, progress) -> Loaded:
        ck = validated_checkpoint(self.path, self.fd)
        memory, loaded = load_checkpoint(ck, self.fd)
        return Loaded(ck.decoded, memory, loaded)

    def describe(self, info):
        describe_checkpoint(info, self.path, self.fd)
