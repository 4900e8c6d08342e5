"""Dirty tracking reports exactly the pages written, guest and VMM, across two slots, with
either backend (the bitmap log, the dirty ring); clients never erase each other's pages;
a full ring loses nothing."""

import numpy as np
import pytest

from helpers import guest, wait_console
from kvmguest.memory import PAGE_SIZE

GiB = 1 << 30
BACKENDS = ["bitmap", "ring"]


def _runtime_pages(m):
    """Pages the runtime itself writes: boot structures below 1 MiB and the image."""
    start, end = 0, m.kernel.end
    return set(range(start // PAGE_SIZE, -(-end // PAGE_SIZE)))


def _check_exact(m, dirty, base, ws_high, overflowed=False):
    """Every page the guest wrote is reported; nothing else is, unless a ring overflowed
    (then all of RAM is reported once, by design)."""
    slot0, slot1 = m.memory.regions
    want0 = set(range(base // PAGE_SIZE, slot0.npages))
    got0 = set(dirty[0].tolist())
    assert want0 <= got0 and set(range(0, ws_high)) <= set(dirty[1].tolist())
    if overflowed:
        return
    assert got0 - want0 <= _runtime_pages(m), sorted(got0 - want0 - _runtime_pages(m))[:10]
    assert set(dirty[1].tolist()) == set(range(0, ws_high))


@pytest.mark.parametrize("backend", BACKENDS)
def test_guest_writes_on_two_slots_are_reported_exactly(machine_factory, backend):
    ws_pages = 300
    base = 3 * GiB - 100 * PAGE_SIZE            # 100 pages in slot 0, 200 in slot 1
    m = machine_factory(guest("dirty"), memory=3 * GiB + 64 * (1 << 20),
                        cmdline=f"pages={ws_pages} base={base} passes=2", dirty_log=backend)
    assert m.dirty.name == backend
    client = m.dirty.open("test")
    result = m.run(timeout=60)
    assert result.exit_code == 0, result.console
    _check_exact(m, client.take(), base, 200)
    # A second take with the guest stopped is empty.
    assert all(len(v) == 0 for v in client.take().values())


def test_a_full_ring_loses_no_page(machine_factory):
    """A ring of 512 entries for a guest writing 900 pages a pass: the vCPU exits with
    KVM_EXIT_DIRTY_RING_FULL again and again; its thread empties the ring each time. Where
    KVM wrote past the soft limit before the exit (kvm_pvm does), the overflow is seen and
    all of RAM is reported dirty once: still no page lost."""
    base = 3 * GiB - 100 * PAGE_SIZE
    m = machine_factory(guest("dirty"), memory=3 * GiB + 64 * (1 << 20),
                        cmdline=f"pages=900 base={base} passes=3", dirty_log="ring",
                        ring_entries=512)
    assert m.dirty.backend.entries == 512
    client = m.dirty.open("test")
    result = m.run(timeout=120)
    assert result.exit_code == 0, result.console
    assert m.dirty.backend.full_exits >= 2
    dirty = client.take()
    _check_exact(m, dirty, base, 800, overflowed=m.dirty.backend.overflows > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_clients_both_see_every_page(machine_factory, backend):
    """One consumer's harvest never erases another's pages: a takes often, b once."""
    base = 3 * GiB - 100 * PAGE_SIZE
    m = machine_factory(guest("dirty"), memory=3 * GiB + 64 * (1 << 20),
                        cmdline=f"pages=300 base={base} passes=40 quiet", dirty_log=backend)
    a, b = m.dirty.open("a"), m.dirty.open("b")
    m.start()
    seen_by_a = {0: set(), 1: set()}
    while not m.wait_done(0.005):
        for slot, pages in a.take().items():
            seen_by_a[slot] |= set(pages.tolist())
    assert m.wait(10).exit_code == 0
    for slot, pages in a.take().items():
        seen_by_a[slot] |= set(pages.tolist())
    seen_by_b = b.take()
    assert m.dirty.harvests > 10
    _check_exact(m, {s: np.array(sorted(p)) for s, p in seen_by_a.items()}, base, 200)
    _check_exact(m, seen_by_b, base, 200)
    a.close()
    assert m.dirty.enabled           # b is still open: logging goes on
    b.close()
    assert not m.dirty.enabled


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmm_writes_are_reported(machine_factory, backend):
    m = machine_factory(guest("hello"), memory=3 * GiB + 64 * (1 << 20), dirty_log=backend)
    client = m.dirty.open()
    m.memory.write(0x2000_0000, b"\x01" * 10)                  # slot 0, page 0x20000
    m.memory.write(4 * GiB + 5 * PAGE_SIZE - 2, b"\x02" * 4)   # slot 1, straddles 4 and 5
    m.memory.zero(4 * GiB + 64 * PAGE_SIZE, 3 * PAGE_SIZE)     # slot 1, pages 64..66
    dirty = client.take()
    assert dirty[0].tolist() == [0x20000]
    assert dirty[1].tolist() == [4, 5, 64, 65, 66]


def test_dirty_logging_can_be_switched_on_while_running(machine_factory):
    m = machine_factory(guest("dirty"), cmdline="pages=64 passes=0 quiet")
    m.start()
    wait_console(m, "dirty: pass 16 ok")
    client = m.dirty.open()
    wait_console(m, "dirty: pass 32 ok")      # the guest rewrote its pages since
    dirty = client.take()
    assert len(dirty[0]) >= 64           # the guest rewrites its 64 pages continuously
    client.close()
    m.stop()
    assert not m.dirty.enabled
    assert np.all(np.diff(dirty[0]) > 0)


def test_auto_picks_the_bitmap_for_small_guests_and_an_unknown_backend_is_refused(
        machine_factory):
    from kvmguest.errors import UsageError
    assert machine_factory(guest("hello")).dirty.name == "bitmap"
    with pytest.raises(UsageError, match="--dirty-log must be one of"):
        machine_factory(guest("hello"), dirty_log="magic")
