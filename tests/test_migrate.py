"""Live save and restore on real KVM, with two memory slots, in a new process."""

import json
import os

import pytest

from helpers import (GO, MARGIN, PAGE, RAM, assert_alive_and_clean, assert_file_matches_source,
                     assert_verified, cli, cli_popen, dirty_cmdline, guest, one_line_error,
                     read_until, restore_runs_on, start_dirty, verdict, wait_console)
from migrate import format as fmt
from migrate.precopy import live_save
from migrate.reader import restore


def restore_in_new_process(path, *extra):
    """Restore an "oninput" dirty guest in a new process and tell it to go: it finishes."""
    p = cli("restore", path, "--console-input", *extra, input=GO, timeout=MARGIN)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    assert verdict(p.stdout)["bad"] == []
    return p


@pytest.mark.parametrize("threads,direct,lazy", [(1, False, False), (2, False, True),
                                                 (2, True, False)],
                         ids=["1-thread", "2-threads-lazy-restore", "2-threads-direct-io"])
def test_live_save_then_restore_in_new_process_verifies(machine_factory, tmp_path, threads,
                                                          direct, lazy):
    m = start_dirty(machine_factory, passes=0)
    path = tmp_path / "guest.snap"
    report = live_save(m, str(path), threads=threads, direct=direct, then="stop",
                       downtime_ms=50)
    assert len(report.passes) >= 2 and report.passes[0].pages_written > 600
    assert not m.running
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert_file_matches_source(path, m, lazy=lazy)
    # The guest runs forever (passes=0); the restored one must keep verifying each pass.
    restore_runs_on(path, *(["--lazy"] if lazy else []))


def test_a_snapshot_not_in_the_page_cache_restores_with_direct_reads(machine_factory,
                                                                     tmp_path):
    """An eager restore of a file the page cache does not hold reads with O_DIRECT
    (straight into guest memory); the guest carries on verifying."""
    m = start_dirty(machine_factory, memory=256 << 20, base=16 << 20, pages=900, passes=0)
    path = tmp_path / "cold.snap"
    live_save(m, str(path), threads=2, then="stop", downtime_ms=50)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)     # out of the page cache
    finally:
        os.close(fd)
    text = restore_runs_on(path, "-v")
    assert "reading pages with O_DIRECT" in text, text[-2000:]
    with open(path, "rb") as f:         # O_DIRECT left it uncached; now it is: buffered
        while f.read(1 << 20):
            pass
    assert "reading pages buffered" in restore_runs_on(path, "-v")


@pytest.mark.parametrize("ring_entries", [None, 1024], ids=["ring", "small-ring"])
def test_a_live_save_through_the_dirty_ring_loses_nothing(machine_factory, tmp_path,
                                                          ring_entries):
    """The same save through the dirty ring (a small one forces ring-full exits during
    the passes): the file equals the source RAM at the pause and the guest verifies."""
    m = start_dirty(machine_factory, memory=256 << 20, base=16 << 20, pages=900, passes=0,
                    machine={"dirty_log": "ring", "ring_entries": ring_entries})
    assert m.dirty.name == "ring"
    path = tmp_path / "ring.snap"
    report = live_save(m, str(path), threads=2, then="stop", downtime_ms=50)
    assert len(report.passes) >= 2
    assert_file_matches_source(path, m, lazy=False)
    restore_runs_on(path)


def test_restored_guest_finishes_and_verifies_every_page(machine_factory, tmp_path):
    m = start_dirty(machine_factory, pages=900, passes=40, oninput=True)
    path = tmp_path / "g.snap"
    live_save(m, str(path), threads=2, then="stop")
    assert_file_matches_source(path, m, lazy=False)
    assert_verified(restore_in_new_process(path).stdout, 900, 40, oninput=True)
    assert_verified(restore_in_new_process(path, "--lazy").stdout, 900, 40, oninput=True)


def test_restored_guest_saved_again_and_restored_again_still_verifies(machine_factory,
                                                                       tmp_path):
    m = start_dirty(machine_factory, pages=900, passes=60, oninput=True)
    first, second = tmp_path / "first.snap", tmp_path / "second.snap"
    live_save(m, str(first), then="stop")
    r, _ = restore(str(first))
    try:
        r.start()
        wait_console(r, "ok\n")                   # the restored guest finished a pass
        live_save(r, str(second), threads=2, then="stop")
        assert_file_matches_source(second, r, lazy=False)
    finally:
        r.close()
    assert_verified(restore_in_new_process(second, "--lazy").stdout, 900, 60, oninput=True)


def test_checkpoint_with_then_continue_keeps_the_source_running(machine_factory, tmp_path):
    """The source runs on after a save with --then continue and keeps verifying its pages;
    the snapshot restores and verifies too. (The guest runs forever: with a pass count it
    could finish before a slow machine's save did, and the save would rightly refuse.)"""
    m = start_dirty(machine_factory, pages=300, passes=0)
    path = tmp_path / "ckpt.snap"
    live_save(m, str(path), then="continue")
    assert m.running
    saved_at = len(m.serial.text())
    for _ in range(2):                      # two more verified passes after the save
        next_report(m)
    assert m.running
    assert_alive_and_clean(m.serial.text()[saved_at:])
    assert_alive_and_clean(restore_runs_on(path))


def test_cpustate_guest_keeps_every_register_across_save_and_restore(machine_factory,
                                                                      tmp_path):
    m = machine_factory(guest("cpustate"), memory=RAM, cmdline="iters=3000000")
    m.start()
    wait_console(m, "holding 12 GPRs")            # printed just before the loop starts
    path = tmp_path / "cpu.snap"
    live_save(m, str(path), then="stop")
    regs = fmt.read_snapshot(str(path)).state["vcpus"][0]["regs"]
    assert regs != ""                              # state captured mid-loop
    p = cli("restore", path, "--timeout", "120")
    assert p.returncode == 0, p.stdout + p.stderr
    assert verdict(p.stdout)["registers_intact"]


def next_report(m) -> None:
    """Wait for the dirty guest's next every-16th-pass report."""
    seen = m.serial.text().count(" ok\n")
    from helpers import wait_until
    wait_until(lambda: m.serial.text().count(" ok\n") > seen, 30, "the next pass report")


def between_passes(m, what: str) -> None:
    """A progress callback: after each pre-copy pass (not during pass 0, not once the
    guest is paused for the stop-and-copy), wait for the guest's next report."""
    if what.startswith("pass ") and what != "pass 0":
        next_report(m)


def test_mapped_file_is_bounded_while_stream_grows_with_passes(machine_factory, tmp_path):
    sizes, sent = {}, {}
    for fmt_name in ("mapped", "stream"):
        for passes in (3, 12):
            m = start_dirty(machine_factory, pages=900, passes=0)
            path = tmp_path / f"{fmt_name}-{passes}.snap"
            # Waiting for the guest to report 16 more passes between our passes lets it
            # re-dirty its whole working set for each pass to send.
            report = live_save(m, str(path), format=fmt_name, min_passes=passes,
                               max_passes=passes, then="stop",
                               progress=lambda what, _: between_passes(m, what))
            assert len(report.passes) == passes + 1       # pre-copy passes + stop-and-copy
            sizes[fmt_name, passes] = os.path.getsize(path)
            sent[fmt_name, passes] = sum(p.pages_written for p in report.passes) * PAGE
            m.close()
    snap = fmt.read_snapshot(str(tmp_path / "mapped-12.snap"))
    bound = fmt.documented_bound(RAM, 2, snap.state_length)
    # Mapped-ram: the same size however many passes, within the documented bound.
    assert sizes["mapped", 3] == sizes["mapped", 12] <= bound
    # Streaming: every page sent in every pass is in the file, so it grows with passes.
    for passes in (3, 12):
        assert sizes["stream", passes] > sent["stream", passes]
    assert sizes["stream", 12] > sizes["stream", 3] + 9 * 100 * PAGE


def test_cli_run_save_restore_and_inspect(tmp_path):
    path = tmp_path / "cli.snap"
    p = cli("run", guest("dirty"), "--memory", f"{RAM >> 20}M", "--cmdline",
            dirty_cmdline(pages=600, passes=0), "--save", path, "--save-after", "0.3",
            "--threads", "2")
    assert p.returncode == 0, p.stderr
    assert "saved" in p.stderr and "downtime" in p.stderr
    info = cli("inspect", path)
    assert info.returncode == 0
    assert "valid, complete kvmguest snapshot" in info.stdout
    assert "block ram-high   slot 1 gpa 0x100000000" in info.stdout
    js = cli("inspect", path, "--json")
    data = json.loads(js.stdout)
    assert data["valid"] and data["blocks"][1]["pages_present"] >= 300
    restore_runs_on(path)


def test_save_from_another_shell_through_the_control_socket(tmp_path):
    sock, path = tmp_path / "ctl.sock", tmp_path / "ctl.snap"
    run = cli_popen("run", guest("dirty"), "--memory", f"{RAM >> 20}M", "--cmdline",
                    dirty_cmdline(passes=0), "--control", sock)
    try:
        read_until(run.stdout, "dirty: pass 16 ok")   # the socket exists before boot
        assert os.stat(sock).st_mode & 0o777 == 0o600
        p = cli("save", "--control", sock, path, "--threads", "2")
        assert p.returncode == 0, p.stderr
        assert "saved" in p.stdout
        assert run.wait(timeout=30) == 0           # --then stop: the source ends
    finally:
        if run.poll() is None:
            run.kill()
    assert not sock.exists()
    restore_runs_on(path)


@pytest.mark.parametrize("damage", ["truncate", "flip-state", "flip-bitmap", "garbage"])
def test_damaged_snapshot_is_refused_and_no_guest_starts(machine_factory, tmp_path, damage):
    m = start_dirty(machine_factory, pages=300, passes=0)
    path = tmp_path / "d.snap"
    live_save(m, str(path), then="stop")
    snap = fmt.read_snapshot(str(path))

    def flip(offset):
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0x40]))

    if damage == "truncate":
        os.truncate(path, snap.layout.blocks[1].pages_offset + 100)
    elif damage == "flip-state":
        flip(snap.layout.state_offset + 10)
    elif damage == "flip-bitmap":
        flip(snap.layout.blocks[1].bitmap_offset)
    else:
        path.write_bytes(b"\x00" * 4096)
    p = cli("restore", path)
    one_line_error(p, 2)                           # bad input: exit 2, one line
    assert p.stdout == ""                          # no guest ran


def test_failed_save_leaves_the_previous_snapshot_intact(machine_factory, tmp_path):
    m = start_dirty(machine_factory, pages=300, passes=0)
    path = tmp_path / "keep.snap"
    live_save(m, str(path), then="continue")
    before = (os.stat(path), fmt.read_snapshot(str(path)).state)
    from migrate.errors import SaveError
    with pytest.raises(SaveError, match="unknown format"):
        live_save(m, str(path), format="bogus", then="continue")
    assert m.running                               # the guest never noticed
    after = (os.stat(path), fmt.read_snapshot(str(path)).state)
    assert after[0].st_ino == before[0].st_ino and after[0].st_mtime_ns == before[0].st_mtime_ns
    assert after[1] == before[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.snap"]
