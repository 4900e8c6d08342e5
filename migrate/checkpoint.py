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
from dataclasses import dataclass

import numpy as np

from kvmguest.state import read_machine

from .errors import SaveError, check_save_target, io_error
from .formats.checkpoint import (APPLIED, COMMITTED, FAULT_GENERATION, HISTORY, MAGIC, PAGE,
                                 POWERLOSS_ENV, RECORD_ENV, SECTOR, SLOT_OFFSETS, SUPER,
                                 VERSION, CheckpointRecord, load_checkpoint, plan_checkpoint,
                                 validated_checkpoint)
from .pageio import FAULT_ENV, fault_point, fsync_dir, pwrite_all, runs_of, temp_path_for

log = logging.getLogger(__name__)


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
        for r in machine.memory.saved_regions:
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
        head = SUPER.pack(magic=MAGIC, version=VERSION, layout_length=len(blob)) + blob
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
            for r in m.memory.saved_regions:
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
                for r in m.memory.saved_regions:
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


