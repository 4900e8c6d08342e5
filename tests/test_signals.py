"""Signals: SIGINT, SIGTERM and SIGHUP cancel what is in progress cleanly (a save's
temporary file and the control socket removed, readers stopped) and say so; a second
signal during that clean-up is noted, not obeyed."""

from __future__ import annotations

import signal
import time

import pytest

from helpers import (MiB, cli, cli_popen, read_until, run_dirty, control_guest, stop,
                     STALL)
from migrate import format as fmt
from kvmguest.front.control import request
from migrate.writer import MappedWriter


# --- signals: cancel cleanly and say so --------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_a_save_removes_the_temporary_file_and_the_socket(tmp_path, sig):
    sock, path = tmp_path / "S", tmp_path / "g.snap"
    run = cli_popen(*run_dirty("--control", sock, "--save", path, "--save-after", "0.2"),
                    env={STALL: "pass0"})
    read_until(run.stderr, "stalled at pass0")
    assert [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
    run.send_signal(sig)
    assert run.wait(timeout=30) == 128 + sig
    assert sorted(f.name for f in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    assert "Traceback" not in run.stderr.read()


def test_ctrl_c_on_run_cancels_a_save_requested_over_the_socket(tmp_path):
    sock, path = tmp_path / "S", tmp_path / "g.snap"
    run = control_guest(sock, env={STALL: "pass0"})
    saver = cli_popen("save", "--control", sock, path)
    read_until(run.stderr, "stalled at pass0")
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=30) == 130
    assert saver.wait(timeout=30) == 1
    assert "cancel" in saver.stderr.read()
    assert sorted(f.name for f in tmp_path.iterdir()) == []


def test_ctrl_c_on_the_save_client_cancels_the_save_and_the_guest_runs_on(tmp_path):
    sock, path = tmp_path / "S", tmp_path / "g.snap"
    run = control_guest(sock, env={STALL: "pass0"})
    try:
        saver = cli_popen("save", "--control", sock, path)
        read_until(run.stderr, "stalled at pass0")
        saver.send_signal(signal.SIGINT)
        assert saver.wait(timeout=30) == 130
        err = saver.stderr.read()
        assert "the save was cancelled; the guest keeps running" in err, err
        assert run.poll() is None
        assert request(str(sock), {"op": "status"})["running"] is True
        assert sorted(f.name for f in tmp_path.iterdir()) == ["S"]
    finally:
        stop(run)


def test_double_ctrl_c_never_kills_the_process_with_the_kick_signal(tmp_path):
    for n in range(5):
        sock = tmp_path / f"S{n}"
        run = control_guest(sock, env={STALL: "pass0"})
        saver = cli_popen("save", "--control", sock, tmp_path / f"g{n}.snap")
        read_until(run.stderr, "stalled at pass0")
        run.send_signal(signal.SIGINT)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=30) == 130          # never -SIGRT/138: a clean exit
        saver.wait(timeout=30)
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def test_ctrl_c_during_an_eager_restore_stops_the_readers_at_once(tmp_path):
    from kvmguest.arch.x86.layout import plan_regions
    from kvmguest.memory import GuestMemory
    path = tmp_path / "full.snap"
    mem = GuestMemory.anonymous(plan_regions(512 * MiB))
    mem.regions[0].array[:] = 0x5A                  # 8 chunks of 64 MiB to read
    w = MappedWriter(str(path), mem)
    w.write_pass(None)
    w.finish(fmt.read_snapshot(str(_a_real_snapshot(tmp_path))).state)
    mem.close()
    p = cli_popen("restore", path, "--threads", "2", env={STALL: "read-chunk"})
    read_until(p.stderr, "stalled at read-chunk")
    t = time.monotonic()
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 130
    assert time.monotonic() - t < 2.0               # 8 stalled chunks would take minutes


def _a_real_snapshot(tmp_path):
    path = tmp_path / "real.snap"
    p = cli(*run_dirty("--save", path, "--save-after", "0.2", "-q", memory="64M"))
    assert p.returncode == 0, p.stderr
    return path
