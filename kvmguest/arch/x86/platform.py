"""The VM and what is VM-wide on an x86 PC (Firecracker's ArchVm is the model): the KVM
capabilities a machine needs, the dirty log's mode, the TSS, memory slots then the
in-kernel irqchip and PIT (in that order: with an irqchip in place each slot change
waited ~6 ms here, measured on kvm_pvm, for KVM's SRCU readers), ISA interrupt lines, and
the VM-wide state (clock, irqchip, PIT) a snapshot carries."""

from __future__ import annotations

import struct
import threading

from ... import abi
from ...abi import Cap
from ...dirty import BitmapLog, DirtyTracker, RingLog, ring_log
from ...errors import UsageError
from ...kvm import Kvm, KvmUnavailable
from ...state import VmState, apply_calls
from . import acpi, layout, regs

REQUIRED_CAPS = (Cap.KVM_CAP_USER_MEMORY, Cap.KVM_CAP_IMMEDIATE_EXIT, Cap.KVM_CAP_NR_MEMSLOTS)
IRQCHIP_CAPS = (Cap.KVM_CAP_IRQCHIP, Cap.KVM_CAP_PIT2)
DIRTY_LOGS = ("auto", "bitmap", "ring")
# "auto" picks the dirty ring from this much RAM up. A bitmap harvest grows with RAM, a
# ring harvest with pages dirtied: `python -m bench --only dirty` measured a client's
# take() at 0.36/0.41/0.46/1.10 ms (bitmap) against 0.85/1.10/1.01/0.80 ms (ring) at
# 1/4/16/64 GiB, 2000 pages dirtied (2026-11-26, kvm_pvm): the lines cross between 16
# and 64 GiB.
DIRTY_RING_FROM = 32 << 30
# Slot ids for the pieces of a RAM region split around read-only (watched) pages; the
# region's own slot keeps its first piece.
PIECE_SLOTS = 0x1000
# Read-only pages at once (a gdb's write watchpoints): each costs up to two memory slots.
MAX_PROTECTED_PAGES = 64


def open_kvm() -> Kvm:
    """``/dev/kvm``, checked for every capability a Machine needs (KvmUnavailable if not)."""
    kvm = Kvm()
    try:
        kvm.require(*REQUIRED_CAPS)
    except BaseException:
        kvm.close()
        raise
    return kvm


def max_vcpus(kvm: Kvm) -> int:
    return kvm.check_extension(Cap.KVM_CAP_MAX_VCPUS) or kvm.check_extension(
        Cap.KVM_CAP_NR_VCPUS) or 1


def check_options(vcpus, irqchip: bool, dirty_log: str) -> None:
    """What the machine's options must be, before anything is created."""
    if dirty_log not in DIRTY_LOGS:
        raise UsageError(f"--dirty-log must be one of {', '.join(DIRTY_LOGS)}, "
                         f"not {dirty_log!r}")
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or vcpus < 1:
        raise UsageError(f"--vcpus must be a whole number >= 1, not {vcpus!r}")
    if vcpus > 1 and not irqchip:
        raise UsageError("more than one vCPU needs the in-kernel irqchip (drop "
                         "--no-irqchip)")


class Platform:
    """A new VM on ``kvm`` for ``vcpus`` vCPUs and ``ram`` bytes: capabilities checked,
    the dirty log's mode chosen (``ring_size``: bytes per vCPU ring, 0 for the bitmap),
    the TSS placed. :meth:`add_memory` then makes the slots and the irqchip and PIT."""

    def __init__(self, kvm: Kvm, vcpus: int, ram: int, irqchip: bool = True,
                 pit: bool = True, dirty_log: str = "auto", ring_entries: int | None = None):
        self.kvm, self.irqchip, self.pit = kvm, irqchip, irqchip and pit
        kvm.require(*REQUIRED_CAPS)
        limit = max_vcpus(kvm)
        if vcpus > limit:
            raise UsageError(f"{vcpus} vCPUs: this host's KVM allows at most {limit}")
        if irqchip:
            try:
                kvm.require(*IRQCHIP_CAPS)
            except KvmUnavailable as err:
                raise KvmUnavailable(f"{err} (run with --no-irqchip)") from None
        self.vm = kvm.create_vm()
        self.protected: frozenset[int] = frozenset()    # read-only RAM pages (protect_pages)
        self._pieces: dict[int, list] = {}               # region slot -> its pieces when split
        self._free_slots: list[int] = []                 # piece slot ids to use again
        self._slots_used = 0
        try:
            self._dirty_log(vcpus, ram, dirty_log, ring_entries)
            if kvm.check_extension(Cap.KVM_CAP_SET_TSS_ADDR) > 0:
                self.vm.set_tss_addr(layout.TSS_ADDR)
        except BaseException:
            self.close()
            raise

    def _dirty_log(self, vcpus: int, ram: int, dirty_log: str, ring_entries) -> None:
        protect = self.vm.check_extension(Cap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        self.manual_protect = protect > 0
        if self.manual_protect:
            self.vm.enable_cap(Cap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                               protect & (abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                                          | abi.KVM_DIRTY_LOG_INITIALLY_SET))
        ring_cap, ring_max = ring_log.ring_cap(self.vm)
        if dirty_log == "ring" and not ring_cap:
            raise KvmUnavailable("--dirty-log ring: this host's KVM has no dirty ring "
                                 "(KVM_CAP_DIRTY_LOG_RING)")
        self.ring_size = 0
        if dirty_log == "ring" or (dirty_log == "auto" and ring_cap and ram >= DIRTY_RING_FROM):
            # Before any vCPU exists.
            self.ring_size = ring_log.ring_bytes(ring_max, ram // abi.PAGE_SIZE, vcpus,
                                                 ring_entries)
            ring_log.enable(self.vm, ring_cap, self.ring_size)

    def add_memory(self, memory) -> None:
        """``memory``'s slots, then (before any vCPU exists, so that each gets its
        in-kernel LAPIC) the irqchip and the PIT."""
        for r in memory.regions:
            self.vm.set_user_memory_region(r.slot, r.gpa, r.size, r.host_addr)
        if self.irqchip:
            self.vm.create_irqchip()
            if self.pit:
                self.vm.create_pit2(abi.KVM_PIT_SPEAKER_DUMMY)

    def protect_pages(self, memory, pages) -> None:
        """Make the RAM pages at guest-physical ``pages`` (page-aligned, at most
        MAX_PROTECTED_PAGES) read-only to the guest and every other page writable again
        (call with the vCPUs parked). A guest write to a read-only page becomes an MMIO
        exit carrying the data, at any CPL. Each page protected or released changes at
        most four memory slots (the piece around it split or merged), whatever else is
        protected. Refused while dirty logging runs (its bitmaps are per slot)."""
        pages = frozenset(pages)
        if pages == self.protected:
            return
        if len(pages) > MAX_PROTECTED_PAGES:
            raise UsageError(f"{len(pages)} read-only pages: at most {MAX_PROTECTED_PAGES}")
        if pages and not self.kvm.check_extension(Cap.KVM_CAP_READONLY_MEM):
            raise UsageError("this host's KVM has no read-only memory slots "
                             "(KVM_CAP_READONLY_MEM)")
        for page in sorted(self.protected - pages):
            self._release_page(memory.region_at(page, abi.PAGE_SIZE), page)
            self.protected = self.protected - {page}
        for page in sorted(pages - self.protected):
            self._protect_page(memory.region_at(page, abi.PAGE_SIZE), page)
            self.protected = self.protected | {page}
        memory.split_slots = bool(pages)

    def _region_pieces(self, r) -> list[list]:
        """The pieces ``r`` is mapped as: [gpa, size, read-only, slot], by address."""
        return self._pieces.setdefault(r.slot, [[r.gpa, r.size, False, r.slot]])

    def _place(self, r, piece) -> None:
        gpa, size, readonly, slot = piece
        self.vm.set_user_memory_region(slot, gpa, size, r.host_addr + gpa - r.gpa,
                                       abi.MemFlag.KVM_MEM_READONLY if readonly else 0)

    def _unplace(self, r, piece) -> None:
        self.vm.set_user_memory_region(piece[3], piece[0], 0, r.host_addr + piece[0] - r.gpa)

    def _slot_id(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        slot = PIECE_SLOTS + self._slots_used
        if slot >= self.kvm.check_extension(Cap.KVM_CAP_NR_MEMSLOTS):
            raise UsageError("this host's KVM has no memory slot left for another "
                             "read-only page")
        self._slots_used += 1
        return slot

    def _protect_page(self, r, page: int) -> None:
        """Split the writable piece holding ``page`` around it (1 slot out, up to 3 in)."""
        pieces = self._region_pieces(r)
        i = next(i for i, p in enumerate(pieces) if p[0] <= page < p[0] + p[1])
        old = pieces[i]
        new = [[old[0], page - old[0], False, None],
               [page, abi.PAGE_SIZE, True, None],
               [page + abi.PAGE_SIZE, old[0] + old[1] - page - abi.PAGE_SIZE, False, None]]
        new = [p for p in new if p[1]]
        self._unplace(r, old)
        for n, p in enumerate(new):
            p[3] = old[3] if n == 0 else self._slot_id()
            self._place(r, p)
        pieces[i:i + 1] = new

    def _release_page(self, r, page: int) -> None:
        """Merge the read-only piece at ``page`` with its writable neighbours (up to 3
        slots out, 1 in); a region whole again gets its own slot back."""
        pieces = self._region_pieces(r)
        i = next(i for i, p in enumerate(pieces) if p[0] == page)
        lo = i - 1 if i > 0 and not pieces[i - 1][2] else i
        hi = i + 1 if i + 1 < len(pieces) and not pieces[i + 1][2] else i
        merged = [pieces[lo][0], pieces[hi][0] + pieces[hi][1] - pieces[lo][0], False, None]
        for p in pieces[lo:hi + 1]:
            self._unplace(r, p)
        ids = [p[3] for p in pieces[lo:hi + 1]]
        whole = merged[1] == r.size
        keep = r.slot if whole else ids[0]
        merged[3] = keep
        self._free_slots.extend(s for s in ids if s != keep and s != r.slot)
        self._place(r, merged)
        pieces[lo:hi + 1] = [merged]
        if whole:
            del self._pieces[r.slot]

    def is_protected(self, gpa: int) -> bool:
        return gpa & ~(abi.PAGE_SIZE - 1) in self.protected

    def dirty_tracker(self, memory, vcpus) -> DirtyTracker:
        """Dirty tracking of ``memory`` through the log chosen at creation (the ring
        needs the vCPUs: each has its own)."""
        return DirtyTracker(RingLog(self.vm, memory, vcpus, self.ring_size) if self.ring_size
                            else BitmapLog(self.vm, memory, self.manual_protect), memory)

    def irq_line(self, line: int, level: int) -> None:
        """Drive ISA interrupt line ``line`` of the in-kernel PIC/IOAPIC."""
        self.vm.irq_line(line, level)

    def suspend(self, vcpus, memory, thread, wake: threading.Event) -> bool:
        """S3 on ``thread``, the vCPU that asked for it: the others are parked, this one
        waits for ``wake`` (the RTC alarm, if PM1_EN enabled it), then the machine
        restarts as firmware resumes a PC: the boot CPU in real mode at the FACS waking
        vector, the others waiting for INIT/SIPI. False when the vCPU was told to stop
        while it slept."""
        vcpus.park_others(thread)
        wake.clear()
        while not wake.wait(0.05):
            if thread.stopping:
                return False
        waking = acpi.FACS_ADDR + acpi.FACS_WAKING_VECTOR
        vector = struct.unpack("<I", memory.read(waking, 4))[0]
        for t in vcpus:
            if t is thread:
                regs.reset_to_real_mode(t.vcpu, vector)
            else:
                t.vcpu.set_mp_state(abi.kvm_mp_state(abi.KVM_MP_STATE_UNINITIALIZED))
                t.resume()
        return True

    def apply_state(self, calls) -> None:
        """VM-wide state decoded by VmState.decoded (PIT, clock, irqchip), in its order:
        after every vCPU's (its LAPIC takes the interrupts the irqchip still holds)."""
        apply_calls(self.vm, calls)

    def read_state(self) -> tuple:
        """The VM-wide state (clock, irqchip, PIT) of a paused machine, as read
        (VmState.encode encodes it)."""
        return VmState.read(self.vm, self.irqchip, self.pit)

    def close(self) -> None:
        self.vm.close()
