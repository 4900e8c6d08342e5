"""The streaming baseline: every page sent is appended, like QEMU's plain `file:` migration.

Layout: a 64-byte header (magic ``KVMGSTRM``, version, block count), a JSON block list,
then records of (u32 kind, u32 block, u64 page index) followed, for a page record, by the
4 KiB page. Kind 1 = page, 2 = zero page (no data), 3 = state (u64 length, u32 CRC, JSON),
4 = end. A page sent in several passes is in the file several times, so the file grows
with every pass: the growth the mapped-ram layout exists to avoid. Restore replays the
records in order (the last copy of a page wins) and insists on the end record.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np

from kvmguest.errors import printable
from kvmguest.memory import PAGE_SIZE as PAGE
from kvmguest.memory import GuestMemory, GuestMemoryError, Region, RegionSpec, check_layout
from kvmguest.state import MachineState, StateError

from kvmguest.state import vcpu_summary

from migrate import format as fmt
from migrate.format import MAX_SLOT, SnapshotError
from migrate.formats.base import STREAM, Loaded, SnapshotReader, check_host_capacity
from migrate.pageio import (IOV_MAX, nonzero_pages, open_excl, pwrite_all, runs_of,
                     temp_path_for)
from migrate.errors import SaveError, check_cancel, check_save_target, install, io_error
from migrate.writer import PassStats

MAGIC = fmt.STREAM_MAGIC
VERSION = 1
MAX_BLOCK_LIST = 1 << 20
HEAD = struct.Struct("<8sII48s")
RECORD = struct.Struct("<IIQ")
KIND_PAGE, KIND_ZERO, KIND_STATE, KIND_END = 1, 2, 3, 4
# A migration's records only (docs/migration.md): never in a stream file.
KIND_ZERO_RUN, KIND_SHAPE, KIND_POSTCOPY, KIND_MEMFD, KIND_PAGE_RUN = 5, 6, 7, 8, 9
KIND_PASS_END = 10
BATCH = 256                     # pages per pwritev


def pass_records(regions, dirty, stats: PassStats, zero_runs: bool = False):
    """One pass's records, BATCH pages at a time (each a list of buffers, maybe empty),
    counted into ``stats``: ``dirty`` None (pass 0) every page that may hold data, the
    other side starting from zeros (QEMU likewise skips zero pages on its first pass);
    else the dirty pages, those zero now as zero records (``zero_runs``: consecutive ones
    as one KIND_ZERO_RUN record, as a migration sends them). The stream file's writer and
    a migration's (migrate/live.py) send the same records."""
    for bi, r in enumerate(regions):
        if r is None:                   # a block not sent (a local migration's shared RAM)
            continue
        if dirty is None:
            idx = np.flatnonzero(r.maybe_nonzero())
            stats.pages_dirty += r.npages
            stats.pages_zero += r.npages - len(idx)
        else:
            idx = np.asarray(dirty.get(r.slot, []), dtype=np.int64)
            stats.pages_dirty += len(idx)
        for start, end in runs_of(idx).tolist():
            for c in range(start, end, BATCH):
                ce = min(end, c + BATCH)
                nonzero = nonzero_pages(r.array[c * PAGE:ce * PAGE])
                bufs, run = [], None        # run: the first of the zero pages pending
                for i in range(c, ce):
                    if nonzero[i - c]:
                        if run is not None:
                            bufs += zero_records(bi, run, i)
                            run = None
                        bufs += [RECORD.pack(KIND_PAGE, bi, i), r.array[i * PAGE:(i + 1) * PAGE]]
                        stats.pages_written += 1
                    else:
                        stats.pages_zero += 1
                        if dirty is None:
                            continue
                        if not zero_runs:
                            bufs.append(RECORD.pack(KIND_ZERO, bi, i))
                        elif run is None:
                            run = i
                if run is not None:
                    bufs += zero_records(bi, run, ce)
                yield bufs


def zero_records(block: int, first: int, end: int) -> list[bytes]:
    """Pages [first, end) of ``block`` are zero: one record of a migration (KIND_ZERO_RUN
    and its u64 count), or a KIND_ZERO record for one page."""
    if end - first == 1:
        return [RECORD.pack(KIND_ZERO, block, first)]
    return [RECORD.pack(KIND_ZERO_RUN, block, first), struct.pack("<Q", end - first)]


def blob_record(kind: int, data: bytes) -> list[bytes]:
    """A record carrying ``data``: (kind, 0, 0), u64 length, u32 CRC-32, the bytes (the
    state record; a migration's shape and post-copy records too)."""
    return [RECORD.pack(kind, 0, 0), struct.pack("<QI", len(data), zlib.crc32(data)), data]


def json_record(kind: int, obj) -> list[bytes]:
    return blob_record(kind, json.dumps(obj, separators=(",", ":"), sort_keys=True).encode())


class StreamWriter:
    """One snapshot being written as an append-only stream (the baseline mapped-ram
    is measured against)."""

    def __init__(self, path: str, memory, direct: bool = False,
                 cancel: threading.Event | None = None):
        if direct:
            raise SaveError("--direct-io applies to the mapped format only (stream records "
                            "are not page aligned)")
        self.path = check_save_target(path)
        self.cancel = cancel
        self.on_progress = None     # per-page progress is not reported for this baseline
        self.regions = list(memory.saved_regions)
        self.passes: list[PassStats] = []
        self.tmp = temp_path_for(self.path)
        try:
            self.fd = open_excl(self.tmp, False)
        except OSError as err:
            raise io_error(err, self.tmp, "creating") from None
        blocks = json.dumps([{"name": r.name, "gpa": r.gpa, "size": r.size, "slot": r.slot}
                             for r in self.regions]).encode()
        self.offset = 0
        self._append([HEAD.pack(MAGIC, VERSION, len(self.regions), b"\0" * 48),
                      struct.pack("<I", len(blocks)), blocks])

    def settle(self) -> None:
        """Nothing to wait for: the stream writer starts no writeback of its own."""

    def _append(self, bufs) -> None:
        try:
            pwrite_all(self.fd, bufs, self.offset)
            self.offset += sum(len(b) for b in bufs)
        except OSError as err:
            raise io_error(err, self.tmp, "writing") from None

    def write_pass(self, dirty) -> PassStats:
        stats = PassStats(len(self.passes))
        t = time.perf_counter()
        for bufs in pass_records(self.regions, dirty, stats):
            check_cancel(self.cancel, self.path)
            for k in range(0, len(bufs), IOV_MAX):
                self._append(bufs[k:k + IOV_MAX])
        stats.bytes_written = stats.pages_written * PAGE
        stats.seconds = time.perf_counter() - t
        self.passes.append(stats)
        return stats

    def finish(self, state: dict) -> None:
        try:
            self._append([*json_record(KIND_STATE, state), RECORD.pack(KIND_END, 0, 0)])
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            install(self.tmp, self.path)
        except OSError as err:
            self.abort()
            raise io_error(err, self.path, "finishing") from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


@dataclass
class StreamInfo:
    """A fully validated stream file: its blocks, page records and decoded state."""
    path: str
    file_size: int
    blocks: list[fmt.Block]
    records_offset: int
    pages: int              # page records (an upper bound on the pages restore touches)
    zero_records: int
    state: dict
    decoded: MachineState   # the state, decoded and checked


def _read(f, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise SnapshotError(f"stream file truncated in {what}")
    return data


def parse_blocks(raw: bytes, nblocks: int) -> list[fmt.Block]:
    items = fmt.parse_json(raw, "stream block list")
    try:
        if not isinstance(items, list):
            raise TypeError("not a list")
        blocks = []
        for b in items:
            if not isinstance(b, dict):
                raise TypeError("an entry is not an object")
            slot, gpa, size, name = b["slot"], b["gpa"], b["size"], b["name"]
            if not (all(type(v) is int for v in (slot, gpa, size)) and isinstance(name, str)):
                raise TypeError("slot, gpa and size must be integers and name a string")
            blocks.append(fmt.Block(name, gpa, size, slot))
    except (ValueError, KeyError, TypeError) as err:
        raise SnapshotError(f"stream block list does not decode: {err}") from None
    if len(blocks) != nblocks or not 1 <= nblocks <= fmt.MAX_BLOCKS:
        raise SnapshotError(f"stream block list has {len(blocks)} blocks, header says "
                            f"{nblocks} (1 to {fmt.MAX_BLOCKS} are supported)")
    for i, b in enumerate(blocks):
        where = f"stream block {i} ({printable(b.name)!r})"
        if len(b.name.encode("utf-8", "replace")) > fmt.NAME_LEN:
            raise SnapshotError(f"{where}: name longer than {fmt.NAME_LEN} bytes")
        if not 0 <= b.slot < MAX_SLOT:
            raise SnapshotError(f"{where}: slot {b.slot} out of range 0..{MAX_SLOT - 1}")
        if b.size <= 0 or b.size % PAGE or b.gpa % PAGE or b.gpa < 0 or b.gpa + b.size > 1 << 64:
            raise SnapshotError(f"{where}: base {b.gpa:#x} / size {b.size:#x} not page aligned "
                                "or out of range")
        if i and b.gpa < blocks[i - 1].gpa + blocks[i - 1].size:
            raise SnapshotError(f"{where}: blocks overlap or are not in ascending "
                                "guest-physical order")
    if len({b.slot for b in blocks}) != len(blocks):
        raise SnapshotError("two stream blocks claim the same memory slot")
    try:       # the same RAM policy as `run` and mapped snapshots
        check_layout([RegionSpec(b.slot, b.gpa, b.size, b.name) for b in blocks])
    except GuestMemoryError as err:
        raise SnapshotError(f"snapshot cannot be restored on this host: {err}") from None
    return blocks


def validate_stream(path: str, fd: int) -> StreamInfo:
    """Read the whole stream file without allocating guest memory: header, blocks, every
    record (in range, complete, one state record, the end record last), and the decoded
    state. Anything wrong is a one-line SnapshotError."""
    size = os.fstat(fd).st_size
    f = os.fdopen(os.dup(fd), "rb")
    try:
        f.seek(0)
        magic, version, nblocks, _ = HEAD.unpack(_read(f, HEAD.size, "its header"))
        if magic != MAGIC:
            raise SnapshotError("not a kvmguest stream file (bad magic)")
        if version != VERSION:
            raise SnapshotError(f"stream format version {version}; this kvmguest reads "
                                f"version {VERSION}")
        (blen,) = struct.unpack("<I", _read(f, 4, "its block list"))
        if blen > MAX_BLOCK_LIST:
            raise SnapshotError(f"stream block list of {blen} bytes is too large")
        blocks = parse_blocks(_read(f, blen, "its block list"), nblocks)
        records_offset = f.tell()
        state, decoded, pages, zeros = None, None, 0, 0
        while True:
            kind, bi, index = RECORD.unpack(_read(f, RECORD.size, "a record (no end record)"))
            if kind in (KIND_PAGE, KIND_ZERO):
                if bi >= nblocks or index >= blocks[bi].npages:
                    raise SnapshotError(f"stream record for page {index} of block {bi} "
                                        "is out of range")
                if kind == KIND_PAGE:
                    if f.seek(PAGE, os.SEEK_CUR) > size:
                        raise SnapshotError("stream file truncated inside a page")
                    pages += 1
                else:
                    zeros += 1
            elif kind == KIND_STATE:
                if state is not None:
                    raise SnapshotError("stream file has two state records")
                length, crc = struct.unpack("<QI", _read(f, 12, "the state record"))
                if length > fmt.MAX_STATE:
                    raise SnapshotError(f"stream state of {length} bytes exceeds "
                                        f"{fmt.MAX_STATE}")
                data = _read(f, length, "the state record")
                if zlib.crc32(data) != crc:
                    raise SnapshotError("stream state checksum mismatch: the state is corrupt")
                state = fmt.parse_json(data, "stream state")
                if not isinstance(state, dict):
                    raise SnapshotError("stream state is not kvmguest state")
                try:
                    decoded = MachineState.from_json(state)
                except StateError as err:
                    raise SnapshotError(f"state: {err}") from None
            elif kind == KIND_END:
                break
            else:
                raise SnapshotError(f"unknown stream record kind {kind}")
        if state is None:
            raise SnapshotError("stream file has no state record")
        if f.tell() != size:
            raise SnapshotError(f"stream file has {size - f.tell()} bytes after its end record")
    finally:
        f.close()
    return StreamInfo(path, size, blocks, records_offset, pages, zeros, state, decoded)


def page_records(info: StreamInfo, fd: int, read_page=None):
    """Replay the page records of a validated file in order: yields (kind, block, index)
    for page and zero records. For a page record, ``read_page(block, index)`` returns a
    buffer the page is read into (or None: the bytes are skipped)."""
    f = os.fdopen(os.dup(fd), "rb")
    try:
        f.seek(info.records_offset)
        while True:
            kind, bi, index = RECORD.unpack(f.read(RECORD.size))
            if kind == KIND_PAGE:
                buf = read_page(bi, index) if read_page else None
                if buf is None:
                    f.seek(PAGE, os.SEEK_CUR)
                elif f.readinto(buf) != PAGE:
                    raise SnapshotError("stream file changed while it was read")
            elif kind == KIND_STATE:
                f.seek(struct.unpack("<QI", f.read(12))[0], os.SEEK_CUR)
                continue
            elif kind != KIND_ZERO:
                return
            yield kind, bi, index
    finally:
        f.close()


def page_census(info: StreamInfo, fd: int) -> tuple[list[int], list[int]]:
    """Per block: pages that end up non-zero (last record wins), and page records."""
    last = [np.zeros(b.npages, dtype=np.int8) for b in info.blocks]   # 1 page, -1 zero
    records = [0] * len(info.blocks)
    for kind, bi, index in page_records(info, fd):
        last[bi][index] = 1 if kind == KIND_PAGE else -1
        records[bi] += kind == KIND_PAGE
    return [int((a == 1).sum()) for a in last], records


def load_stream(info: StreamInfo, fd: int) -> tuple[GuestMemory, int]:
    """Replay a validated stream file into fresh memory: (memory, page records read).

    The last copy of a page wins. A zero record touches memory only where an earlier
    record wrote the page, so what restore allocates is bounded by the page records in
    the file, not by the RAM the file claims."""
    memory = GuestMemory([Region(RegionSpec(b.slot, b.gpa, b.size, b.name))
                          for b in info.blocks])
    by_index = [memory.region_of_slot(b.slot) for b in info.blocks]   # paired by slot
    written = [np.zeros(b.npages, dtype=np.bool_) for b in info.blocks]
    pages = 0

    def into(bi: int, index: int):
        return memoryview(by_index[bi].array[index * PAGE:(index + 1) * PAGE])

    try:
        for kind, bi, index in page_records(info, fd, into):
            if kind == KIND_PAGE:
                written[bi][index] = True
                pages += 1
            elif written[bi][index]:
                by_index[bi].array[index * PAGE:(index + 1) * PAGE] = 0
    except BaseException:
        memory.close()
        raise
    return memory, pages


def describe_stream(info: dict, path: str, fd: int) -> None:
    s = validate_stream(path, fd)
    present, records = page_census(s, fd)
    info.update(valid=True, format="stream", version=VERSION,
                ram_size=sum(b.size for b in s.blocks), pages_present=int(sum(present)),
                page_records=s.pages, zero_records=s.zero_records,
                blocks=[{"name": b.name, "slot": b.slot, "gpa": b.gpa, "size": b.size,
                         "pages": b.npages, "pages_present": int(n), "records": int(r)}
                        for b, n, r in zip(s.blocks, present, records)],
                state=vcpu_summary(s.state), vcpus=len(s.state["vcpus"]),
                irqchip="irqchip" in s.state.get("vm", {}))


class StreamReader(SnapshotReader):
    kind, what = STREAM, "a streaming-format snapshot"

    def load(self, lazy, threads, progress) -> Loaded:
        info = validate_stream(self.path, self.fd)
        check_host_capacity(info.pages, lazy=False)
        memory, loaded = load_stream(info, self.fd)
        return Loaded(info.decoded, memory, loaded)

    def describe(self, info):
        describe_stream(info, self.path, self.fd)
