"""Continuous checkpoints: a file kept, in place, a restorable copy of a running guest.

Every ``every`` seconds (or on demand) the guest is paused just long enough to take the
pages it changed since the last checkpoint (its own dirty-tracking client), copy them
out and capture the vCPU/VM/device state; it then runs on while the checkpoint is
written. The file layout, the write order and the invariant that makes it crash
consistent (at every instant, ``kvmguest restore`` gives exactly the latest committed
checkpoint) are in docs/FORMAT.md, "Continuous checkpoints".
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from kvmguest.memory import PAGE_SIZE, GuestMemory, Region
from kvmguest.state import read_machine

from .format import CHECKPOINT_MAGIC as MAGIC
from .format import MAX_BLOCKS, MAX_SLOT, Block, SnapshotError, parse_json
from .pageio import (FAULT_ENV, data_extents, fault_point, fsync_dir, pread_into, pwrite_all,
                     runs_of, temp_path_for)
from .errors import SaveError, check_save_target, io_error
from .snapshot import decode_state, region_specs

log = logging.getLogger(__name__)
PAGE = PAGE_SIZE
VERSION = 1
SLOT_OFFSETS = (4096, 8192)
HEADER_END = 12288
ALIGN = 1 << 20
RECORD_MAGIC = b"CKPTRECD"
COMMITTED, APPLIED = 1, 2
RECORD = struct.Struct("<8sQIIIIQIQQ")          # 60 bytes, then a CRC32
SUPER = struct.Struct("<8sII")                   # magic, version, JSON length (CRC after)
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
    return _place([(r.gpa, r.size, r.slot) for r in memory.regions], state_size)


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
        body = RECORD.pack(RECORD_MAGIC, self.generation, self.kind, self.state_slot,
                           self.state_len, self.state_crc, self.journal_pages,
                           self.journal_crc, self.time_ns, self.pages_written)
        return (body + struct.pack("<I", zlib.crc32(body))).ljust(512, b"\0")

    @classmethod
    def parse(cls, raw: bytes) -> "CheckpointRecord | None":
        if len(raw) < RECORD.size + 4 or raw[:8] != RECORD_MAGIC:
            return None
        body = raw[:RECORD.size]
        if struct.unpack_from("<I", raw, RECORD.size)[0] != zlib.crc32(body):
            return None
        f = RECORD.unpack(body)
        r = cls(*f[1:])
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
@dataclass
class CheckpointStats:
    generation: int
    pages: int
    pause_ms: float
    write_ms: float
    bytes_written: int


@dataclass
class _Taken:
    generation: int
    pages: dict                   # slot -> sorted page indices
    data: dict                    # slot -> (n, PAGE) uint8 copies
    state: dict
    pause_ms: float


class Checkpointer:
    """Keeps ``path`` a crash-consistent checkpoint of ``machine``: :meth:`take` one now,
    or :meth:`start` a thread taking one every ``every`` seconds."""

    def __init__(self, machine, path: str, every: float | None = None, on_checkpoint=None):
        self.machine, self.every, self.on_checkpoint = machine, every, on_checkpoint
        self.path = check_save_target(path)
        self.layout = plan_checkpoint(machine.memory, len(machine.vcpus))
        self.generation = 0
        self.history: list = []
        self.stats: list[CheckpointStats] = []
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd = -1
        self._latest_slot = -1
        self._base, n = {}, 0            # global page number of each slot's first page
        for r in machine.memory.regions:
            self._base[r.slot] = n
            n += r.npages
        # While set, the timer takes none: a debugger holds the guest stopped, and a
        # checkpoint of that moment would leave nothing earlier to go back to.
        self.held = threading.Event()
        self._record_log = os.environ.get(RECORD_ENV)
        self._unsynced = [] if os.environ.get(POWERLOSS_ENV) else None
        machine.msr_indices()            # read now, not inside the first pause
        self.client = machine.dirty.open("checkpoints")

    # --- the file ---
    def _pwrite(self, data, offset: int, what: str) -> None:
        bufs = data if isinstance(data, list) else [data]
        if self._unsynced is not None:          # power-loss test mode: keep pre-images
            length = sum(memoryview(b).nbytes for b in bufs)
            self._unsynced.append((offset, os.pread(self._fd, length, offset)))
        try:
            pwrite_all(self._fd, bufs, offset)
        except OSError as err:
            raise io_error(err, self.path, what) from None

    def _fsync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as err:
            raise io_error(err, self.path, "syncing") from None
        if self._unsynced is not None:
            self._unsynced.clear()

    def _crash_point(self, phase: str, generation: int) -> None:
        """Test hook (see POWERLOSS_ENV): in checkpoint FAULT_GENERATION only."""
        if generation != FAULT_GENERATION or os.environ.get(FAULT_ENV) != phase:
            return
        if self._unsynced is not None:
            import random
            rng = random.Random(int(os.environ[POWERLOSS_ENV]))
            for offset, old in reversed(self._unsynced):
                fate = rng.choice(("kept", "lost", "torn"))
                if fate == "lost":
                    os.pwrite(self._fd, old, offset)
                elif fate == "torn" and len(old) > SECTOR:     # a prefix of sectors landed
                    cut = rng.randrange(1, -(-len(old) // SECTOR)) * SECTOR
                    os.pwrite(self._fd, old[cut:], offset + cut)
            os.fsync(self._fd)
        fault_point(phase)

    def _create(self) -> str:
        """The new file under a temporary name: superblock, size. Renamed over the path
        once checkpoint 1 is committed (an old file there is untouched until then)."""
        tmp = temp_path_for(self.path)
        self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        blob = json.dumps(self.layout.to_json()).encode()
        head = SUPER.pack(MAGIC, VERSION, len(blob)) + blob
        head += struct.pack("<I", zlib.crc32(head))
        if len(head) > SLOT_OFFSETS[0]:
            raise SaveError("checkpoint layout does not fit its superblock")
        self._pwrite(head, 0, "writing")
        os.ftruncate(self._fd, self.layout.file_size)
        return tmp

    def _write_record(self, record: CheckpointRecord) -> None:
        slot = 1 - self._latest_slot if self._latest_slot >= 0 else 0
        self._pwrite(record.pack(), SLOT_OFFSETS[slot], "writing a record to")
        self._fsync()
        self._latest_slot = slot

    def _apply(self, taken: _Taken) -> int:
        """Write the taken pages at their fixed offsets; bytes written."""
        written = 0
        for b in self.layout.blocks:
            pages, data = taken.pages.get(b["slot"]), taken.data.get(b["slot"])
            if pages is None or not len(pages):
                continue
            at = 0
            for start, end in runs_of(pages).tolist():
                n = end - start
                self._pwrite([data[at:at + n]], b["pages_offset"] + start * PAGE,
                             "writing pages to")
                at += n
                written += n * PAGE
        return written

    # --- one checkpoint ---
    def _capture(self) -> _Taken:
        m = self.machine
        first = self.generation == 0
        t0 = time.perf_counter()
        m.pause_all()
        try:
            changed = self.client.take()     # checkpoint 1 takes all RAM instead
            state = read_machine(m)     # encoded after the guest runs again
            data = {}
            for r in m.memory.regions:
                if first:     # a new file: pages never written stay holes (zeros)
                    changed[r.slot] = np.flatnonzero(r.maybe_nonzero())
                idx = changed.get(r.slot, np.zeros(0, np.int64))
                changed[r.slot] = idx
                data[r.slot] = r.pages()[idx]          # a copy (fancy indexing)
        finally:
            m.resume_all()
        pause_ms = (time.perf_counter() - t0) * 1e3
        return _Taken(self.generation + 1, changed, data, state.to_json(), pause_ms)

    def take(self) -> CheckpointStats:
        """Take one checkpoint now (pause, copy out, resume, then write); its figures."""
        with self._lock:
            taken = self._capture()
            if self._record_log:
                self._log_record(taken)       # before it is written: a kill may follow
            t0 = time.perf_counter()
            written = self._write(taken)
            st = CheckpointStats(taken.generation, sum(len(p) for p in taken.pages.values()),
                                 taken.pause_ms, (time.perf_counter() - t0) * 1e3, written)
            self.stats.append(st)
            self.generation = taken.generation
            if self.on_checkpoint:
                self.on_checkpoint(st)
            return st

    def _write(self, taken: _Taken) -> int:
        gen, first = taken.generation, taken.generation == 1
        tmp = self._create() if first else None
        try:
            self.history = (self.history + [{"generation": gen, "time_ns": time.time_ns(),
                                             "pages": int(sum(len(p) for p in
                                                              taken.pages.values()))}])[-HISTORY:]
            blob = json.dumps({"state": taken.state, "checkpoints": self.history}).encode()
            if len(blob) > self.layout.state_size:
                raise SaveError(f"state of {len(blob)} bytes exceeds the checkpoint's state "
                                f"slot ({self.layout.state_size})")
            state_slot = gen % 2
            self._pwrite(blob, self.layout.state_offsets[state_slot], "writing state to")
            self._crash_point("ckpt-state", gen)
            journal_pages, journal_crc, written = 0, 0, len(blob)
            if first:
                written += self._apply(taken)             # a new file: straight in place
            else:
                numbers = np.concatenate([taken.pages[b["slot"]] + self._base[b["slot"]]
                                          for b in self.layout.blocks]).astype("<u8")
                datas = [taken.data[b["slot"]] for b in self.layout.blocks]
                journal_pages = len(numbers)
                crc = zlib.crc32(numbers.tobytes())
                for d in datas:
                    crc = zlib.crc32(d, crc) if len(d) else crc
                journal_crc = crc
                self._pwrite([numbers.tobytes()] + [d for d in datas if len(d)],
                             self.layout.journal_offset, "writing the journal of")
                written += journal_pages * (8 + PAGE)
            self._crash_point("ckpt-journal", gen)
            self._fsync()
            self._crash_point("ckpt-synced", gen)
            rec = CheckpointRecord(gen, COMMITTED, state_slot, len(blob), zlib.crc32(blob),
                         journal_pages, journal_crc, time.time_ns(), journal_pages)
            self._write_record(rec)
            if first:
                os.rename(tmp, self.path)
                fsync_dir(self.path)
                tmp = None
            self._crash_point("ckpt-committed", gen)
            if not first:
                written += self._apply(taken)
                self._crash_point("ckpt-applying", gen)
                self._fsync()
                self._crash_point("ckpt-applied-synced", gen)
                rec.kind = APPLIED
                self._write_record(rec)
            return written
        except BaseException:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            raise

    def _log_record(self, taken: _Taken) -> None:
        """Test hook: the CRC of every page this checkpoint wrote, appended to a file."""
        with open(self._record_log, "a") as f:
            for b in self.layout.blocks:
                pages, data = taken.pages[b["slot"]], taken.data[b["slot"]]
                crcs = [zlib.crc32(row) for row in data]
                f.write(json.dumps({"generation": taken.generation, "slot": b["slot"],
                                    "pages": pages.tolist(), "crcs": crcs}) + "\n")

    def rewind(self) -> int:
        """Put the guest (paused by the caller) back to the newest committed checkpoint,
        in place: the pages it changed since, then the whole vCPU/VM/device state; that
        checkpoint's generation. Nothing between it and now is replayed."""
        m = self.machine
        with self._lock:
            if not self.generation:
                raise SaveError("no checkpoint has been taken yet")
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ck = validated_checkpoint(self.path, fd)
                saved, _ = load_checkpoint(ck, fd)
            finally:
                os.close(fd)
            m.pause_all()
            try:
                state = ck.decoded.decoded(m, cpuid=False)    # checked before any change
                changed = self.client.take()
                for r in m.memory.regions:
                    idx = changed.get(r.slot)
                    if idx is not None and len(idx):
                        r.pages()[idx] = saved.region_of_slot(r.slot).pages()[idx]
                m.dirty.note_written(changed, exclude=self.client)
                state.apply(m)
            finally:
                m.resume_all()
                saved.close()
            return ck.record.generation

    # --- the thread ---
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="checkpoints", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set() and self.machine.running:
                if not self.held.is_set():
                    self.take()
                self._stop.wait(self.every)
        except BaseException as err:   # noqa: BLE001 - reported by stop()
            if self.machine.running:
                self.error = err
                log.error("checkpoint failed: %s", err)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.close()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.client.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
    _, version, n = SUPER.unpack_from(head)
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
