"""Our mapped-ram snapshot (docs/FORMAT.md; its layout, packing and validation are
migrate/format.py): loaded eagerly (preadv of the present pages, several threads) or
lazily (the page areas mapped MAP_PRIVATE), described, and exported block by block."""

from __future__ import annotations

import logging
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvmguest.memory import MAP_NORESERVE
from kvmguest.memory import PAGE_SIZE as PAGE
from kvmguest.memory import GuestMemory, Region
from kvmguest.state import MachineState, vcpu_summary

from migrate import format as fmt
from migrate.format import SnapshotError
from migrate.formats.base import (MAPPED, Loaded, SnapshotReader, Source, check_host_capacity,
                                  decode_state, region_specs)
from migrate.pageio import (MAX_IO, cached_fraction, data_extents, direct_fd, fault_point,
                            pread_into, runs_of_mask, split_runs)

log = logging.getLogger(__name__)


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


def describe_mapped(info: dict, path: str, fd: int) -> None:
    snap = validate(path, fd)
    info.update(valid=True, format="mapped-ram", version=snap.version, ram_size=snap.ram_size,
                pages_present=snap.pages_present,
                blocks=[{"name": b.name, "slot": b.slot, "gpa": b.gpa, "size": b.size,
                         "pages": b.npages, "pages_present": b.pages_present,
                         "pages_offset": b.pages_offset, "bitmap_offset": b.bitmap_offset}
                        for b in snap.layout.blocks],
                state=vcpu_summary(snap.state), state_length=snap.state_length,
                vcpus=len(snap.state["vcpus"]), irqchip="irqchip" in snap.state.get("vm", {}))


def mapped_sources(path: str, fd: int) -> tuple[str, list[Source]]:
    snap, _ = validated(path, fd)

    def runs(block, present):
        for s, e in runs_of_mask(present).tolist():
            yield s, block.pages_offset + s * block.page_size, e - s
    return "kvmguest snapshot", [
        Source(b.name, b.size, b.page_size, int(np.count_nonzero(p)),
               lambda b=b, p=p: runs(b, p)) for b, p in zip(snap.layout.blocks, snap.present)]


class MappedReader(SnapshotReader):
    kind, what = MAPPED, "a kvmguest snapshot"

    def load(self, lazy, threads, progress) -> Loaded:
        return load_mapped(self.path, self.fd, lazy, threads, progress)

    def describe(self, info):
        describe_mapped(info, self.path, self.fd)

    def export_sources(self):
        return mapped_sources(self.path, self.fd)
