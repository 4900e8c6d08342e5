"""Several vCPUs, the in-kernel irqchip, timers and interrupts, and snapshots of all of it."""

import struct
import threading
import time

import numpy as np
import pytest

from helpers import (MARGIN, GiB, MiB, PAGE, RAM, cli, guest, one_line_error, restore_runs_on,
                     wait_console)
from kvmguest import GuestError
from kvmguest import abi
from kvmguest.arch.x86 import layout
from migrate import format as fmt
from migrate.precopy import live_save
from migrate.reader import restore
from migrate.writer import MappedWriter

# Guests saved mid-run (once they report the milestone): held by the "oninput" handshake,
# they run until a byte arrives on their console (never before the save, whatever the
# host's speed), and the restored guest, given one, runs that much more and finishes.
RUNS = {
    "smp": ("pages=256 passes=64 quiet oninput", "smp: pass 32 ok",
            "smp: verified 256 pages on {n} cpus over"),
    "timer": ("ticks=200 quiet oninput", "timer: pit 1",
              "timer: every timer ticked on {n} cpus over"),
    "ipi": ("rounds=512 quiet oninput", "ipi: round 256 ok", "all delivered once"),
}


SHORT = {
    "smp": ("pages=64 passes=5", "smp: verified 64 pages on {n} cpus over 5 passes"),
    "timer": ("ticks=30", "timer: every timer ticked on {n} cpus over"),
    "ipi": ("rounds=20", "all delivered once"),
}


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(SHORT))
def test_guest_runs_on_n_vcpus_even_more_than_host_cores(name, n):
    cmdline, verdict = SHORT[name]
    p = cli("run", guest(name), "--vcpus", n, "--cmdline", cmdline, timeout=MARGIN)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    assert verdict.format(n=n) in p.stdout, p.stdout[-2000:]


@pytest.mark.parametrize("n,lazy", [(1, False), (2, False), (4, False), (4, True)],
                         ids=["1-vcpu", "2-vcpus", "4-vcpus", "4-vcpus-lazy"])
@pytest.mark.parametrize("name", sorted(RUNS))
def test_live_save_mid_run_and_restore_in_a_new_process_carries_on(machine_factory, tmp_path,
                                                                   name, n, lazy):
    """Saved while all vCPUs run (timers ticking, IPIs in flight), restored in a new
    process: every vCPU carries on, and the guest's own checks (no lost or doubled
    interrupt, no stopped timer, every page right) hold to the end."""
    cmdline, milestone, verdict = RUNS[name]
    path = tmp_path / "g.snap"
    m = machine_factory(guest(name), vcpus=n, cmdline=cmdline)
    m.start()
    wait_console(m, milestone)
    live_save(m, str(path), then="stop")
    state = fmt.read_snapshot(str(path)).state
    assert len(state["vcpus"]) == n and "irqchip" in state["vm"] and "pit2" in state["vm"]
    assert all("lapic" in v for v in state["vcpus"])
    r = cli("restore", path, "--console-input", *(["--lazy"] if lazy else []),
            input="go\n", timeout=MARGIN)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "go after" in r.stdout and verdict.format(n=n) in r.stdout, r.stdout[-2000:]


def test_a_stream_snapshot_carries_two_vcpus_too(machine_factory, tmp_path):
    m = machine_factory(guest("smp"), vcpus=2, cmdline="pages=128 passes=64 quiet oninput")
    m.start()
    wait_console(m, "smp: pass 32 ok")
    path = tmp_path / "g.stream"
    live_save(m, str(path), format="stream", then="stop")
    r = cli("restore", path, "--console-input", input="go\n", timeout=MARGIN)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "go after" in r.stdout and "smp: verified 128 pages on 2 cpus over" in r.stdout


def test_aps_wait_for_init_sipi_and_cpuid_describes_the_topology(machine_factory):
    m = machine_factory(guest("smp"), vcpus=4)
    for i, t in enumerate(m.vcpus):
        v, cpuid = t.vcpu, t.cpuid
        want = abi.KVM_MP_STATE_RUNNABLE if i == 0 else abi.KVM_MP_STATE_UNINITIALIZED
        assert v.get_mp_state().mp_state == want
        entries = {(e.function, e.index): e for e in cpuid.entries[:cpuid.hdr.nent]}
        leaf1 = entries[(1, 0)]
        assert leaf1.ebx >> 24 == i and (leaf1.ebx >> 16) & 0xFF == 4
        assert leaf1.ecx & (1 << 21)                         # x2APIC
        if (0xB, 1) in entries:
            assert entries[(0xB, 0)].edx == i and entries[(0xB, 1)].ebx == 4


def test_acpi_tables_describe_every_cpu_and_the_ioapic(machine_factory):
    m = machine_factory(guest("hello"), vcpus=3)
    rsdp = m.memory.read(layout.ACPI_RSDP, 36)
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt = m.memory.read(xsdt_addr, struct.unpack("<I", m.memory.read(xsdt_addr + 4, 4))[0])
    assert sum(xsdt) % 256 == 0
    tables = {}
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        length = struct.unpack("<I", m.memory.read(addr + 4, 4))[0]
        t = m.memory.read(addr, length)
        assert sum(t) % 256 == 0
        tables[t[:4]] = t
    assert set(tables) == {b"APIC", b"FACP"}
    madt, entries, off = tables[b"APIC"], [], 44
    while off < len(madt):
        entries.append((madt[off], madt[off:off + madt[off + 1]]))
        off += madt[off + 1]
    lapics = [e for kind, e in entries if kind == 0]
    assert [(e[2], e[3], e[4] & 1) for e in lapics] == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]
    assert [struct.unpack_from("<I", e, 4)[0] for k, e in entries if k == 1] == \
        [layout.IOAPIC_BASE]
    # The memory map keeps the tables out of RAM, and hvm_start_info points at the RSDP.
    assert struct.unpack_from("<Q", m.memory.read(layout.START_INFO, 56), 32)[0] == \
        layout.ACPI_RSDP


def test_halted_vcpus_pause_within_the_bound_and_are_saved_halted(machine_factory, tmp_path):
    m = machine_factory(guest("ipi"), vcpus=4, cmdline="rounds=0 quiet")
    m.start()
    wait_console(m, "ipi: 4 cpus")
    for _ in range(5):
        t = time.monotonic()
        m.pause_all()
        assert time.monotonic() - t < 0.5 and m.paused
        m.resume_all()
    path = tmp_path / "h.snap"
    live_save(m, str(path), then="stop")
    states = [abi.kvm_mp_state.from_buffer_copy(bytes.fromhex(v["mp_state"])).mp_state
              for v in fmt.read_snapshot(str(path)).state["vcpus"]]
    assert abi.KVM_MP_STATE_HALTED in states[1:], states       # an AP halted in KVM


class Blocking:
    """A port device whose writes block until released: a vCPU stuck in the VMM."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, offset, size, value):
        self.entered.set()
        self.release.wait(30)

    def read(self, offset, size):
        return 0


def test_a_vcpu_that_cannot_pause_rolls_the_pause_back_and_the_guest_runs_on(
        machine_factory):
    m = machine_factory(guest("ioloop"), cmdline="iters=2000")
    dev = Blocking()
    m.devices.bus.register(0x80, 1, dev)
    m.start()
    assert dev.entered.wait(10)
    with pytest.raises(GuestError, match="did not pause within 0.3 s; the guest runs on"):
        m.pause_all(timeout=0.3)
    assert not m.paused
    dev.release.set()
    assert m.wait(timeout=60).exit_code == 0                    # never left parked


def test_echo_answers_interrupt_driven_input_before_and_after_a_restore(machine_factory,
                                                                        tmp_path):
    m = machine_factory(guest("echo"))
    m.start()
    wait_console(m, "echo: ready")
    m.console.send(b"first line\n")
    wait_console(m, "echo: first line")
    path = tmp_path / "echo.snap"
    live_save(m, str(path), then="stop")
    r, _ = restore(str(path))
    try:
        r.start()
        r.console.send(b"after restore\nquit\n")
        result = r.wait(timeout=30)
    finally:
        r.close()
    assert result.exit_code == 0
    assert "echo: after restore" in result.console and "echo: bye" in result.console


def test_an_interrupt_pending_at_the_save_is_delivered_once_after_the_restore(
        machine_factory, tmp_path):
    m = machine_factory(guest("echo"))
    m.start()
    wait_console(m, "echo: ready")
    m.pause_all()
    m.console.send(b"pending\n")              # the IRQ is raised while no vCPU runs
    from kvmguest.state import save_machine
    state = save_machine(m)
    w = MappedWriter(str(tmp_path / "p.snap"), m.memory)
    w.write_pass(None)
    w.finish(state)
    m.stop()
    r, _ = restore(str(tmp_path / "p.snap"))
    try:
        r.start()
        wait_console(r, "echo: pending")
        r.console.send(b"quit\n")
        result = r.wait(timeout=30)
    finally:
        r.close()
    assert result.console.count("echo: pending") == 1
    assert "bye after 2 interrupts" in result.console, result.console


@pytest.mark.parametrize("backend", ["bitmap", "ring"])
def test_dirty_log_misses_nothing_with_four_concurrent_writers(machine_factory, backend):
    """KVM's dirty_log_test, here: 4 vCPUs stamp random pages of a working set across both
    slots while the host harvests every ~10 ms and copies what it was told is dirty;
    after a final pause and harvest, the copy equals guest memory page for page. With
    the ring, each vCPU's writes come from its own ring."""
    low_pages, pages = 1000, 2000
    base = 3 * GiB - low_pages * PAGE
    m = machine_factory(guest("stamp"), memory=RAM, vcpus=4, dirty_log=backend,
                        cmdline=f"pages={pages} base={base}")
    spans = [(0, base // PAGE, low_pages), (1, 0, pages - low_pages)]   # (slot, first, n)
    regions = {r.slot: r for r in m.memory.regions}
    m.start()
    wait_console(m, "stamp: 4 cpus writing")
    client = m.dirty.open("test")                       # from here on, writes are logged
    mirror = {slot: regions[slot].pages()[first:first + n].copy() for slot, first, n in spans}

    def copy_dirty():
        copied = 0
        for slot, pages_ in client.take().items():
            for s, first, n in spans:
                if s == slot:
                    idx = pages_[(pages_ >= first) & (pages_ < first + n)]
                    mirror[slot][idx - first] = regions[slot].pages()[idx]
                    copied += len(idx)
        return copied

    copied = 0
    for _ in range(40):
        time.sleep(0.01)                                # the harvest period
        copied += copy_dirty()
    m.pause_all()
    copy_dirty()
    for slot, first, n in spans:
        live = regions[slot].pages()[first:first + n]
        stale = np.flatnonzero((live != mirror[slot]).any(axis=1))
        assert len(stale) == 0, f"slot {slot}: pages {stale[:10]} changed but were not logged"
    assert copied > 500                                 # the writers really ran
    stamps = [int(mirror[s][:, :8].view(np.uint64).max() & 0xFF) for s in mirror]
    assert max(stamps) <= 3


def test_several_vcpus_need_the_irqchip_and_no_irqchip_still_boots():
    one_line_error(cli("run", guest("hello"), "--vcpus", "2", "--no-irqchip"), 2, "irqchip")
    p = cli("run", guest("hello"), "--no-irqchip")
    assert p.returncode == 0 and "Hello" in p.stdout


def test_a_version_1_snapshot_still_restores(machine_factory, tmp_path):
    m = machine_factory(guest("dirty"), memory=64 * MiB, irqchip=False,
                        cmdline="pages=64 passes=0 quiet")
    m.start()
    wait_console(m, "dirty: pass 16 ok")
    path = tmp_path / "v2.snap"
    live_save(m, str(path), then="stop")
    # A version-1 file is what this one-vCPU, no-irqchip state was called before.
    state = dict(fmt.read_snapshot(str(path)).state, version=1)
    old = tmp_path / "v1.snap"
    r, _ = restore(str(path))
    try:
        w = MappedWriter(str(old), r.memory)
        w.write_pass(None)
        w.finish(state)
    finally:
        r.close()
    with open(old, "r+b") as f:                      # and the header says version 1
        head = bytearray(f.read(fmt.HEADER_SIZE))
        struct.pack_into("<I", head, fmt.HEADER.offsets["version"], 1)
        at = fmt.HEADER.offsets["header_crc"]
        struct.pack_into("<I", head, at, fmt.crc(bytes(head[:at])))
        f.seek(0)
        f.write(head)
    assert fmt.read_snapshot(str(old)).version == 1
    restore_runs_on(old)
