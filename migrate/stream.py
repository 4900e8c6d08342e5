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
import time
import zlib

import numpy as np

from kvmguest.memory import GuestMemory, Region, RegionSpec

from .format import SnapshotError
from .writer import (PassStats, SaveError, _io_error, fsync_dir, nonzero_pages, open_excl,
                     pwrite_all, runs_of, temp_path_for)

MAGIC = b"KVMGSTRM"
VERSION = 1
PAGE = 4096
_HEAD = struct.Struct("<8sII48s")
_REC = struct.Struct("<IIQ")
KIND_PAGE, KIND_ZERO, KIND_STATE, KIND_END = 1, 2, 3, 4
BATCH = 256                     # pages per pwritev


class StreamWriter:
    format_name = "stream"

    def __init__(self, path: str, memory, direct: bool = False):
        if direct:
            raise SaveError("--direct-io applies to the mapped format only (stream records "
                            "are not page aligned)")
        self.path = os.path.abspath(path)
        self.regions = list(memory.regions)
        self.passes: list[PassStats] = []
        self.tmp = temp_path_for(self.path)
        try:
            self.fd = open_excl(self.tmp, False)
        except OSError as err:
            raise _io_error(err, self.tmp, "creating") from None
        blocks = json.dumps([{"name": r.name, "gpa": r.gpa, "size": r.size, "slot": r.slot}
                             for r in self.regions]).encode()
        self.offset = 0
        self._append([_HEAD.pack(MAGIC, VERSION, len(self.regions), b"\0" * 48),
                      struct.pack("<I", len(blocks)), blocks])

    def _append(self, bufs) -> None:
        try:
            pwrite_all(self.fd, bufs, self.offset)
            self.offset += sum(len(b) for b in bufs)
        except OSError as err:
            raise _io_error(err, self.tmp, "writing") from None

    def write_pass(self, dirty) -> PassStats:
        stats = PassStats(len(self.passes))
        t = time.perf_counter()
        for bi, r in enumerate(self.regions):
            if dirty is None:
                # Pass 0: restore starts from zeroed RAM, so only pages that may hold
                # data are sent (QEMU likewise skips zero pages on its first pass).
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
                    bufs = []
                    for i in range(c, ce):
                        if dirty is None and not nonzero[i - c]:
                            stats.pages_zero += 1
                        elif nonzero[i - c]:
                            bufs += [_REC.pack(KIND_PAGE, bi, i), r.array[i * PAGE:(i + 1) * PAGE]]
                            stats.pages_written += 1
                        else:
                            bufs.append(_REC.pack(KIND_ZERO, bi, i))
                            stats.pages_zero += 1
                    for k in range(0, len(bufs), 1024):     # IOV_MAX
                        self._append(bufs[k:k + 1024])
        stats.bytes_written = stats.pages_written * PAGE
        stats.seconds = time.perf_counter() - t
        self.passes.append(stats)
        return stats

    def finish(self, state: dict) -> None:
        data = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
        try:
            self._append([_REC.pack(KIND_STATE, 0, 0), struct.pack("<QI", len(data),
                          zlib.crc32(data)), data, _REC.pack(KIND_END, 0, 0)])
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.rename(self.tmp, self.path)
            fsync_dir(self.path)
        except OSError as err:
            self.abort()
            raise _io_error(err, self.path, "finishing") from None

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def read_stream(path: str, fd: int) -> tuple[GuestMemory, dict, int]:
    """Replay a stream file into fresh memory; (memory, state, page records read)."""
    size = os.fstat(fd).st_size
    f = os.fdopen(os.dup(fd), "rb")
    try:
        head = f.read(_HEAD.size)
        if len(head) != _HEAD.size:
            raise SnapshotError("stream file truncated in its header")
        magic, version, nblocks, _ = _HEAD.unpack(head)
        if magic != MAGIC or version != VERSION:
            raise SnapshotError("not a kvmguest stream file of a supported version")
        (blen,) = struct.unpack("<I", f.read(4))
        if blen > 1 << 20:
            raise SnapshotError("stream block list too large")
        try:
            blocks = json.loads(f.read(blen))
            specs = [RegionSpec(int(b["slot"]), int(b["gpa"]), int(b["size"]), str(b["name"]))
                     for b in blocks]
        except (ValueError, KeyError, TypeError) as err:
            raise SnapshotError(f"stream block list does not decode: {err}") from None
        if len(specs) != nblocks or not 1 <= nblocks <= 32 or any(
                s.size <= 0 or s.size % PAGE or s.gpa % PAGE for s in specs):
            raise SnapshotError("stream block list is inconsistent")
        if sum(s.size for s in specs) > 64 * size + (1 << 34):
            raise SnapshotError("stream claims more RAM than is plausible for its size")
        memory = GuestMemory([Region(s) for s in specs])
        state, pages = None, 0
        try:
            while True:
                rec = f.read(_REC.size)
                if len(rec) != _REC.size:
                    raise SnapshotError("stream file truncated: no end record")
                kind, bi, index = _REC.unpack(rec)
                if kind in (KIND_PAGE, KIND_ZERO):
                    if bi >= nblocks or index >= memory.regions[bi].npages:
                        raise SnapshotError(f"stream record for page {index} of block {bi} "
                                            "is out of range")
                    r = memory.regions[bi]
                    if kind == KIND_PAGE:
                        data = f.read(PAGE)
                        if len(data) != PAGE:
                            raise SnapshotError("stream file truncated inside a page")
                        r.array[index * PAGE:(index + 1) * PAGE] = np.frombuffer(data, np.uint8)
                        pages += 1
                    else:
                        r.array[index * PAGE:(index + 1) * PAGE] = 0
                elif kind == KIND_STATE:
                    length, crc = struct.unpack("<QI", f.read(12))
                    if length > 16 << 20:
                        raise SnapshotError("stream state too large")
                    data = f.read(length)
                    if len(data) != length or zlib.crc32(data) != crc:
                        raise SnapshotError("stream state is truncated or corrupt")
                    state = json.loads(data)
                elif kind == KIND_END:
                    break
                else:
                    raise SnapshotError(f"unknown stream record kind {kind}")
            if state is None:
                raise SnapshotError("stream file has no state record")
        except BaseException:
            memory.close()
            raise
        return memory, state, pages
    finally:
        f.close()
