"""Restore: validate the whole snapshot, rebuild a VM with its memory layout, load the
pages (preadv, several threads; or lazily by mmap MAP_PRIVATE of the page areas), apply
the vCPU and device state. The snapshot is opened read-only and never written."""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kvmguest.machine import Machine, open_kvm
from kvmguest.memory import PAGE_SIZE as PAGE
from kvmguest.memory import MAP_NORESERVE
from kvmguest.memory import GuestMemory, Region
from kvmguest.state import MachineState, StateError

from . import format as fmt
from .format import SnapshotError
from .snapshot import Loaded, decode_state, open_snapshot, reader_for, region_specs
from .lease import SnapshotLease
from .pageio import (MAX_IO, cached_fraction, check_threads, data_extents, direct_fd,
                     fault_point, pread_into, runs_of_mask, split_runs)

log = logging.getLogger(__name__)


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


def check_host_capacity(pages_present: int, lazy: bool) -> None:
    """Refuse, before allocating anything, an eager restore whose present pages do not
    fit in the memory available now. A lazy restore maps the file and allocates only
    what the guest writes afterwards, exactly like the guest it was saved from."""
    need, avail = pages_present * PAGE, meminfo("MemAvailable")
    if not lazy and avail and need > avail:
        raise SnapshotError(f"restoring needs {need / 2**30:.1f} GiB of RAM for the guest's "
                            f"pages; the host has {avail / 2**30:.1f} GiB available "
                            "(try --lazy)")


def _read_runs(fd: int, region: Region, block: fmt.Block, runs: np.ndarray,
               cancel: threading.Event) -> int:
    for start, end in runs.tolist():
        for c in range(start, end, MAX_IO // PAGE):
            fault_point("read-chunk", cancel.is_set, once=False)
            if cancel.is_set():
                return 0
            ce = min(end, c + MAX_IO // PAGE)
            if not pread_into(fd, region.array[c * PAGE:ce * PAGE], block.page_offset(c)):
                raise SnapshotError(f"page data at {block.page_offset(c)} is missing: "
                                    "file truncated")
    return int((runs[:, 1] - runs[:, 0]).sum()) if len(runs) else 0


def paired(memory: GuestMemory, blocks) -> list[tuple[Region, fmt.Block]]:
    """Each block with the region of the same slot (never by position)."""
    return [(memory.region_of_slot(b.slot), b) for b in blocks]


def read_pages(pairs, presents, fd: int, threads: int, progress=None) -> int:
    """preadv every present page into its region, ``threads`` at a time. An interrupt
    (Ctrl-C) stops the readers at their next chunk instead of draining the queue."""
    cancel = threading.Event()
    jobs = []
    for (region, block), bits in zip(pairs, presents):
        runs = runs_of_mask(bits)
        n = int((runs[:, 1] - runs[:, 0]).sum()) if len(runs) else 0
        jobs += [(region, block, g)
                 for g in split_runs(runs, max(threads, -(-n // (MAX_IO // PAGE))))]
    total = max(sum(int(b.sum()) for b in presents), 1)
    done = 0

    def tally(n: int) -> int:
        nonlocal done
        done += n
        if progress:
            progress("reading pages", done / total)
        return n

    if threads <= 1 or len(jobs) <= 1:
        return sum(tally(_read_runs(fd, *j, cancel)) for j in jobs)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="reader")
    try:
        futures = [pool.submit(_read_runs, fd, *j, cancel) for j in jobs]
        return sum(tally(f.result()) for f in futures)
    finally:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)


def load_memory(snap: fmt.Snapshot, fd: int, lazy: bool, threads: int,
                progress=None) -> tuple[GuestMemory, int]:
    """Guest memory with the snapshot's layout and contents; returns (memory, pages read)."""
    specs = region_specs(snap.layout.blocks)
    check_host_capacity(snap.pages_present, lazy)
    if not lazy:
        memory = GuestMemory([Region(s) for s in specs])
        dfd = direct_fd(fd) if cached_fraction(fd) < 0.5 else -1    # cold: O_DIRECT
        log.debug("reading pages %s", "with O_DIRECT (file not cached)" if dfd >= 0
                  else "buffered")
        try:
            loaded = read_pages(paired(memory, snap.layout.blocks), snap.present,
                                fd if dfd < 0 else dfd, threads, progress)
        except OSError as err:
            memory.close()
            raise SnapshotError(f"reading pages failed: {err.strerror}") from None
        except BaseException:
            memory.close()
            raise
        finally:
            if dfd >= 0:
                os.close(dfd)
        return memory, loaded
    regions = []
    try:
        for i, (spec, block) in enumerate(zip(specs, snap.layout.blocks)):   # same order
            # MAP_NORESERVE, as for anonymous guest RAM: only what the guest writes is
            # ever private memory, so the mapping must not be charged in full up front.
            try:
                m = mmap.mmap(fd, block.size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=block.pages_offset)
            except OSError as err:
                raise SnapshotError(f"cannot map {block.size >> 20} MiB of the snapshot for "
                                    f"a lazy restore: {err.strerror}") from None
            region = Region(spec, mapping=m)
            regions.append(region)
            # A clear bit means zero. Our writer leaves holes there; if a file has data
            # at such a page anyway, zero it in the private mapping.
            for s, e in data_extents(fd, block.pages_offset, block.pages_offset + block.size):
                first, last = (s - block.pages_offset) // PAGE, -(-(e - block.pages_offset) // PAGE)
                absent = ~snap.present_range(i, first, last)
                for a, b in runs_of_mask(absent).tolist():
                    region.array[(first + a) * PAGE:(first + b) * PAGE] = 0
    except BaseException:
        for r in regions:
            r.close()
        raise
    return GuestMemory(regions), 0


def validated(path: str, fd: int | None = None) -> tuple[fmt.Snapshot, MachineState]:
    """Everything restore checks before it allocates guest memory or creates a VM, in
    order: the file (format.read_snapshot), the RAM policy, the vCPU/device state (which
    is returned decoded)."""
    snap = fmt.read_snapshot(path, fd)
    region_specs(snap.layout.blocks)
    return snap, decode_state(snap.state)


def validate(path: str, fd: int | None = None) -> fmt.Snapshot:
    return validated(path, fd)[0]


def load_mapped(path: str, fd: int, lazy: bool, threads: int, progress) -> Loaded:
    """A mapped-ram snapshot validated whole, then its memory read (or mapped: lazy)."""
    snap, saved = validated(path, fd)
    log.debug("%s: valid (version %d): %d vCPU(s), %d pages present", path,
              snap.version, len(saved.vcpus), snap.pages_present)
    memory, loaded = load_memory(snap, fd, lazy, threads, progress)
    return Loaded(saved, memory, loaded, lazy, snap)


def restore(path: str, *, lazy: bool = False, threads: int = 2, stream=None,
            console_capacity: int = 1 << 20, progress=None) -> tuple[Machine, RestoreReport]:
    """A paused-at-start Machine rebuilt from ``path``; call ``start()`` to resume the guest.

    KVM is checked first (a host without it is told so before a byte is read), then the
    whole file is validated, then memory is allocated and the VM created."""
    t = time.perf_counter()
    check_threads(threads)
    lease = None
    kvm = open_kvm()
    try:
        fd = open_snapshot(path)
        try:
            got = reader_for(path, fd).load(lazy, threads, progress)
            memory, saved, loaded, lazy = got.memory, got.saved, got.pages, got.lazy
            if lazy:
                lease = SnapshotLease(path, memory, got.snapshot)
                memory.on_close(lease.close)
        finally:
            os.close(fd)
        try:
            machine = Machine.from_state(saved, memory, kvm=kvm, own_kvm=True,
                                         stream=stream, console_capacity=console_capacity)
        except (StateError, ValueError) as err:
            memory.close()
            raise SnapshotError(f"state cannot be applied: {err}") from None
        except BaseException:
            memory.close()
            raise
    except BaseException:
        kvm.close()
        raise
    if lease is not None:
        lease.attach(machine)
    return machine, RestoreReport(os.path.abspath(path), lazy, loaded, loaded * PAGE,
                                  time.perf_counter() - t)
