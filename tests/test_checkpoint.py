"""Continuous checkpoints are crash consistent: whenever the process dies (SIGKILL at a
random instant, or in any phase of a checkpoint, with the writes not yet fsynced lost or
torn as a power cut may leave them), the file restores exactly the latest committed
checkpoint: its pages equal what the test recorded for that checkpoint, and the guest
carries on verifying its own stamps. (docs/FORMAT.md, "Continuous checkpoints".)"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from helpers import ROOT, cli, guest, restore_runs_on, start_dirty, wait_until
from migrate import checkpoint as ck
from migrate.format import SnapshotError
from migrate.precopy import live_save

KILLS = int(os.environ.get("KVMGUEST_CKPT_KILLS", "60"))   # make soak: 2000 x 8 seeds
ZERO_CRC = zlib.crc32(bytes(4096))
DIRTY = "pages=300 passes=0 quiet"


def _start(path, record, every="20ms", env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "kvmguest", "run", guest("dirty"), "--cmdline", DIRTY,
         "--checkpoint", path, "--every", every, "-q"], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, **{ck.RECORD_ENV: str(record)}, **(env or {})))


def _expected(record, generation: int) -> dict:
    """slot -> {page: crc} of checkpoint ``generation``, from the checkpointer's log."""
    pages: dict = {}
    lines = record.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            e = json.loads(line)
        except ValueError:
            # Killed while logging a checkpoint (the log is written before the checkpoint
            # itself): only the last line can be cut, and its checkpoint never committed.
            assert i == len(lines) - 1, f"line {i + 1} of {len(lines)} is damaged"
            break
        if e["generation"] > generation:
            break
        pages.setdefault(e["slot"], {}).update(zip(e["pages"], e["crcs"]))
    return pages


def _check_file(path, record) -> int:
    """The file restores the latest committed checkpoint, page for page; its generation
    (0: no checkpoint was complete, and the file says so)."""
    if not path.exists():
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            c = ck.validated_checkpoint(str(path), fd)
        except SnapshotError as err:
            assert "no complete checkpoint yet" in str(err)
            return 0
        memory, _ = ck.load_checkpoint(c, fd)
    finally:
        os.close(fd)
    try:
        want = _expected(record, c.record.generation)
        for r in memory.regions:
            got = r.pages()
            expect = want.get(r.slot, {})
            listed = np.zeros(r.npages, bool)
            listed[list(expect)] = True
            assert not got[~listed].any(), "a page no checkpoint wrote is not zero"
            bad = [p for p, crc in expect.items() if zlib.crc32(got[p]) != crc]
            assert bad == [], (c.record.generation, bad[:10])
    finally:
        memory.close()
    return c.record.generation


def _logged_generation(record) -> int:
    """The newest checkpoint the checkpointer has logged (it logs one before writing it,
    so the one before it is committed by then); 0 before any."""
    try:
        lines = record.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["generation"]
        except ValueError:            # the last line may be half written
            continue
    return 0


def test_sigkill_at_random_instants_always_leaves_the_latest_committed_checkpoint(tmp_path):
    """Each kill is aimed from the record, not the clock: right after start (before any
    checkpoint), or once checkpoint k has been logged, then after a random delay of up to
    30 ms. Killed there, the file must give checkpoint k-1 or later, on a slow machine as
    on a fast one."""
    rng = random.Random(int(os.environ.get("KVMGUEST_CKPT_SEED", "20261126")))
    path, record = tmp_path / "guest.ckpt", tmp_path / "record.jsonl"
    results = []
    for _ in range(KILLS):
        if record.exists():
            record.unlink()
        if path.exists():
            path.unlink()
        target = 0 if rng.random() < 0.15 else rng.randint(1, 8)
        p = _start(path, record)
        try:
            wait_until(lambda: _logged_generation(record) >= target or p.poll() is not None,
                       120, f"checkpoint {target} logged")
            assert p.poll() is None, p.stderr.read()
            time.sleep(rng.uniform(0, 0.03))
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        results.append((target, _check_file(path, record)))
    assert all(got >= target - 1 for target, got in results), results
    # The kills landed before the first checkpoint, and after many.
    assert min(got for _, got in results) == 0, results
    assert max(got for _, got in results) >= 7, results


# `make soak` tries more power-loss seeds (KVMGUEST_CKPT_SEEDS=1,2,3,...).
SEEDS = os.environ.get("KVMGUEST_CKPT_SEEDS", "1").split(",")


PHASES = [("ckpt-state", 2), ("ckpt-journal", 2), ("ckpt-synced", 2),
          ("ckpt-committed", 3), ("ckpt-applying", 3), ("ckpt-applied-synced", 3)]


@pytest.mark.parametrize("phase,restores", PHASES, ids=[p for p, _ in PHASES])
@pytest.mark.parametrize("powerloss", [None] + SEEDS,
                         ids=["kill"] + [f"power-loss-{s}" for s in SEEDS])
def test_a_crash_in_any_phase_of_a_checkpoint_restores_the_committed_one(tmp_path, phase,
                                                                          restores, powerloss):
    """Killed in that phase of checkpoint 3; with power loss, the writes since the last
    fsync are first lost or torn at random. The file gives checkpoint 2 until 3 is
    committed, 3 after; the restored guest carries on verifying its pages."""
    path, record = tmp_path / "guest.ckpt", tmp_path / "record.jsonl"
    env = {"KVMGUEST_FAULT_POINT": phase}
    if powerloss:
        env[ck.POWERLOSS_ENV] = powerloss
    p = _start(path, record, every="50ms", env=env)
    assert p.wait(60) == -signal.SIGKILL, p.stderr.read()
    assert _check_file(path, record) == restores
    restore_runs_on(path)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_a_restored_guest_checkpointed_on_and_killed_restores_its_latest(tmp_path, lazy):
    """`kvmguest restore PATH --checkpoint PATH`: the restored guest is checkpointed on,
    into the very file it came from (lazily: the guest's RAM is a map of that file, so
    the first checkpoint must be a new file put in its place); killed once checkpoint 3
    is logged, the file gives checkpoint 2 or later and the guest carries on from it."""
    path, record = tmp_path / "guest.ckpt", tmp_path / "record.jsonl"

    def kill_after(p, generation):
        try:
            wait_until(lambda: _logged_generation(record) >= generation or
                       p.poll() is not None, 120, f"checkpoint {generation} logged")
            assert p.poll() is None, p.stderr.read()
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()

    kill_after(_start(path, record), 3)
    assert _check_file(path, record) >= 2
    record.unlink()
    kill_after(subprocess.Popen(
        [sys.executable, "-m", "kvmguest", "restore", path, "--checkpoint", path,
         "--every", "20ms", "-q", *(["--lazy"] if lazy else [])], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, **{ck.RECORD_ENV: str(record)})), 3)
    assert _check_file(path, record) >= 2
    restore_runs_on(path)


def test_checkpoints_and_a_live_save_at_once_are_both_right(machine_factory, tmp_path):
    """Two dirty-tracking clients and nested pauses: the checkpoint chain runs every 20
    ms while a live save runs; both files restore and the guest verifies in each."""
    m = start_dirty(machine_factory, memory=64 << 20, pages=300, passes=0, base=16 << 20)
    chain = ck.Checkpointer(m, str(tmp_path / "c.ckpt"), every=0.02)
    chain.start()
    wait_until(lambda: chain.generation >= 3, what="three checkpoints")
    live_save(m, str(tmp_path / "s.snap"), then="continue", downtime_ms=50)
    n = chain.generation
    wait_until(lambda: chain.generation >= n + 3, what="three more checkpoints")
    chain.stop()
    for f in ("c.ckpt", "s.snap"):
        restore_runs_on(tmp_path / f)


def test_pause_per_checkpoint_and_bytes_follow_the_pages_changed(machine_factory, tmp_path):
    """Later checkpoints write only what changed (plus the journal), in place: the file
    does not grow; inspect shows the count and what each wrote."""
    m = start_dirty(machine_factory, memory=64 << 20, pages=300, passes=0, base=16 << 20)
    chain = ck.Checkpointer(m, str(tmp_path / "c.ckpt"))
    first = chain.take()
    size = os.stat(tmp_path / "c.ckpt").st_size
    later = [chain.take() for _ in range(5)]
    chain.close()
    assert all(s.pages <= 400 for s in later), later          # ~300 pages and the runtime's
    assert all(s.bytes_written < first.bytes_written for s in later)
    assert os.stat(tmp_path / "c.ckpt").st_size == size
    info = json.loads(cli("inspect", tmp_path / "c.ckpt", "--json").stdout)
    assert info["format"] == "checkpoint" and info["checkpoints"] == 6
    assert [h["generation"] for h in info["history"]] == list(range(1, 7))


def test_a_file_with_no_complete_checkpoint_or_damaged_state_is_refused_in_one_line(
        machine_factory, tmp_path):
    from helpers import one_line_error
    m = start_dirty(machine_factory, memory=64 << 20, pages=300, passes=0, base=16 << 20)
    chain = ck.Checkpointer(m, str(tmp_path / "c.ckpt"))
    chain.take()
    chain.take()
    chain.close()
    raw = bytearray((tmp_path / "c.ckpt").read_bytes())
    damaged = bytearray(raw)
    off = ck.plan_checkpoint(m.memory, 1).state_offsets[0]          # checkpoint 2's state slot
    damaged[off + 10] ^= 0xFF
    (tmp_path / "state.ckpt").write_bytes(damaged)
    one_line_error(cli("restore", tmp_path / "state.ckpt"), 2, "state of checkpoint 2 is damaged")
    for o in ck.SLOT_OFFSETS:
        raw[o:o + 512] = bytes(512)
    (tmp_path / "none.ckpt").write_bytes(raw)
    one_line_error(cli("restore", tmp_path / "none.ckpt"), 2, "no complete checkpoint yet")


def test_a_checkpoint_on_demand_over_the_control_socket(tmp_path):
    sock, path = tmp_path / "g.sock", tmp_path / "g.ckpt"
    p = subprocess.Popen([sys.executable, "-m", "kvmguest", "run", guest("dirty"),
                          "--cmdline", DIRTY, "--checkpoint", path, "--every", "3600",
                          "--control", sock, "-q"], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: path.exists(), what="the first checkpoint")
        for n in (2, 3):
            r = cli("checkpoint", "--control", sock)
            assert r.returncode == 0 and r.stdout.startswith(f"checkpoint {n} of "), r.stderr
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    info = json.loads(cli("inspect", path, "--json").stdout)
    assert info["checkpoints"] == 3
    restore_runs_on(path)


def test_checkpoint_without_checkpoints_is_a_one_line_error(tmp_path):
    from helpers import one_line_error
    sock = tmp_path / "g.sock"
    p = subprocess.Popen([sys.executable, "-m", "kvmguest", "run", guest("dirty"),
                          "--cmdline", DIRTY, "--control", sock, "-q"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: sock.exists(), what="the control socket")
        one_line_error(cli("checkpoint", "--control", sock), 1, "keeps no checkpoints")
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    for command in ("run", "restore"):
        one_line_error(cli(command, guest("hello"), "--every", "1s"), 2,
                       "--every goes with --checkpoint")
        one_line_error(cli(command, guest("hello"), "--checkpoint", tmp_path / "x",
                           "--control", tmp_path / "x"), 2,
                       "--control and --checkpoint name the same path")
