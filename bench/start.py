"""What every test pays at start, and clones (`python -m bench --only start`).

Each figure beside the baseline measured in the same run:
- lazy restore to the guest's first instruction at 1/4/16 GiB against the KVM floor
  (a VM and its memory slots alone); target: floor + 3 ms;
- Machine(hello) created to the guest's exit against the raw KVM floor (VM, slot, vCPU,
  two instructions); target: 2x;
- `kvmguest run hello` as a process against the interpreter alone (`python -c pass`);
  target: 150 ms;
- clones: N machines from one snapshot, each a lazy MAP_PRIVATE restore sharing the page
  cache, for N = 1, 8, 32 of a 1 GiB guest with a 64 MiB working set: clones started per
  second (in one process, and as `kvmguest restore --lazy` processes) and memory per
  clone (PSS from /proc/PID/smaps_rollup) once each has read its whole working set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from kvmguest.kvm import Kvm
from kvmguest.front.testing.fixtures import CACHE_ENV

from . import boot
from .common import GUESTS, Figure, Report, run_cmd, timed
from .migration import slot_floor, start_guest
from migrate.precopy import live_save
from migrate.reader import restore

GiB, MiB = 1 << 30, 1 << 20
WS_PAGES = 64 * MiB // 4096


def first_instruction(path: str, lazy: bool = True) -> float:
    """ms from calling restore() to the guest's first instruction."""
    t = time.perf_counter()
    m, _ = restore(path, lazy=lazy)
    m.start()
    while m.first_run_at is None and m.running:
        time.sleep(0.0001)
    ms = (m.first_run_at - t) * 1e3
    m.close()
    return ms


def lazy_restores(report: Report, work: str, sizes: list[int], runs: int) -> None:
    for ram in sizes:
        path = os.path.join(work, f"start-{ram >> 30}.snap")
        m = start_guest(ram)
        try:
            live_save(m, path, then="stop")
        finally:
            m.close()
        floor = report.add(Figure(f"KVM floor, {ram >> 30} GiB: VM + memory slots alone", "ms",
                                  [slot_floor(ram) for _ in range(max(runs, 5))]))
        fig = Figure(f"lazy restore, {ram >> 30} GiB: call to the guest's first instruction",
                     "ms", [first_instruction(path) for _ in range(max(runs, 5))],
                     baseline=floor.name, target="<= floor + 3 ms")
        fig.met = fig.median <= floor.median + 3
        report.add(fig)
        os.unlink(path)


def create_to_exit(report: Report, runs: int) -> None:
    kvm = Kvm()
    floor = report.add(Figure("raw KVM floor: VM+vCPU to first I/O exit", "ms",
                              timed(lambda: boot.raw_floor(kvm), max(runs, 5))))
    samples = []
    for _ in range(max(runs, 5) + 1):
        samples += timed(lambda: boot.hello_in_process(kvm), 1, warmup=0)
        boot.close_machines()
    fig = Figure("Machine(hello) create to guest exit", "ms", samples[1:], baseline=floor.name,
                 target="<= 2x the raw floor")
    fig.met = fig.median <= 2 * floor.median
    report.add(fig)
    kvm.close()


def process(report: Report, runs: int) -> None:
    bare = report.add(Figure("process: python -c pass (the interpreter alone)", "ms",
                             timed(lambda: run_cmd([sys.executable, "-c", "pass"]),
                                   max(runs, 5))))
    cli = [sys.executable, "-m", "kvmguest", "run", "-q", boot.HELLO]
    fig = Figure("process: kvmguest run hello", "ms",
                 timed(lambda: run_cmd(cli, check=True), max(runs, 5)), baseline=bare.name,
                 target="<= 150 ms")
    fig.met = fig.median <= 150
    report.add(fig)


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _ready_snapshot(work: str) -> str:
    """A 1 GiB fixture guest with a 64 MiB working set, saved at its ready point."""
    from kvmguest.front.testing.fixtures import GuestSpec, snapshot_for
    os.environ[CACHE_ENV] = os.path.join(work, "cache")
    return snapshot_for(GuestSpec(str(GUESTS / "fixture.elf"), f"pages={WS_PAGES}", GiB,
                                  timeout=300))


def clones(report: Report, work: str, counts: list[int]) -> None:
    path = _ready_snapshot(work)
    size = os.path.getsize(path)
    # Baselines, same run: eager restores of the same file (each reads the 64 MiB working
    # set into memory of its own), in this process and as a process.
    rate, grown = [], []
    for _ in range(3):
        before = _pss_kib(os.getpid())
        t = time.perf_counter()
        m, _ = restore(path)
        m.start()
        rate.append(1 / (time.perf_counter() - t))
        grown.append((_pss_kib(os.getpid()) - before) / 1024)
        m.close()
    base_rate = report.add(Figure("baseline: eager restores of the same snapshot in one "
                                  "process, started per second", "restores/s", rate))
    base_mem = report.add(Figure("baseline: memory of one eager restore (PSS growth)", "MiB",
                                 grown))
    argv = [sys.executable, "-m", "kvmguest", "restore", "--console-input", path]
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    try:
        p.stdout.readline()
        proc_rate = report.add(Figure("baseline: one `kvmguest restore` process (eager) to "
                                      "its guest's first line, as a rate", "restores/s",
                                      [1 / (time.perf_counter() - t)]))
        proc_mem = report.add(Figure("baseline: PSS of one `kvmguest restore` process (eager)",
                                     "MiB", [_pss_kib(p.pid) / 1024]))
    finally:
        p.kill()
        p.wait()
    for n in counts:
        # In one process: n lazy restores, started one after the other.
        before = _pss_kib(os.getpid())
        t = time.perf_counter()
        machines = []
        try:
            for _ in range(n):
                m, _ = restore(path, lazy=True)
                m.start()
                machines.append(m)
            started = time.perf_counter() - t
            for m in machines:
                m.console.send(b"check\n")
            for m in machines:
                if not m.serial.wait_for("clean after 0 commands", 120):
                    raise RuntimeError("a clone did not read its working set")
            per = (_pss_kib(os.getpid()) - before) / n / 1024
        finally:
            for m in machines:
                m.close()
        report.add(Figure(f"clones in one process, {n} x 1 GiB (64 MiB working set): "
                          "started per second", "clones/s", [n / started],
                          baseline=base_rate.name))
        report.add(Figure(f"clones in one process, {n}: memory per clone after each read "
                          "its working set (PSS growth / n)", "MiB", [per],
                          baseline=base_mem.name))
        # As processes: n `kvmguest restore --lazy`, started at once.
        argv = [sys.executable, "-m", "kvmguest", "restore", "--lazy", "--console-input",
                path]
        t = time.perf_counter()
        procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL) for _ in range(n)]
        try:
            for p in procs:
                if b"ready (from the snapshot" not in p.stdout.readline():
                    raise RuntimeError("a clone process did not start")
            started = time.perf_counter() - t
            for p in procs:
                p.stdin.write(b"check\n")
                p.stdin.flush()
            for p in procs:
                if b"clean after 0 commands" not in p.stdout.readline():
                    raise RuntimeError("a clone process did not read its working set")
            pss = [_pss_kib(p.pid) / 1024 for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()
        report.add(Figure(f"clone processes, {n} x `kvmguest restore --lazy`: started per "
                          "second", "clones/s", [n / started], baseline=proc_rate.name))
        report.add(Figure(f"clone processes, {n}: PSS per clone after each read its working "
                          "set", "MiB", pss, baseline=proc_mem.name,
                          note=f"snapshot {size >> 20} MiB apparent"))


def run(report: Report, work: str, runs: int, quick: bool = False) -> None:
    create_to_exit(report, runs)
    process(report, runs)
    lazy_restores(report, work, [GiB] if quick else [GiB, 4 * GiB, 16 * GiB], runs)
    clones(report, work, [1, 8] if quick else [1, 8, 32])
