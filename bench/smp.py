"""Several vCPUs: boot to exit with 1/2/4 vCPUs, IPI round trip, timer ticks delivered per
tick asked for, and the live save's downtime and a reset in place with 1/2/4 vCPUs (each
with the 1-vCPU figure of the same run as its baseline)."""

from __future__ import annotations

import re
import statistics
import tempfile
import time

from kvmguest.kvm import Kvm
from kvmguest.machine import Machine
from migrate.precopy import live_save

from .common import GUESTS, Figure, Report

SMP = str(GUESTS / "smp.elf")


def boot_to_exit(kvm: Kvm, n: int) -> float:
    t = time.perf_counter()
    m = Machine(SMP, kvm=kvm, vcpus=n, cmdline="pages=16 passes=1 quiet")
    try:
        assert m.run(timeout=60).exit_code == 0
        return (time.perf_counter() - t) * 1e3
    finally:
        m.close()


def ipi_seconds(kvm: Kvm, rounds: int) -> float:
    m = Machine(str(GUESTS / "ipi.elf"), kvm=kvm, vcpus=2, cmdline=f"rounds={rounds} quiet")
    try:
        r = m.run(timeout=120)
        assert r.exit_code == 0 and "all delivered once" in r.console
        return r.seconds
    finally:
        m.close()


def timer_ratios(kvm: Kvm, n: int) -> tuple[float, float]:
    """(LAPIC ticks counted / asked for, PIT ticks counted / wall-clock PIT periods)."""
    m = Machine(str(GUESTS / "timer.elf"), kvm=kvm, vcpus=n, cmdline="ticks=200 lapic_us=2000")
    try:
        r = m.run(timeout=120)
        assert r.exit_code == 0, r.console
        pit, lapic = map(int, re.findall(r"timer: pit (\d+) ok, cpu0 lapic (\d+)", r.console)[-1])
        return lapic / (pit * 5), pit / 100.0 / max(r.seconds - 0.15, 1e-3)
    finally:
        m.close()


def downtime(n: int, work: str) -> tuple[float, dict]:
    """A live save's downtime (ms) and where it went (SaveReport.downtime_parts)."""
    m = Machine(SMP, vcpus=n, cmdline="pages=256 passes=0 quiet")
    try:
        m.start()
        assert m.serial.wait_for("smp: pass 16 ok", 60)
        report = live_save(m, f"{work}/smp-{n}.snap", then="stop")
        return report.downtime_ms, report.downtime_parts
    finally:
        m.close()


def resets(n: int, work: str, runs: int) -> tuple[list[float], list[int]]:
    """Resets in place of the running smp guest to a snapshot of it (ms, pages each)."""
    from migrate.reader import restore
    from migrate.reset import ResetPoint
    path = f"{work}/reset-{n}.snap"
    m = Machine(SMP, vcpus=n, cmdline="pages=256 passes=0 quiet")
    try:
        m.start()
        assert m.serial.wait_for("smp: pass 16 ok", 60)
        live_save(m, path, then="stop")
    finally:
        m.close()
    m, _ = restore(path)
    try:
        point = ResetPoint(m, path)
        m.start()
        samples, pages = [], []
        for _ in range(max(runs, 15)):
            time.sleep(0.02)                    # the guest rewrites its working set
            pages.append(point.reset())
            samples.append(point.last_ms)
        point.close()
        return samples, pages
    finally:
        m.close()


def parts_note(parts: list[dict]) -> str:
    """The median of each part of the downtime, for the figure's note."""
    return "median " + ", ".join(
        f"{k} {statistics.median(p[k] for p in parts):.2f}" for k in parts[0]) + " ms"


def run(report: Report, runs: int) -> None:
    kvm = Kvm()
    base = None
    for n in (1, 2, 4):
        samples = [boot_to_exit(kvm, n) for _ in range(runs + 1)][1:]
        fig = report.add(Figure(f"smp guest: create machine to exit, {n} vCPU(s)", "ms",
                                samples, baseline=base))
        base = base or fig.name
    exit_rtt = "port-I/O exit round trip (guest out -> Python -> guest)"
    if not any(f.name == exit_rtt for f in report.figures):     # run alone: measure it here
        from .boot import ioloop
        report.add(Figure(exit_rtt, "us", [(ioloop(kvm, 20000) - ioloop(kvm, 0)) * 1e3 / 20000
                                           for _ in range(3)]))
    rounds = 400
    per = [(ipi_seconds(kvm, rounds) - ipi_seconds(kvm, 1)) / (rounds - 1) * 1e6
           for _ in range(runs)]
    report.add(Figure("IPI round trip (fixed IPI there and back, 2 vCPUs)", "us", per,
                      baseline=exit_rtt))
    lapic, pit = zip(*(timer_ratios(kvm, 2) for _ in range(runs)))
    report.add(Figure("LAPIC timer ticks delivered per tick asked for (2 vCPUs, 500 Hz)",
                      "ratio", list(lapic), target="1.0 +- 0.05",
                      met=abs(sorted(lapic)[len(lapic) // 2] - 1) <= 0.05))
    report.add(Figure("PIT ticks delivered per wall-clock tick (100 Hz)", "ratio", list(pit),
                      target="1.0 +- 0.1", met=abs(sorted(pit)[len(pit) // 2] - 1) <= 0.1))
    with tempfile.TemporaryDirectory(prefix="bench-", dir=str(GUESTS.parent.parent / "bench")) as work:
        one = None
        for n in (1, 2, 4):
            samples, parts = zip(*(downtime(n, work) for _ in range(max(runs, 5))))
            fig = Figure(f"live save downtime, smp guest, {n} vCPU(s)", "ms", list(samples),
                         baseline=one, note=parts_note(parts))
            if n == 4:
                med = sorted(samples)[len(samples) // 2]
                fig.target = "<= 2 ms and <= 2x 1 vCPU"
                fig.met = med <= 2.0 and med <= 2 * report.get(one).median
            report.add(fig)
            one = one or fig.name
        one = None
        for n in (1, 2, 4):
            samples, pages = resets(n, work, runs)
            fig = Figure(f"reset in place, smp guest, {n} vCPU(s), "
                         f"~{statistics.median(pages):.0f} pages", "ms", samples, baseline=one)
            if n == 4:
                fig.target = "<= 2x 1 vCPU"
                fig.met = fig.median <= 2 * report.get(one).median
            report.add(fig)
            one = one or fig.name
