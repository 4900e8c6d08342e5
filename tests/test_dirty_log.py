"""The dirty log reports exactly the pages written, guest and VMM, across two slots."""

import numpy as np

from helpers import guest, wait_console
from kvmguest.memory import PAGE_SIZE

GiB = 1 << 30


def _runtime_pages(m):
    """Pages the runtime itself writes: boot structures below 1 MiB and the image."""
    start, end = 0, m.kernel.end
    return set(range(start // PAGE_SIZE, -(-end // PAGE_SIZE)))


def test_guest_writes_on_two_slots_are_reported_exactly(machine_factory):
    ws_pages = 300
    base = 3 * GiB - 100 * PAGE_SIZE            # 100 pages in slot 0, 200 in slot 1
    m = machine_factory(guest("dirty"), memory=3 * GiB + 64 * (1 << 20),
                        cmdline=f"pages={ws_pages} base={base} passes=2")
    m.dirty.start()
    m.dirty.harvest()                           # baseline (INITIALLY_SET reports all)
    result = m.run(timeout=60)
    assert result.exit_code == 0, result.console
    dirty = m.dirty.harvest()
    slot0, slot1 = m.memory.regions
    want0 = set(range(base // PAGE_SIZE, slot0.npages))
    want1 = set(range(0, 200))
    got0 = set(dirty[0].tolist())
    assert want0 <= got0
    assert got0 - want0 <= _runtime_pages(m), sorted(got0 - want0 - _runtime_pages(m))[:10]
    assert set(dirty[1].tolist()) == want1
    # A second harvest with the guest stopped is empty.
    again = m.dirty.harvest()
    assert all(len(v) == 0 for v in again.values())


def test_vmm_writes_are_reported(machine_factory):
    m = machine_factory(guest("hello"), memory=3 * GiB + 64 * (1 << 20))
    m.dirty.start()
    m.dirty.harvest()
    m.memory.write(0x2000_0000, b"\x01" * 10)                  # slot 0, page 0x20000
    m.memory.write(4 * GiB + 5 * PAGE_SIZE - 2, b"\x02" * 4)   # slot 1, straddles 4 and 5
    m.memory.zero(4 * GiB + 64 * PAGE_SIZE, 3 * PAGE_SIZE)     # slot 1, pages 64..66
    dirty = m.dirty.harvest()
    assert dirty[0].tolist() == [0x20000]
    assert dirty[1].tolist() == [4, 5, 64, 65, 66]


def test_dirty_logging_can_be_switched_on_while_running(machine_factory):
    m = machine_factory(guest("dirty"), cmdline="pages=64 passes=0 quiet")
    m.start()
    wait_console(m, "dirty: pass 16 ok")
    m.dirty.start()
    m.dirty.harvest()
    wait_console(m, "dirty: pass 32 ok")      # the guest rewrote its pages since
    dirty = m.dirty.harvest()
    assert len(dirty[0]) >= 64           # the guest rewrites its 64 pages continuously
    m.dirty.stop()
    m.stop()
    assert not m.dirty.enabled
    assert np.all(np.diff(dirty[0]) > 0)
