"""Live migration between two machines in this process over a Unix socket and loopback
TCP (`python -m bench --only migrate`): an idle 1 GiB guest (the dirty guest, 64 pages,
kept running), p50 and p95 over ``runs`` migrations of: the total (live save start to
the destination's acknowledgement) and the downtime end to end (the source's final pause
to the destination's first KVM_RUN). Baseline: a live save of the same guest to a file,
its total and its downtime, in the same run. QEMU is not compared yet (issue 28)."""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import threading
import time

from .common import ROOT, Figure, Report

GiB = 1 << 30


def _p95(samples: list[float]) -> float:
    return sorted(samples)[max(0, int(round(0.95 * len(samples))) - 1)]


def _one(kind: str, work: str) -> tuple[float, float]:
    from kvmguest.front.control import listen_for_migration
    from kvmguest.machine import Machine
    from migrate.live import restore_incoming
    from migrate.precopy import live_save
    if kind == "unix":
        address = f"unix:{os.path.join(work, 'mig.sock')}"
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"tcp:127.0.0.1:{s.getsockname()[1]}"
    server = listen_for_migration(address)
    got: dict = {}

    def destination():
        try:
            m, _ = restore_incoming(server)
            m.start()
            while m.first_run_at is None and m.running:
                time.sleep(0.0001)     # as bench.start.first_instruction: no GIL-holding spin
            got["first_run"] = m.first_run_at
            m.stop()
            m.close()
        finally:
            server.close()
    t = threading.Thread(target=destination)
    t.start()
    guest = str(ROOT / "guests" / "build" / "dirty.elf")
    with Machine(guest, memory=GiB, cmdline="pages=64 passes=0 quiet") as m:
        m.start()
        m.serial.wait_for("dirty: pass 16 ok", 120)
        report = live_save(m, address, format="migrate", then="stop")
    t.join(120)
    if kind == "unix":
        os.unlink(address[5:])
    return report.total_seconds * 1e3, (got["first_run"] - report.paused_at) * 1e3


def _file(work: str) -> tuple[float, float]:
    from kvmguest.machine import Machine
    from migrate.precopy import live_save
    guest = str(ROOT / "guests" / "build" / "dirty.elf")
    with Machine(guest, memory=GiB, cmdline="pages=64 passes=0 quiet") as m:
        m.start()
        m.serial.wait_for("dirty: pass 16 ok", 120)
        report = live_save(m, os.path.join(work, "g.snap"), then="stop")
    return report.total_seconds * 1e3, report.downtime_ms


def run(report: Report, runs: int) -> None:
    runs = max(runs, 20)
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as work:
        base = [_file(work) for _ in range(runs)]
        total_base = report.add(Figure("live save of an idle 1 GiB guest to a file: total",
                                       "ms", [t for t, _ in base],
                                       note=f"p95 {_p95([t for t, _ in base]):.1f}"))
        down_base = report.add(Figure("live save of an idle 1 GiB guest to a file: downtime",
                                      "ms", [d for _, d in base],
                                      note=f"p95 {_p95([d for _, d in base]):.2f}"))
        for kind in ("unix", "tcp"):
            samples = [_one(kind, work) for _ in range(runs)]
            totals, downs = [t for t, _ in samples], [d for _, d in samples]
            fig = Figure(f"migration of an idle 1 GiB guest over {kind}: total", "ms", totals,
                         baseline=total_base.name, target="<= 150 ms",
                         note=f"p95 {_p95(totals):.1f}")
            fig.met = statistics.median(totals) <= 150
            report.add(fig)
            fig = Figure(f"migration of an idle 1 GiB guest over {kind}: downtime (source "
                         "pause to destination's first KVM_RUN)", "ms", downs,
                         baseline=down_base.name, target="<= 1 ms",
                         note=f"p95 {_p95(downs):.2f}")
            fig.met = statistics.median(downs) <= 1
            report.add(fig)
