"""Page I/O shared by every snapshot writer and reader: runs of pages, zero detection,
pwrite/pread of whole buffers, hole punching, fsync, and the safe creation of files.

Nothing here knows a file format; :mod:`migrate.writer`, :mod:`migrate.reader` and
:mod:`migrate.formats.stream` build on it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import secrets
import signal
import time
from typing import Callable

import numpy as np

from kvmguest.errors import UsageError
from kvmguest.memory import PAGE_SIZE

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_uint]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
SYNC_FILE_RANGE_WRITE = 0x2
MAX_IO = 64 << 20          # bytes per pwritev/preadv call
IOV_MAX = 1024
MAX_THREADS = 64           # reader/writer threads at most (each holds an fd)


def check_threads(threads: int) -> int:
    """``threads`` if it is a sensible count of I/O threads, else a UsageError."""
    if isinstance(threads, bool) or not isinstance(threads, int) \
            or not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"--threads must be 1 to {MAX_THREADS}, not {threads!r}")
    return threads


FAULT_ENV = "KVMGUEST_FAULT_POINT"
STALL_ENV = "KVMGUEST_STALL_POINT"
_stalled: set[str] = set()


def fault_point(name: str, cancelled: Callable[[], bool] | None = None,
                once: bool = True) -> None:
    """Test hooks at named points of a save or restore (pass0, midpass, final-pass, state,
    before-rename, read-chunk). KVMGUEST_FAULT_POINT=NAME makes the process SIGKILL
    itself there (crash tests); KVMGUEST_STALL_POINT=NAME makes it wait there (up to
    120 s, or until ``cancelled()``), after a warning on stderr, so that a test can
    signal or cancel a save or restore known to be in progress."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(STALL_ENV) == name and not (once and name in _stalled):
        _stalled.add(name)
        log.warning("stalled at %s (%s)", name, STALL_ENV)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (cancelled and cancelled()):
            time.sleep(0.01)


def nonzero_pages(data: np.ndarray) -> np.ndarray:
    """bool per 4 KiB page of ``data``: does it hold any non-zero byte?

    Most pages with data have a non-zero first or last word, which settles them without
    reading the rest; only the others are scanned in full."""
    words = data.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
    nonzero = (words[:, 0] != 0) | (words[:, -1] != 0)
    unsure = np.flatnonzero(~nonzero)
    for k in range(0, len(unsure), 4096):          # bounded temporary copies
        rows = unsure[k:k + 4096]
        nonzero[rows] = words[rows].any(axis=1)
    return nonzero


def runs_of(indices: np.ndarray, max_gap: int = 0) -> np.ndarray:
    """Sorted page indices -> (start, end) rows of consecutive runs; runs apart by at most
    ``max_gap`` pages are joined (the pages between them are then in the run too)."""
    if len(indices) == 0:
        return np.empty((0, 2), dtype=np.int64)
    idx = np.asarray(indices, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(idx) > max_gap + 1) + 1
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


def pread_into(fd: int, buf, offset: int) -> bool:
    """preadv until ``buf`` is full; False when the file ends first."""
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            return False
        done += n
    return True


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


SYS_CACHESTAT = 451          # x86_64, Linux >= 6.5


def cached_fraction(fd: int) -> float:
    """How much of the file is in the page cache (cachestat(2)); 1.0 where the kernel
    cannot say, so that the reads stay buffered then."""
    size = os.fstat(fd).st_size
    if not size:
        return 1.0
    cs = _Cachestat()
    rng = _CachestatRange(0, size)
    if _libc.syscall(SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(cs), 0) != 0:
        return 1.0
    allocated = os.fstat(fd).st_blocks * 512 or size
    return min(1.0, cs.nr_cache * PAGE_SIZE / allocated)


def direct_fd(fd: int) -> int:
    """The same file opened again with O_DIRECT for an eager restore of a file that is
    not in the page cache (-1 where the filesystem refuses it). Pages sit at 4 KiB-aligned
    offsets and land in page-aligned guest memory, as O_DIRECT wants; the reads then go
    from the disk straight into guest memory, with no copy through the page cache and no
    second copy of the guest left in it. A file still in the cache (just saved) is read
    buffered: copying from the cache is faster than the disk."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return -1


SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WAIT_AFTER = 0x1, 0x4


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range now (so a later fsync is short)."""
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def wait_writeback(fd: int) -> None:
    """Wait until no page of the file is under writeback (nothing is made durable)."""
    _libc.sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE
                          | SYNC_FILE_RANGE_WAIT_AFTER)


def punch(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) a hole; where the filesystem cannot, write zeros."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
        zeros = mmap.mmap(-1, length)
        try:
            pwrite_all(fd, [memoryview(zeros)], offset)
        finally:
            zeros.close()


def data_extents(fd: int, start: int, end: int):
    """(offset, end) ranges of [start, end) that may hold data: holes are skipped; where
    the filesystem cannot tell (no SEEK_DATA), all of it."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno != errno.ENXIO:        # not "no data past here": cannot tell
                yield pos, end
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def fsync_dir(path: str) -> None:
    """fsync the directory holding ``path``, so that a rename into it is durable."""
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def open_excl(path: str, direct: bool) -> int:
    """Create ``path`` for writing: 0600, never an existing file, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags | (os.O_DIRECT if direct else 0), 0o600)


def temp_path_for(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
