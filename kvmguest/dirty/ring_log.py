"""The ring backend: KVM's dirty ring, one per vCPU, read from where the last read ended.

KVM appends an entry (slot, page offset) to the ring of the vCPU that wrote a page, so a
harvest costs what was dirtied, not the size of RAM. Protocol (linux/kvm.h, the kernel's
api.rst "KVM_CAP_DIRTY_LOG_RING"): the capability is enabled, with the ring's size in
bytes, before any vCPU exists; each ring is mmapped from its vCPU fd at page
``KVM_DIRTY_LOG_PAGE_OFFSET``; an entry is ours once its flags say DIRTY (read the flags
first, then slot and offset: KVM publishes an entry with a release store, and with
``_ACQ_REL`` that is the order KVM guarantees), we mark it RESET, and
``KVM_RESET_DIRTY_RINGS`` re-protects the pages of every reset entry — repeated until it
reports none left. A vCPU whose ring is nearly full exits with
``KVM_EXIT_DIRTY_RING_FULL``; its thread harvests that ring (keeping the pages for the
next harvest) and resets it before it runs again, so no page is lost.
"""

from __future__ import annotations

import functools
import mmap
import threading

from .. import abi
from ..abi import PAGE_SIZE, Cap
from ..lazy import lazy_numpy
from ..memory import GuestMemory, close_mapping
from .bitmap_log import SlotLogging

np = lazy_numpy()

NAME = "ring"
ENTRY_SIZE = 16              # struct kvm_dirty_gfn: flags u32, slot u32, offset u64


@functools.cache
def entry_dtype():
    return np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])


def ring_cap(vm) -> tuple[int, int]:
    """(the capability to enable, the largest ring in bytes); (0, 0) without a ring."""
    for cap in (Cap.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, Cap.KVM_CAP_DIRTY_LOG_RING):
        size = vm.check_extension(cap)
        if size > 0:
            return cap, size
    return 0, 0


def ring_bytes(max_bytes: int, ram_pages: int, vcpus: int, entries: int | None = None) -> int:
    """Ring size: room for every page of RAM spread over the vCPUs (a harvest then never
    waits for a ring-full exit), a power of two between one page and KVM's limit; or
    ``entries`` (tests force ring-full exits with a small ring)."""
    if entries is not None:
        want = entries * ENTRY_SIZE
    else:
        want = 1 << max(0, (-(-ram_pages // max(1, vcpus)) * ENTRY_SIZE - 1).bit_length())
    return max(PAGE_SIZE, min(max_bytes, want))


def enable(vm, cap: int, size: int) -> None:
    """Before any vCPU exists."""
    vm.enable_cap(cap, size)


class RingLog(SlotLogging):
    name = NAME

    def __init__(self, vm, memory: GuestMemory, vcpus, size: int):
        self.vm, self.memory = vm, memory
        self.entries = size // ENTRY_SIZE
        self.enabled = False
        self._lock = threading.Lock()
        self._maps, self._rings = [], []
        for v in vcpus:
            m = mmap.mmap(v.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                          offset=abi.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
            self._maps.append(m)
            self._rings.append(np.frombuffer(m, dtype=entry_dtype()))
        self._fetch = [0] * len(self._rings)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []   # (slots, offsets)
        self._slots = {r.slot for r in memory.regions}
        self.full_exits = 0
        self.overflowed = False          # entries may have been lost (see _collect)
        self.overflows = 0

    def _collect(self, i: int) -> int:
        """Take every published entry of ring ``i`` into the pending list and mark it
        reset (the caller holds the lock and then resets the rings); how many.

        A ring that KVM filled completely, or whose next entry is not published while
        later ones are, has overflowed: KVM wrote past the soft limit before the vCPU
        exited (measured under kvm_pvm, where ring-full exits arrive late) and entries
        were overwritten. Then every entry up to KVM's position is reset (so KVM's reset
        index can move on) and :attr:`overflowed` tells the tracker that pages may be
        missing: it reports all of RAM dirty once, which loses nothing."""
        ring, n = self._rings[i], self.entries
        start = self._fetch[i] % n
        dirty = np.roll((ring["flags"] & abi.KVM_DIRTY_GFN_F_DIRTY) != 0, -start)
        if not dirty.any():
            return 0
        if dirty.all() or not dirty[0]:
            self.overflowed = True
            end = n - int(np.argmax(dirty[::-1]))   # through the last published entry
        else:
            end = int(np.argmin(dirty))             # up to the first unpublished entry
        idx = (start + np.arange(end)) % n
        take = idx[dirty[:end]]
        self._pending.append((ring["slot"][take].copy(), ring["offset"][take].copy()))
        ring["flags"][idx] = abi.KVM_DIRTY_GFN_F_RESET
        self._fetch[i] += end
        return len(take)

    def take_overflow(self) -> bool:
        """Whether a ring overflowed since the last call (the caller holds the lock)."""
        was, self.overflowed = self.overflowed, False
        self.overflows += was
        return was

    def _reset(self) -> None:
        while self.vm.reset_dirty_rings() > 0:
            pass

    def on_full(self, index: int) -> None:
        """KVM_EXIT_DIRTY_RING_FULL on vCPU ``index`` (its own thread): empty its ring."""
        with self._lock:
            self.full_exits += 1
            self._collect(index)
            self._reset()

    def harvest(self, protect: bool = True) -> dict[int, np.ndarray]:
        """Guest-written page indices per slot since the last harvest (sorted, unique).
        The rings are always reset (``protect`` is the bitmap's option)."""
        with self._lock:
            for i in range(len(self._rings)):
                self._collect(i)
            self._reset()
            pending, self._pending = self._pending, []
        out = {}
        if pending:
            slots = np.concatenate([s for s, _ in pending])
            offsets = np.concatenate([o for _, o in pending])
        else:
            slots = offsets = np.zeros(0, dtype=np.uint64)
        for slot in self._slots:
            out[slot] = np.unique(offsets[slots == slot]).astype(np.int64)
        return out

    def close(self) -> None:
        self._rings = []
        for m in self._maps:
            close_mapping(m)
        self._maps = []
