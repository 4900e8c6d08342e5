"""`make demo`: the whole story in under a minute.

Boot a guest; run the `dirty` guest over two memory slots; save it live into a mapped-ram
snapshot; restore it in a new process, where it verifies every page of its working set;
then compare mapped-ram and streaming file sizes as the number of passes grows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvmguest.abi import PAGE_SIZE
from kvmguest.machine import Machine

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests" / "build"
GiB, MiB = 1 << 30, 1 << 20
PAGE = PAGE_SIZE
RAM = 3 * GiB + 64 * MiB                 # above 3 GiB: a second slot at 4 GiB
PAGES = 1500
CMDLINE = f"pages={PAGES} base={3 * GiB - 500 * PAGE} passes=80 quiet"


def mib(n: int) -> str:
    return f"{n / MiB:,.1f} MiB"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def start_dirty() -> Machine:
    m = Machine(str(GUESTS / "dirty.elf"), memory=RAM, cmdline=CMDLINE)
    m.start()
    deadline = time.monotonic() + 20
    while "range 0x100000000" not in m.serial.text():
        if time.monotonic() > deadline:
            raise SystemExit(f"the dirty guest did not start: {m.serial.text()!r}")
        time.sleep(0.01)
    time.sleep(0.5)
    return m


def main() -> int:
    from migrate.precopy import live_save

    t_start = time.monotonic()
    step("1. boot the hello guest on /dev/kvm")
    t = time.perf_counter()
    with Machine(str(GUESTS / "hello.elf"), cmdline="demo=1") as m:
        r = m.run(timeout=10)
    print(r.console, end="")
    print(f"   exit code {r.exit_code}, {(time.perf_counter() - t) * 1e3:.1f} ms from "
          "creating the machine to the guest's exit")

    work = Path(tempfile.mkdtemp(prefix="kvmguest-demo-"))
    snap = work / "dirty.snap"
    step(f"2. the dirty guest rewrites {PAGES} pages in a loop, across two memory slots "
         f"({RAM >> 20} MiB RAM); save it live")
    m = start_dirty()
    print(m.serial.text(), end="")
    report = live_save(m, str(snap), threads=2, then="stop")
    print(report.summary())
    m.close()

    step("3. restore it in a new process: the guest carries on and checks every page")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "kvmguest", "restore", str(snap),
                        "--timeout", "60"], capture_output=True, text=True)
    print(p.stdout, end="")
    print(f"   restored guest exited {p.returncode} after {time.perf_counter() - t:.1f} s"
          + (f"\n{p.stderr}" if p.returncode else ""))

    step("4. file size against pre-copy passes: mapped-ram stays put, streaming grows")
    print(f"   {'passes':>6} | {'mapped-ram: apparent (sparse)':>29} | {'on disk':>12} | "
          f"{'streaming':>12}")
    for passes in (1, 4, 16):
        row = {}
        for fmt in ("mapped", "stream"):
            m = start_dirty()
            path = work / f"{fmt}-{passes}.snap"
            # 20 ms between passes (a slow disk, in effect) so each pass has work to do.
            live_save(m, str(path), format=fmt, min_passes=passes, max_passes=passes,
                      then="stop", progress=lambda *_: time.sleep(0.02))
            st = os.stat(path)
            row[fmt] = (st.st_size, st.st_blocks * 512)
            m.close()
            path.unlink()
        print(f"   {passes:>6} | {mib(row['mapped'][0]):>29} | {mib(row['mapped'][1]):>12} | "
              f"{mib(row['stream'][0]):>12}")
    print("   (mapped-ram: one fixed place per page, zero pages are holes; streaming: every "
          "page sent is appended)")
    snap.unlink()
    work.rmdir()
    print(f"\ndemo done in {time.monotonic() - t_start:.0f} s")
    return 0 if p.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
