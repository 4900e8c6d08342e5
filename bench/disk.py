"""The 100% lines: how fast this machine writes and reads the same bytes with plain
pwritev/preadv (1 MiB iovecs), buffered + fsync and with O_DIRECT, cold and warm."""

from __future__ import annotations

import mmap
import os
import time

from .common import Figure, Report

IOV = 1 << 20


def _buffer(nbytes: int) -> mmap.mmap:
    buf = mmap.mmap(-1, nbytes)
    pattern = (b"kvmguest" * (IOV // 8))
    for off in range(0, nbytes, IOV):
        buf[off:off + IOV] = pattern
    return buf


def _iovecs(buf, start: int, end: int) -> list:
    mv = memoryview(buf)
    return [mv[o:min(o + IOV, end)] for o in range(start, end, IOV)]


def write_file(path: str, buf, nbytes: int, direct: bool) -> float:
    """Seconds to write nbytes to a new file (and fsync it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o600)
    try:
        t = time.perf_counter()
        off = 0
        while off < nbytes:
            end = min(nbytes, off + 1024 * IOV)       # IOV_MAX iovecs per call
            off += os.pwritev(fd, _iovecs(buf, off, end), off)
        os.fsync(fd)
        return time.perf_counter() - t
    finally:
        os.close(fd)


def drop_cache(path: str) -> str:
    """Evict a file's pages: fadvise(DONTNEED) after fsync works without privileges."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return "posix_fadvise(DONTNEED)"


def fresh_memory(nbytes: int) -> mmap.mmap:
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return m


def read_file(path: str, buf, nbytes: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        off = 0
        while off < nbytes:
            end = min(nbytes, off + 1024 * IOV)
            n = os.preadv(fd, _iovecs(buf, off, end), off)
            if n <= 0:
                raise OSError("short read")
            off += n
        return time.perf_counter() - t
    finally:
        os.close(fd)


def ceilings(report: Report, workdir: str, sizes: list[int], runs: int) -> dict:
    """Figures in GB/s per size: {('write', direct, size): fig, ('read', cold, size): fig}."""
    out = {}
    for nbytes in sizes:
        label = f"{nbytes >> 30} GiB" if nbytes >= 1 << 30 else f"{nbytes >> 20} MiB"
        buf = _buffer(nbytes)
        path = os.path.join(workdir, "ceiling.bin")
        try:
            for direct in (False, True):
                secs = [write_file(path, buf, nbytes, direct) for _ in range(runs)]
                name = f"ceiling: pwritev {'O_DIRECT' if direct else 'buffered+fsync'} {label}"
                out["write", direct, nbytes] = report.add(Figure(
                    name, "GB/s", [nbytes / s / 1e9 for s in secs]))
            # A restore reads into memory it has just allocated, so that is the 100% line:
            # a fresh anonymous mapping (with transparent huge pages, as guest RAM has)
            # each run. Reading into memory that is already faulted in is shown beside it.
            cold, warm, prefaulted = [], [], []
            how = ""
            for _ in range(runs):
                how = drop_cache(path)
                cold.append(nbytes / read_file(path, fresh_memory(nbytes), nbytes) / 1e9)
                warm.append(nbytes / read_file(path, fresh_memory(nbytes), nbytes) / 1e9)
                prefaulted.append(nbytes / read_file(path, buf, nbytes) / 1e9)
            out["read", True, nbytes] = report.add(Figure(
                f"ceiling: preadv cold into fresh memory {label}", "GB/s", cold,
                note=f"cache dropped by {how}"))
            out["read", False, nbytes] = report.add(Figure(
                f"ceiling: preadv warm into fresh memory {label}", "GB/s", warm))
            report.add(Figure(f"reference: preadv warm into pre-faulted memory {label}", "GB/s",
                              prefaulted))
        finally:
            buf.close()
            if os.path.exists(path):
                os.unlink(path)
    return out
