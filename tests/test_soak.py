"""Soak: randomized rounds of live save -> restore in a new process -> verify, in the
spirit of the kernel's dirty_log_test. Zero lost or stale pages over all rounds.

CI runs a few rounds; `make soak` runs 100 (KVMGUEST_SOAK_ROUNDS, KVMGUEST_SOAK_SEED)."""

import os
import random
import time

from helpers import (PAGE, GiB, MiB, assert_file_matches_source, assert_verified, cli, guest,
                     guest_pass, wait_until)
from kvmguest import Machine
from migrate.precopy import live_save

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
    after = rng.randint(1, passes // 3)              # save once the guest is this far
    cmdline = f"pages={pages} base={3 * GiB - low * PAGE} passes={passes} quiet"
    path = tmp_path / f"soak-{n}.snap"
    m = Machine(str(guest("dirty")), memory=RAM, cmdline=cmdline)
    try:
        m.start()
        wait_until(lambda: guest_pass(m) >= after or not m.running, 300, f"pass {after}")
        assert m.running, f"round {n} (seed {SEED}): the guest finished before the save"
        live_save(m, str(path), threads=threads, direct=direct, then="stop")
        compared = assert_file_matches_source(path, m, lazy=lazy)
    finally:
        m.close()
    p = cli("restore", path, "--timeout", "300", *(["--lazy"] if lazy else []), timeout=400)
    assert p.returncode == 0, f"round {n} (seed {SEED}): {p.stdout[-1500:]}{p.stderr}"
    assert_verified(p.stdout, pages, passes)
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
