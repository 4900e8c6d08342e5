"""Soak: randomized rounds of live save -> restore in a new process -> verify, in the
spirit of the kernel's dirty_log_test. Zero lost or stale pages over all rounds.

CI runs a few rounds; `make soak` runs 100 (KVMGUEST_SOAK_ROUNDS, KVMGUEST_SOAK_SEED)."""

import os
import random
import subprocess
import sys
import time

from conftest import ROOT, assert_file_matches_source, guest
from kvmguest import Machine
from migrate.precopy import live_save

GiB, MiB, PAGE = 1 << 30, 1 << 20, 4096
RAM = 3 * GiB + 64 * MiB
ROUNDS = int(os.environ.get("KVMGUEST_SOAK_ROUNDS", "3"))
SEED = int(os.environ.get("KVMGUEST_SOAK_SEED", str(int(time.time()))))


def one_round(rng: random.Random, tmp_path, n: int) -> dict:
    pages = rng.randint(200, 3000)
    low = rng.randint(0, pages)                       # pages below 3 GiB; the rest at 4 GiB
    # Enough passes (pages x passes >= 100k page writes, seconds of work) that the guest
    # is still running when the save starts.
    passes = max(rng.randint(15, 50), 100_000 // pages)
    threads, direct, lazy = rng.choice([1, 2]), rng.random() < 0.3, rng.random() < 0.5
    after = rng.uniform(0.1, 1.0)
    cmdline = f"pages={pages} base={3 * GiB - low * PAGE} passes={passes} quiet"
    path = tmp_path / f"soak-{n}.snap"
    m = Machine(str(guest("dirty")), memory=RAM, cmdline=cmdline)
    try:
        m.start()
        time.sleep(after)
        assert m.running, f"round {n} (seed {SEED}): the guest finished before the save"
        live_save(m, str(path), threads=threads, direct=direct, then="stop")
        compared = assert_file_matches_source(path, m, lazy=lazy)
    finally:
        m.close()
    p = subprocess.run([sys.executable, "-m", "kvmguest.cli", "restore", str(path),
                        "--timeout", "300", *(["--lazy"] if lazy else [])], cwd=ROOT,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, f"round {n} (seed {SEED}): {p.stdout[-1500:]}{p.stderr}"
    assert f"verified {pages} pages over {passes} passes" in p.stdout, p.stdout[-1500:]
    path.unlink()
    return {"rounds": 1, "pages_compared": compared, "working_set_pages": pages,
            "guest_page_checks": pages * passes}


def test_soak_save_restore_verify_loses_nothing(tmp_path):
    rng = random.Random(SEED)
    totals: dict = {}
    for n in range(ROUNDS):
        for k, v in one_round(rng, tmp_path, n).items():
            totals[k] = totals.get(k, 0) + v
    print(f"\nsoak: seed {SEED}: {totals}")
    assert totals["rounds"] == ROUNDS
