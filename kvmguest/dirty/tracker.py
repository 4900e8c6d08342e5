"""Dirty tracking with clients: one KVM backend (the bitmap log or the dirty ring) and
the VMM's own writes, shared by every consumer through its own client.

Each consumer (a live save, a checkpoint chain, a benchmark, a test) opens a
:class:`DirtyClient`, which accumulates the pages written since it opened or last took
them. A harvest reads the backend once and hands the pages to every open client, so one
consumer's harvest never erases what another has not taken yet. Logging runs while at
least one client is open. Accumulated pages are kept as arrays of page indices, merged
when taken: the cost follows the pages dirtied, not the size of RAM.
"""

from __future__ import annotations

import threading

from ..errors import KvmguestError
from ..lazy import lazy_numpy
from ..memory import GuestMemory

np = lazy_numpy()


def merge_pages(*arrays: np.ndarray) -> np.ndarray:
    """Sorted union of page-index arrays. (np.union1d costs ~20 ms on its first call, a
    lazy import inside numpy, which must not land in a guest's downtime.)"""
    arrays = [a for a in arrays if len(a)]
    if not arrays:
        return np.zeros(0, dtype=np.int64)
    both = np.sort(np.concatenate(arrays).astype(np.int64, copy=False))
    if len(both) < 2:
        return both
    return both[np.concatenate(([True], both[1:] != both[:-1]))]


class DirtyClient:
    def __init__(self, tracker: "DirtyTracker", name: str):
        self.tracker, self.name = tracker, name
        self._parts: dict[int, list[np.ndarray]] = {r.slot: [] for r in tracker.memory.saved_regions}
        self.closed = False

    def add(self, pages: dict[int, np.ndarray]) -> None:
        for slot, p in pages.items():
            if len(p):
                self._parts[slot].append(p)

    def take(self, protect: bool = True) -> dict[int, np.ndarray]:
        """Pages written (by the guest or the VMM) since this client opened or last took
        them, per slot, sorted. ``protect`` False, for a last take with the guest paused
        (a save's downtime): KVM's bits are read but not cleared, which saves
        write-protecting those pages again; a later harvest reports them once more, so
        another client gets a superset, never less."""
        self.tracker.harvest(protect)
        with self.tracker.lock:
            parts, self._parts = self._parts, {slot: [] for slot in self._parts}
        return {slot: merge_pages(*p) for slot, p in parts.items()}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.tracker.release(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DirtyTracker:
    """``backend``: a BitmapLog or a RingLog (``name``, ``start``, ``stop``, ``harvest``,
    ``take_overflow``)."""

    def __init__(self, backend, memory: GuestMemory):
        self.backend, self.memory = backend, memory
        self.lock = threading.RLock()
        self.clients: list[DirtyClient] = []
        self.harvests = 0

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def enabled(self) -> bool:
        return bool(self.clients)

    def open(self, name: str = "") -> DirtyClient:
        """A new client: it will see every page written from now on."""
        with self.lock:
            if not self.clients:
                if self.memory.split_slots:
                    raise KvmguestError("a gdb write watchpoint holds guest pages read-only: "
                                        "delete it (or detach gdb) before saving or "
                                        "checkpointing")
                self.backend.start()
            # What was written before this point belongs to the clients already open
            # (and, when logging just started, is the INITIALLY_SET baseline: dropped).
            self.harvest()
            client = DirtyClient(self, name)
            self.clients.append(client)
            return client

    def release(self, client: DirtyClient) -> None:
        with self.lock:
            if client in self.clients:
                self.clients.remove(client)
            if not self.clients:
                self.backend.stop()

    def note_written(self, pages: dict[int, np.ndarray], exclude: DirtyClient | None = None
                     ) -> None:
        """Pages the VMM rewrote in bulk (a reset): every client but ``exclude`` gets them,
        at a cost that follows the pages, not the size of RAM."""
        with self.lock:
            for c in self.clients:
                if c is not exclude:
                    c.add(pages)

    def harvest(self, protect: bool = True) -> None:
        """Read the backend and the VMM's writes once; give the pages to every client."""
        with self.lock:
            pages = self.backend.harvest(protect)
            if self.backend.take_overflow():
                # The ring lost entries: every page may be dirty. Correct, not cheap.
                pages = {r.slot: np.arange(r.npages, dtype=np.int64)
                         for r in self.memory.saved_regions}
            for r in self.memory.saved_regions:     # device memory: the VMM's writes only
                if r.host_marks:
                    pages[r.slot] = merge_pages(pages.get(r.slot, np.zeros(0, np.int64)),
                                                self.memory.take_host_dirty_pages(r))
            self.harvests += 1
            for c in self.clients:
                c.add(pages)

    def on_ring_full(self, vcpu_index: int) -> None:
        """KVM_EXIT_DIRTY_RING_FULL on that vCPU (in its own thread): the ring backend
        empties its ring into what the next harvest returns (a bitmap never fills)."""
        self.backend.on_full(vcpu_index)

    def close(self) -> None:
        with self.lock:
            self.clients.clear()
            self.backend.stop()
            self.backend.close()
