"""Reset in place: after any number of resets the guest's memory equals the snapshot byte
for byte, except what the guest wrote since the last reset (two slots, several vCPUs),
and the guest carries on from the snapshot's point each time."""

import numpy as np

from helpers import GiB, PAGE, RAM, guest, wait_console
from migrate.precopy import live_save
from migrate.reader import restore
from migrate.reset import ResetPoint


def test_resets_put_memory_and_state_back_to_the_snapshot(machine_factory, tmp_path):
    low_pages, pages = 1000, 2000
    base = 3 * GiB - low_pages * PAGE
    src = machine_factory(guest("stamp"), memory=RAM, vcpus=4,
                          cmdline=f"pages={pages} base={base}")
    src.start()
    wait_console(src, "stamp: 4 cpus writing")
    path = tmp_path / "stamp.snap"
    live_save(src, str(path), then="stop")
    src.close()

    m, _ = restore(str(path))
    try:
        point = ResetPoint(m, str(path))
        snap = {r.slot: r.pages().copy() for r in m.memory.regions}
        watch = m.dirty.open("test")          # what the guest writes after each reset
        m.start()
        for round_ in range(5):
            written = {r.slot: set() for r in m.memory.regions}
            while sum(map(len, written.values())) < 50:    # the guest writes for a while
                assert not m.wait_done(0.01), m.serial.text()[-2000:]
                for slot, idx in watch.take().items():
                    written[slot] |= set(idx.tolist())
            m.pause_all()
            for slot, idx in watch.take().items():
                written[slot] |= set(idx.tolist())
            for r in m.memory.regions:    # it differs from the snapshot only where it wrote
                differs = np.flatnonzero((r.pages() != snap[r.slot]).any(axis=1))
                assert set(differs.tolist()) <= written[r.slot], (round_, r.slot)
            assert point.reset() >= 50     # pauses nest: the guest stays paused after it
            watch.take()                   # (the reset's own copy-back)
            for r in m.memory.regions:     # byte for byte the snapshot again
                assert np.array_equal(r.pages(), snap[r.slot]), (round_, r.slot)
            m.resume_all()
        assert point.resets == 5 and point.last_pages > 0
        point.close()
    finally:
        m.close()


def test_clones_of_one_snapshot_run_independently_and_leave_it_unchanged(
        kvm_available, tmp_path, monkeypatch):
    """Clones: many lazy MAP_PRIVATE restores of one file at once; each guest's writes
    are its own, and the snapshot is not touched."""
    import hashlib

    from kvmguest.front.testing.fixtures import GuestSpec, snapshot_for
    monkeypatch.setenv("KVMGUEST_CACHE", str(tmp_path))
    path = snapshot_for(GuestSpec(str(guest("fixture")), "pages=64"))
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    clones = []
    try:
        for i in range(8):
            m, _ = restore(path, lazy=True)
            clones.append(m)
            m.start()
            m.console.send(f"write {i + 1}\ncheck\n".encode())
        for i, m in enumerate(clones):
            assert m.serial.wait_for(f"dirty: {i + 1} pages changed, 1 commands", 30), \
                m.serial.text()
    finally:
        for m in clones:
            m.close()
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
