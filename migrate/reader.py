"""Restore: validate the whole snapshot, rebuild a VM with its memory layout, load the
pages (preadv, several threads; or lazily by mmap MAP_PRIVATE of the page areas), apply
the vCPU and device state. The snapshot is opened read-only and never written."""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kvmguest.machine import Machine
from kvmguest.memory import GuestMemory, Region, RegionSpec
from kvmguest.state import StateError, check_machine_state, restore_machine

from . import format as fmt
from .format import SnapshotError
from .writer import MAX_IO, runs_of_mask, split_runs

PAGE = fmt.PAGE_SIZE


@dataclass
class RestoreReport:
    path: str
    lazy: bool
    pages_loaded: int
    bytes_loaded: int
    seconds: float

    def summary(self) -> str:
        how = "mapped lazily" if self.lazy else f"{self.bytes_loaded / 2**20:.1f} MiB read"
        return f"restored {self.path}: {how} in {self.seconds * 1e3:.1f} ms"


def meminfo(field: str) -> int:
    """A /proc/meminfo figure in bytes (0 when absent)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def check_host_capacity(snap: fmt.Snapshot, lazy: bool) -> None:
    """Refuse, before allocating anything, a guest this host could never hold: more RAM
    than the host's RAM + swap, or (reading eagerly) more present pages than are
    available now. A lazy restore maps the file and allocates only what the guest
    writes, so it is checked against RAM + swap only."""
    capacity = meminfo("MemTotal") + meminfo("SwapTotal")
    if capacity and snap.ram_size > capacity:
        raise SnapshotError(f"snapshot records {snap.ram_size / 2**30:.1f} GiB of guest RAM; "
                            f"this host has {capacity / 2**30:.1f} GiB (RAM + swap)")
    need, avail = snap.pages_present * PAGE, meminfo("MemAvailable")
    if not lazy and avail and need > avail:
        raise SnapshotError(f"restoring needs {need / 2**30:.1f} GiB of RAM for the guest's "
                            f"pages; the host has {avail / 2**30:.1f} GiB available "
                            "(try --lazy)")


def _preadv_all(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise SnapshotError(f"page data at {offset + done} is missing: file truncated")
        done += n


def _read_runs(fd: int, region: Region, block: fmt.Block, runs: np.ndarray) -> int:
    for start, end in runs.tolist():
        for c in range(start, end, MAX_IO // PAGE):
            ce = min(end, c + MAX_IO // PAGE)
            _preadv_all(fd, region.array[c * PAGE:ce * PAGE], block.page_offset(c))
    return int((runs[:, 1] - runs[:, 0]).sum()) if len(runs) else 0


def _data_extents(fd: int, start: int, end: int):
    """(offset, end) ranges of [start, end) that hold data (not holes)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def load_memory(snap: fmt.Snapshot, fd: int, lazy: bool, threads: int) -> tuple[GuestMemory, int]:
    """Guest memory with the snapshot's layout and contents; returns (memory, pages read)."""
    specs = [RegionSpec(b.slot, b.gpa, b.size, b.name) for b in snap.layout.blocks]
    check_host_capacity(snap, lazy)
    if not lazy:
        memory = GuestMemory([Region(s) for s in specs])
        try:
            jobs = []
            for region, block, bits in zip(memory.regions, snap.layout.blocks, snap.present):
                runs = runs_of_mask(bits)
                jobs += [(region, block, g) for g in split_runs(runs, threads)]
            if threads > 1 and len(jobs) > 1:
                with ThreadPoolExecutor(threads) as pool:
                    loaded = sum(pool.map(lambda j: _read_runs(fd, *j), jobs))
            else:
                loaded = sum(_read_runs(fd, *j) for j in jobs)
        except OSError as err:
            memory.close()
            raise SnapshotError(f"reading pages failed: {err.strerror}") from None
        except BaseException:
            memory.close()
            raise
        return memory, loaded
    regions = []
    try:
        for spec, block, bits in zip(specs, snap.layout.blocks, snap.present):
            m = mmap.mmap(fd, block.size, flags=mmap.MAP_PRIVATE,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=block.pages_offset)
            region = Region(spec, mapping=m)
            regions.append(region)
            # A clear bit means zero. Our writer leaves holes there; if a file has data
            # at such a page anyway, zero it in the private mapping.
            for s, e in _data_extents(fd, block.pages_offset, block.pages_offset + block.size):
                first, last = (s - block.pages_offset) // PAGE, -(-(e - block.pages_offset) // PAGE)
                absent = ~bits[first:last]
                for a, b in runs_of_mask(absent).tolist():
                    region.array[(first + a) * PAGE:(first + b) * PAGE] = 0
    except BaseException:
        for r in regions:
            r.close()
        raise
    return GuestMemory(regions), 0


def validate(path: str, fd: int | None = None) -> fmt.Snapshot:
    """Everything restore checks before it allocates guest memory or creates a VM:
    the file (format.read_snapshot) and the decoded vCPU/device state."""
    snap = fmt.read_snapshot(path, fd)
    try:
        check_machine_state(snap.state)
    except StateError as err:
        raise SnapshotError(f"state: {err}") from None
    return snap


def restore(path: str, *, lazy: bool = False, threads: int = 2, stream=None,
            console_capacity: int = 1 << 20) -> tuple[Machine, RestoreReport]:
    """A paused-at-start Machine rebuilt from ``path``; call ``start()`` to resume the guest."""
    t = time.perf_counter()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise SnapshotError(f"cannot open {path}: {err.strerror}") from None
    try:
        head = os.pread(fd, 8, 0)
        if head == b"KVMGSTRM":
            from .stream import read_stream
            memory, state, loaded = read_stream(path, fd)
            lazy = False
        else:
            snap = validate(path, fd)
            state = snap.state
            memory, loaded = load_memory(snap, fd, lazy, threads)
    finally:
        os.close(fd)
    try:
        machine = Machine(None, guest_memory=memory, stream=stream,
                          console_capacity=console_capacity)
    except BaseException:
        memory.close()
        raise
    try:
        restore_machine(machine, state)
    except (StateError, ValueError) as err:
        machine.close()
        raise SnapshotError(f"state cannot be applied: {err}") from None
    except BaseException:
        machine.close()
        raise
    return machine, RestoreReport(os.path.abspath(path), lazy, loaded, loaded * PAGE,
                                  time.perf_counter() - t)
