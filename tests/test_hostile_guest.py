"""A hostile guest never kills the VMM: whatever it asks of our devices while its memory
is being saved, checkpointed, reset or lazily restored, the process carries on and the
guest's own checks hold.

pc-testdev's flush (port 0xe4) write-protects a guest page in the VMM's own address
space for a moment, from the vCPU thread, while other threads read guest RAM. It used to
be PROT_NONE, and a live save's zero-page scan then died with SIGSEGV (5 saves in 12).
`make soak` runs 100 rounds (KVMGUEST_SOAK_ROUNDS)."""

import os
import resource
import subprocess
import sys

from helpers import (ROOT, MiB, cli, cli_popen, guest, guest_pass, read_until,
                     restore_runs_on, wait_until)
from migrate import checkpoint as ck
from migrate.precopy import live_save
from migrate.reader import restore
from migrate.reset import ResetPoint

ROUNDS = int(os.environ.get("KVMGUEST_SOAK_ROUNDS", "6"))
MEMORY = 64 * MiB
BASE = 16 * MiB
FLUSHING = f"pages=256 base={BASE} passes=0 quiet flush"


def advance(m, passes: int = 2) -> None:
    """Let the guest stamp (and flush) ``passes`` more passes: the event, not a delay."""
    start = guest_pass(m, BASE)
    wait_until(lambda: guest_pass(m, BASE) >= start + passes or not m.running, 120,
               f"the guest's pass {start + passes}")
    assert m.running, m.serial.text()[-2000:]


def test_a_guest_flushing_pages_survives_saves_checkpoints_resets_and_lazy_restores(
        machine_factory, tmp_path):
    src = machine_factory(guest("dirty"), memory=MEMORY, cmdline=FLUSHING)
    src.start()
    advance(src)
    point = tmp_path / "point.snap"
    live_save(src, str(point), threads=2, downtime_ms=1, then="stop")
    m, _ = restore(str(point))        # a reset point is made before its guest runs
    reset = ResetPoint(m, str(point))
    chain = ck.Checkpointer(m, str(tmp_path / "c.ckpt"), every=0.01)
    m.start()
    chain.start()
    try:
        for n in range(ROUNDS):
            snap = tmp_path / f"r{n % 2}.snap"
            # The save's writer scans and writes guest RAM while the guest flushes.
            live_save(m, str(snap), threads=2, downtime_ms=1, then="continue")
            advance(m)
            reset.reset()
            advance(m)
            # A lazy clone of that save flushes too, and is saved while it does.
            clone, _ = restore(str(snap), lazy=True)
            try:
                clone.start()
                advance(clone)
                live_save(clone, str(tmp_path / "clone.snap"), downtime_ms=1, then="continue")
                advance(clone)
                assert clone.devices.testdev.flushes > 0
                assert clone.running and "BAD" not in clone.serial.text()
            finally:
                clone.close()
        wait_until(lambda: chain.generation >= 3, 60, "three checkpoints")
        assert m.running and m.error is None
        assert m.devices.testdev.flushes >= 256 * ROUNDS
        assert "BAD" not in m.serial.text(), m.serial.text()[-2000:]
    finally:
        chain.close()
        reset.close()
        m.close()


def test_a_flushing_guest_survives_its_own_save_and_checkpoints_from_the_cli(tmp_path):
    """The reported crash, as a user meets it: run --save with a 1 ms downtime, and
    continuous checkpoints, of a guest that flushes every page it writes."""
    for n in range(3):
        snap = tmp_path / f"s{n}.snap"
        p = cli("run", guest("dirty"), "--memory", "64M", "--cmdline", FLUSHING,
                "--save", snap, "--save-after", "0.3", "--downtime", "1", timeout=300)
        assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
        assert snap.stat().st_size > 0 and not list(tmp_path.glob("*.tmp*"))
        restore_runs_on(snap)
    p = cli("run", guest("dirty"), "--memory", "64M", "--cmdline", FLUSHING,
            "--checkpoint", tmp_path / "c.ckpt", "--every", "20ms", "--timeout", "3",
            timeout=300)
    assert p.returncode == 124 and p.stderr.count("\n") <= 2, (p.returncode, p.stderr[-2000:])
    assert "BAD" not in p.stdout


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


def test_a_guest_that_keeps_asking_to_migrate_is_one_process_one_snapshot_and_capped(tmp_path):
    """Each hop replaces the process (its RAM goes with it) and removes the snapshot it
    came from once the guest is restored; after --max-migrations the guest runs on where
    it is, and its further requests cost a bounded number of stderr lines."""
    p = cli_popen("run", guest("fixture"), "--cmdline", "pages=64", "--guest-migrate",
                  "--max-migrations", "3", "--console-input", stdin=subprocess.PIPE,
                  env={"TMPDIR": str(tmp_path)})
    try:
        read_until(p.stdout, "fixture: ready")
        for k in (1, 2, 3):
            p.stdin.write("migrate\n")
            p.stdin.flush()
            read_until(p.stdout, f"fixture: migrated (restored {k})")
            assert _children(p.pid) == [], "a hop left a process behind"
            assert os.listdir(tmp_path) == [], "a hop left its snapshot behind"
        for _ in range(20):
            p.stdin.write("migrate\n")
        p.stdin.write("exit\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert out.count("fixture: not migrated (restored 3)") == 20, out[-2000:]
    assert "fixture: bye" in out and os.listdir(tmp_path) == []
    lines = err.splitlines()
    assert sum("--max-migrations is reached" in ln for ln in lines) == 3, err
    assert len(lines) <= 5 and "17 more messages like the above were not shown" in err, err



def test_a_guest_whose_migrations_fail_or_that_floods_the_console_floods_no_stderr(tmp_path):
    """Every save fails (files may not grow past 1 MiB here): the guest runs on and is
    told so each time, and stderr says it three times, then counts. A console flood goes
    to stdout (the console), never to stderr, even with -v."""
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    p = subprocess.run([sys.executable, "-m", "kvmguest", "run", guest("fixture"),
                        "--cmdline", "pages=64", "--guest-migrate", "--console-input"],
                       input="migrate\n" * 30 + "exit\n", capture_output=True, text=True,
                       env=dict(os.environ, TMPDIR=str(tmp_path)), preexec_fn=small_files,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("fixture: not migrated (restored 0)") == 30
    lines = p.stderr.splitlines()
    assert sum("the save failed" in ln for ln in lines) == 3, p.stderr
    assert len(lines) == 5 and "27 more messages like the above" in lines[-1], p.stderr
    p = cli("run", guest("flood"), "--timeout", "2", "-v", timeout=60)
    assert p.returncode == 124 and p.stdout.count("quick brown fox") > 100
    assert len(p.stderr.splitlines()) <= 3, p.stderr[-2000:]
