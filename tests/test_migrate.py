"""Live save and restore on real KVM, with two memory slots, in a new process."""

import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, assert_file_matches_source, guest
from migrate import format as fmt
from migrate.precopy import live_save
from migrate.reader import restore

GiB, MiB, PAGE = 1 << 30, 1 << 20, 4096
RAM = 3 * GiB + 32 * MiB                           # two slots: [0, 3G) and [4G, 4G+32M)
WS_BASE = 3 * GiB - 100 * PAGE                     # working set: 100 pages low, rest high


def dirty_cmdline(pages=900, passes=0):
    return f"pages={pages} base={WS_BASE} passes={passes} quiet"


def kvmguest(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvmguest.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def wait_for(m, text, timeout=30.0):
    deadline = time.monotonic() + timeout
    while text not in m.serial.text():
        assert time.monotonic() < deadline, f"{text!r} never appeared: {m.serial.text()!r}"
        time.sleep(0.01)


def start_dirty(machine_factory, **kw):
    m = machine_factory(guest("dirty"), memory=RAM, cmdline=dirty_cmdline(**kw))
    m.start()
    wait_for(m, "dirty: range 0x100000000")
    time.sleep(0.3)                                # well into the passes
    return m


def restore_in_new_process(path, *extra):
    p = kvmguest("restore", path, "--timeout", "120", *extra)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    assert "bad pages" not in p.stdout
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
    p = kvmguest("restore", path, "--timeout", "3", *(["--lazy"] if lazy else []))
    assert p.returncode == 124, p.stderr           # still running at the timeout: alive
    assert "BAD page" not in p.stdout and "bad pages" not in p.stdout
    assert len(re.findall(r"dirty: pass \d+ ok", p.stdout)) >= 1   # it carried on


def test_restored_guest_finishes_and_verifies_every_page(machine_factory, tmp_path):
    m = start_dirty(machine_factory, pages=900, passes=40)
    path = tmp_path / "g.snap"
    live_save(m, str(path), threads=2, then="stop")
    assert_file_matches_source(path, m, lazy=False)
    p = restore_in_new_process(path)
    assert "dirty: verified 900 pages over 40 passes" in p.stdout
    p = restore_in_new_process(path, "--lazy")
    assert "dirty: verified 900 pages over 40 passes" in p.stdout


def test_restored_guest_saved_again_and_restored_again_still_verifies(machine_factory,
                                                                       tmp_path):
    m = start_dirty(machine_factory, pages=900, passes=60)
    first, second = tmp_path / "first.snap", tmp_path / "second.snap"
    live_save(m, str(first), then="stop")
    r, _ = restore(str(first))
    try:
        r.start()
        time.sleep(0.5)
        live_save(r, str(second), threads=2, then="stop")
        assert_file_matches_source(second, r, lazy=False)
    finally:
        r.close()
    p = restore_in_new_process(second, "--lazy")
    assert "dirty: verified 900 pages over 60 passes" in p.stdout


def test_checkpoint_with_then_continue_keeps_the_source_running(machine_factory, tmp_path):
    m = start_dirty(machine_factory, pages=300, passes=25)
    path = tmp_path / "ckpt.snap"
    live_save(m, str(path), then="continue")
    result = m.wait(timeout=120)
    assert result.exit_code == 0 and "verified 300 pages over 25 passes" in result.console
    p = restore_in_new_process(path)
    assert "verified 300 pages over 25 passes" in p.stdout


def test_cpustate_guest_keeps_every_register_across_save_and_restore(machine_factory,
                                                                      tmp_path):
    m = machine_factory(guest("cpustate"), memory=RAM, cmdline="iters=3000000")
    m.start()
    wait_for(m, "holding 12 GPRs")
    time.sleep(0.2)                                # inside the register-holding loop
    path = tmp_path / "cpu.snap"
    live_save(m, str(path), then="stop")
    regs = fmt.read_snapshot(str(path)).state["vcpus"][0]["regs"]
    assert regs != ""                              # state captured mid-loop
    p = kvmguest("restore", path, "--timeout", "120")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "all 12 GPRs and 16 XMM registers intact" in p.stdout


def test_mapped_file_is_bounded_while_stream_grows_with_passes(machine_factory, tmp_path):
    sizes, sent = {}, {}
    for fmt_name in ("mapped", "stream"):
        for passes in (3, 12):
            m = start_dirty(machine_factory, pages=900, passes=0)
            path = tmp_path / f"{fmt_name}-{passes}.snap"
            # 20 ms between passes (a slower disk, in effect) lets the guest re-dirty
            # a few hundred pages for each pass to send.
            report = live_save(m, str(path), format=fmt_name, min_passes=passes,
                               max_passes=passes, then="stop",
                               progress=lambda *_: time.sleep(0.02))
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
    p = kvmguest("run", guest("dirty"), "--memory", f"{RAM >> 20}M", "--cmdline",
                 dirty_cmdline(pages=600, passes=30), "--save", path, "--save-after", "1",
                 "--threads", "2")
    assert p.returncode == 0, p.stderr
    assert "saved" in p.stderr and "downtime" in p.stderr
    info = kvmguest("inspect", path)
    assert info.returncode == 0
    assert "valid, complete kvmguest snapshot" in info.stdout
    assert "block ram-high   slot 1 gpa 0x100000000" in info.stdout
    js = kvmguest("inspect", path, "--json")
    import json
    data = json.loads(js.stdout)
    assert data["valid"] and data["blocks"][1]["pages_present"] >= 300
    restore_in_new_process(path)


def test_save_from_another_shell_through_the_control_socket(tmp_path):
    sock, path = tmp_path / "ctl.sock", tmp_path / "ctl.snap"
    run = subprocess.Popen([sys.executable, "-m", "kvmguest.cli", "run", guest("dirty"),
                            "--memory", f"{RAM >> 20}M", "--cmdline", dirty_cmdline(passes=0),
                            "--control", sock], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.05)
        assert os.stat(sock).st_mode & 0o777 == 0o600
        time.sleep(0.5)
        p = kvmguest("save", "--control", sock, path, "--threads", "2")
        assert p.returncode == 0, p.stderr
        assert "saved" in p.stdout
        assert run.wait(timeout=30) == 0           # --then stop: the source ends
    finally:
        if run.poll() is None:
            run.kill()
    assert not sock.exists()
    p = kvmguest("restore", path, "--timeout", "3")
    assert p.returncode == 124 and "bad pages" not in p.stdout


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
    p = kvmguest("restore", path)
    assert p.returncode == 1
    assert p.stdout == ""                          # no guest ran
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("kvmguest: error: ")
    assert "Traceback" not in p.stderr


def test_failed_save_leaves_the_previous_snapshot_intact(machine_factory, tmp_path):
    m = start_dirty(machine_factory, pages=300, passes=0)
    path = tmp_path / "keep.snap"
    live_save(m, str(path), then="continue")
    before = (os.stat(path), fmt.read_snapshot(str(path)).state)
    from migrate.writer import SaveError
    with pytest.raises(SaveError, match="unknown format"):
        live_save(m, str(path), format="bogus", then="continue")
    assert m.running                               # the guest never noticed
    after = (os.stat(path), fmt.read_snapshot(str(path)).state)
    assert after[0].st_ino == before[0].st_ino and after[0].st_mtime_ns == before[0].st_mtime_ns
    assert after[1] == before[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.snap"]
