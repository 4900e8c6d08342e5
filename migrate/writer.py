"""Writes guest pages at their fixed offsets: pwritev straight from guest memory, several
threads each with its own fd, optional O_DIRECT, zero pages detected and punched out.

A :class:`MappedWriter` owns a temporary file next to the target; :meth:`finish` makes it
durable and renames it into place, :meth:`abort` removes it. Nothing touches the target
path before the rename, so a failed or killed save leaves the previous snapshot intact.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import format as fmt

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_uint]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
SYNC_FILE_RANGE_WRITE = 0x2
PAGE = fmt.PAGE_SIZE
MAX_IO = 64 << 20          # bytes per pwritev call
SMALL_PASS = 1024          # pages; fewer are written without the thread pool


FAULT_ENV = "KVMGUEST_FAULT_POINT"


def fault_point(name: str) -> None:
    """Fault injection for the crash tests: SIGKILL this process at the named point when
    KVMGUEST_FAULT_POINT says so (pass0, midpass, final-pass, state, before-rename)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class SaveError(RuntimeError):
    """A save failed; the message says why. The previous snapshot at the path is intact."""


@dataclass
class PassStats:
    index: int
    pages_dirty: int = 0
    pages_written: int = 0
    pages_zero: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def throughput(self) -> float:
        """Bytes per second for this pass (0 when nothing was written)."""
        return self.bytes_written / self.seconds if self.seconds > 0 else 0.0


def nonzero_pages(data: np.ndarray) -> np.ndarray:
    """bool per 4 KiB page of ``data``: does it hold any non-zero byte?

    Most pages with data have a non-zero first or last word, which settles them without
    reading the rest; only the others are scanned in full."""
    words = data.view(np.uint64).reshape(-1, PAGE // 8)
    nonzero = (words[:, 0] != 0) | (words[:, -1] != 0)
    unsure = np.flatnonzero(~nonzero)
    for k in range(0, len(unsure), 4096):          # bounded temporary copies
        rows = unsure[k:k + 4096]
        nonzero[rows] = words[rows].any(axis=1)
    return nonzero


def pwrite_all(fd: int, bufs: list, offset: int) -> None:
    """pwritev until every byte is written (a short write carries on where it stopped)."""
    total = sum(len(b) for b in bufs)
    done = os.pwritev(fd, bufs, offset)
    while done < total:
        rest, skip = [], done
        for b in bufs:
            mv = memoryview(b)
            if skip >= len(mv):
                skip -= len(mv)
                continue
            rest.append(mv[skip:])
            skip = 0
        n = os.pwritev(fd, rest, offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        done += n


def fsync_dir(path: str) -> None:
    """fsync the directory holding ``path``, so that a rename into it is durable."""
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def runs_of(indices: np.ndarray) -> np.ndarray:
    """Sorted page indices -> (start, end) rows of consecutive runs."""
    if len(indices) == 0:
        return np.empty((0, 2), dtype=np.int64)
    idx = np.asarray(indices, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([idx[0]], idx[breaks]))
    ends = np.concatenate((idx[breaks - 1] + 1, [idx[-1] + 1]))
    return np.stack([starts, ends], axis=1)


def runs_of_mask(mask: np.ndarray) -> np.ndarray:
    """bool per page -> (start, end) rows of the runs of True."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges.reshape(-1, 2)


def split_runs(runs: np.ndarray, parts: int) -> list[np.ndarray]:
    """Split runs into ``parts`` groups of about equal page count (runs may be cut)."""
    if parts <= 1 or len(runs) == 0:
        return [runs]
    total = int((runs[:, 1] - runs[:, 0]).sum())
    share = -(-total // parts)
    groups, current, filled = [], [], 0
    for start, end in runs.tolist():
        while start < end:
            take = min(end - start, share - filled)
            current.append((start, start + take))
            filled += take
            start += take
            if filled >= share:
                groups.append(np.array(current, dtype=np.int64))
                current, filled = [], 0
    if current:
        groups.append(np.array(current, dtype=np.int64))
    return groups


def open_excl(path: str, direct: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags | (os.O_DIRECT if direct else 0), 0o600)


def temp_path_for(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")


def _io_error(err: OSError, path: str, what: str) -> SaveError:
    if err.errno == errno.ENOSPC:
        return SaveError(f"no space left on device while {what} {path}")
    if err.errno == errno.EDQUOT:
        return SaveError(f"disk quota exceeded while {what} {path}")
    return SaveError(f"{what} {path} failed: {err.strerror}")


class MappedWriter:
    """One snapshot being written in the mapped-ram layout."""

    format_name = "mapped"

    def __init__(self, path: str, memory, threads: int = 1, direct: bool = False):
        if threads < 1:
            raise SaveError("--threads must be at least 1")
        self.path = os.path.abspath(path)
        self.memory, self.threads, self.direct = memory, threads, direct
        self.regions = list(memory.regions)
        self.layout = fmt.plan([(r.name, r.gpa, r.size, r.slot) for r in self.regions])
        self.present = [np.zeros(r.npages, dtype=np.bool_) for r in self.regions]
        self.on_disk = [np.zeros(r.npages, dtype=np.bool_) for r in self.regions]
        self.passes: list[PassStats] = []
        self.tmp = temp_path_for(self.path)
        self.fds: list[int] = []
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="writer") if threads > 1 else None
        self._open()

    # --- files ---------------------------------------------------------------------------
    def _open(self) -> None:
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise SaveError(f"directory {directory} does not exist")
        if os.path.isdir(self.path):
            raise SaveError(f"{self.path} is a directory")
        try:
            self.fds.append(open_excl(self.tmp, self.direct))
        except OSError as err:
            if err.errno != errno.EEXIST:
                # Some filesystems create the file, then refuse O_DIRECT: remove our file.
                try:
                    os.unlink(self.tmp)
                except OSError:
                    pass
            if self.direct and err.errno == errno.EINVAL:
                raise SaveError(f"the filesystem holding {directory} does not support O_DIRECT "
                                "(drop --direct-io)") from None
            raise _io_error(err, self.tmp, "creating") from None
        try:
            for _ in range(self.threads - 1):
                self.fds.append(os.open(self.tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                                        | (os.O_DIRECT if self.direct else 0)))
            os.ftruncate(self.fds[0], self.layout.state_offset)
            self._pwrite_meta(fmt.pack_header(self.layout, complete=False), 0)
        except OSError as err:
            self.abort()
            raise _io_error(err, self.tmp, "writing") from None

    def _pwrite_meta(self, data: bytes, offset: int) -> None:
        """Metadata goes through a page-aligned buffer padded to 4 KiB (O_DIRECT-safe)."""
        padded = fmt.pad(data)
        buf = mmap.mmap(-1, len(padded))
        try:
            buf.write(padded)
            pwrite_all(self.fds[0], [memoryview(buf)], offset)
        finally:
            buf.close()

    def _punch(self, fd: int, offset: int, length: int) -> None:
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS):   # keep correctness: write zeros
                zeros = mmap.mmap(-1, length)
                try:
                    pwrite_all(fd, [memoryview(zeros)], offset)
                finally:
                    zeros.close()
            else:
                raise OSError(err, os.strerror(err))

    # --- pages ---------------------------------------------------------------------------
    def _write_runs(self, fd: int, bi: int, runs: np.ndarray) -> tuple[int, int]:
        """Write the non-zero pages of these runs of block ``bi``; punch the zero ones."""
        r, block = self.regions[bi], self.layout.blocks[bi]
        present, on_disk = self.present[bi], self.on_disk[bi]
        pages = r.array
        written = zero = 0
        for start, end in runs.tolist():
            nonzero = nonzero_pages(pages[start * PAGE:end * PAGE])
            for s, e in runs_of_mask(nonzero).tolist():
                s, e = s + start, e + start
                for c in range(s, e, MAX_IO // PAGE):
                    ce = min(e, c + MAX_IO // PAGE)
                    pwrite_all(fd, [pages[c * PAGE:ce * PAGE]], block.page_offset(c))
                    if not self.direct:
                        # Start writeback now, while the guest runs, so that the fsync
                        # in finish() (inside no downtime, but in the save's time) is short.
                        _libc.sync_file_range(fd, block.page_offset(c), (ce - c) * PAGE,
                                              SYNC_FILE_RANGE_WRITE)
                written += e - s
            zeros = ~nonzero
            if zeros.any():
                # Pages that were written in an earlier pass and are zero now: punch them.
                stale = zeros & on_disk[start:end]
                for s, e in runs_of_mask(stale).tolist():
                    self._punch(fd, block.page_offset(start + s), (e - s) * PAGE)
                zero += int(zeros.sum())
            present[start:end] = nonzero
            on_disk[start:end] |= nonzero
        return written, zero

    def write_pass(self, dirty: dict[int, np.ndarray] | None) -> PassStats:
        """Write one pass: ``dirty`` maps slot -> page indices; None means every page."""
        stats = PassStats(len(self.passes))
        t = time.perf_counter()
        jobs = []
        for bi, r in enumerate(self.regions):
            if dirty is None:
                # Every page; those the host never backed are zeros: no need to read them.
                candidates = r.maybe_nonzero()
                stats.pages_dirty += r.npages - int(candidates.sum())
                stats.pages_zero += r.npages - int(candidates.sum())
                runs = runs_of_mask(candidates)
            else:
                idx = dirty.get(r.slot, np.empty(0, dtype=np.int64))
                runs = runs_of(idx)
            n = int((runs[:, 1] - runs[:, 0]).sum()) if len(runs) else 0
            stats.pages_dirty += n
            if n:
                jobs += [(bi, g) for g in split_runs(runs, self.threads)]
        try:
            # A small pass (the stop-and-copy, usually) is quicker written here than
            # handed to the pool: the hand-off costs more than the writes.
            if self._pool is None or stats.pages_dirty - stats.pages_zero <= SMALL_PASS:
                results = []
                for bi, g in jobs:
                    results.append(self._write_runs(self.fds[0], bi, g))
                    # Crash tests die here, with this pass partly on disk.
                    fault_point("pass0" if stats.index == 0 else "midpass")
            else:
                futures = [self._pool.submit(self._write_runs, self.fds[i % self.threads], bi, g)
                           for i, (bi, g) in enumerate(jobs)]
                results = []
                for f in futures:
                    results.append(f.result())
                    fault_point("pass0" if stats.index == 0 else "midpass")
        except OSError as err:
            raise _io_error(err, self.tmp, "writing") from None
        stats.pages_written = sum(w for w, _ in results)
        stats.pages_zero += sum(z for _, z in results)
        stats.bytes_written = stats.pages_written * PAGE
        stats.seconds = time.perf_counter() - t
        self.passes.append(stats)
        return stats

    # --- completion ----------------------------------------------------------------------
    def finish(self, state: dict) -> None:
        """Bitmaps, block table, state; fsync; the COMPLETE header; fsync; rename; fsync dir."""
        try:
            layout = fmt.with_present(self.layout, self.present)
            for b, bits in zip(layout.blocks, self.present):
                self._pwrite_meta(fmt.pack_bitmap(bits, b.bitmap_length), b.bitmap_offset)
            table = fmt.pack_table(layout)
            self._pwrite_meta(table, layout.table_offset)
            state_bytes = fmt.encode_state(state)
            self._pwrite_meta(state_bytes, layout.state_offset)
            fault_point("state")
            os.ftruncate(self.fds[0], fmt.max_file_size(layout, len(state_bytes)))
            os.fsync(self.fds[0])
            self._pwrite_meta(fmt.pack_header(layout, complete=True, state_length=len(state_bytes),
                                              table_crc=fmt.crc(table),
                                              state_crc=fmt.crc(state_bytes)), 0)
            os.fsync(self.fds[0])
            self.layout = layout
            self._close_fds()
            fault_point("before-rename")
            os.rename(self.tmp, self.path)
            fsync_dir(self.path)
        except OSError as err:
            self.abort()
            raise _io_error(err, self.path, "finishing") from None
        except BaseException:
            self.abort()
            raise

    def _close_fds(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        while self.fds:
            os.close(self.fds.pop())

    def abort(self) -> None:
        """Remove the temporary file; the target path is untouched."""
        self._close_fds()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass

