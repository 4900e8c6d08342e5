"""Reset in place: put a running guest back to a snapshot in about the time it takes to
copy the pages it dirtied since.

A :class:`ResetPoint` is made for a machine that was just restored from a mapped-ram
snapshot, before it runs: it opens its own dirty-tracking client, maps the snapshot's
page areas read-only and keeps the decoded vCPU/VM/device state. :meth:`ResetPoint.reset`
then pauses the guest, takes the pages written since the snapshot (or the last reset),
copies each back from its fixed offset in the file (or zeroes it where the snapshot has
a hole), re-applies the whole state and resumes the guest.
"""

from __future__ import annotations

import mmap
import os
import time

import numpy as np

from kvmguest.memory import PAGE_SIZE, close_mapping

from .formats.mapped import paired, validated
from .formats.base import open_snapshot


class ResetPoint:
    def __init__(self, machine, path: str):
        if machine.running:
            raise RuntimeError("make the reset point before the restored guest runs")
        self.machine = machine
        fd = open_snapshot(path)
        try:
            snap, self.state = validated(path, fd)
            self._maps, self.sources = [], {}
            for (region, block), present in zip(paired(machine.memory, snap.layout.blocks),
                                                snap.present):
                m = mmap.mmap(fd, block.size, mmap.MAP_SHARED, mmap.PROT_READ,
                              offset=block.pages_offset)
                self._maps.append(m)
                pages = np.frombuffer(m, dtype=np.uint8).reshape(-1, PAGE_SIZE)
                self.sources[region.slot] = (pages, present)
        finally:
            os.close(fd)
        self.decoded = self.state.decoded(machine, cpuid=False)   # decoded once, not per reset
        self.client = machine.dirty.open("reset point")
        self.resets = 0
        self.last_pages = 0
        self.last_ms = 0.0

    def reset(self, clear_console: bool = False) -> int:
        """Put the guest back to the snapshot; how many pages were copied back or zeroed.
        ``clear_console``: also forget the console output captured so far (while the
        guest is paused, so nothing it prints after the reset is lost)."""
        m = self.machine
        t0 = time.perf_counter()
        m.pause_all()
        try:
            dirty = self.client.take()
            n = 0
            for r in m.memory.saved_regions:
                idx = dirty.get(r.slot)
                if idx is None or not len(idx):
                    continue
                pages, present = self.sources[r.slot]
                have = present[idx]
                dest = r.pages()
                dest[idx[have]] = pages[idx[have]]
                dest[idx[~have]] = 0
                n += len(idx)
            m.dirty.note_written(dirty, exclude=self.client)   # a live save must see them
            self.decoded.apply(m)
            if clear_console:
                m.serial.clear_output()
        finally:
            m.resume_all()
        self.resets += 1
        self.last_pages, self.last_ms = n, (time.perf_counter() - t0) * 1e3
        return n

    def close(self) -> None:
        self.client.close()
        for mp in self._maps:
            close_mapping(mp)
        self._maps = []
