"""Dirty tracking and continuous checkpoints (`python -m bench --only dirty`).

- harvest cost against RAM size, both backends, the guest touching the same 2000 pages:
  the backend's own work (bitmap: GET+CLEAR ioctls; ring: reading the rings and
  KVM_RESET_DIRTY_RINGS) is the same-run baseline of a client's take();
- checkpoint pause and write time against pages changed; checkpoints per second for a
  guest dirtying ~1000 pages between checkpoints, against Firecracker-style full
  snapshots (our own live save, the guest running on) in the same run;
- the same working set in 1 GiB and 16 GiB of RAM: checkpoint time should not care.
"""

from __future__ import annotations

import os
import tempfile
import time

from kvmguest.machine import Machine
from migrate.checkpoint import Checkpointer
from migrate.precopy import live_save

from .common import GUESTS, ROOT, Figure, Report

GiB, MiB = 1 << 30, 1 << 20
WS_BASE = 16 * MiB


def _guest(ram: int, pages: int, dirty_log: str, quiet: bool = True) -> Machine:
    m = Machine(str(GUESTS / "dirty.elf"), memory=ram, dirty_log=dirty_log,
                cmdline=f"pages={pages} base={WS_BASE} passes=0" + (" quiet" if quiet else ""))
    m.start()
    if not m.serial.wait_for("dirty: range", 60):
        raise RuntimeError("dirty guest did not start")
    return m


def _series(m: Machine, path: str, runs: int) -> list:
    """The figures of checkpoints 2.. of a fresh chain, 50 ms apart."""
    c = Checkpointer(m, path)
    c.take()
    stats = []
    for _ in range(max(runs, 10)):
        time.sleep(0.05)
        stats.append(c.take())
    c.close()
    return stats


def harvest(report: Report, sizes, runs: int) -> dict:
    curves = {}
    for backend in ("bitmap", "ring"):
        for ram in sizes:
            m = _guest(ram, 2000, backend)
            try:
                client = m.dirty.open("bench")
                raw, ours = [], []
                for _ in range(max(runs, 15)):
                    time.sleep(0.02)
                    t = time.perf_counter()
                    if backend == "bitmap":
                        for r in m.memory.regions:
                            m.dirty.backend.harvest_kvm(r)
                    else:
                        m.dirty.harvest()           # what the backend and tracker do
                    raw.append((time.perf_counter() - t) * 1e3)
                    time.sleep(0.02)
                    t = time.perf_counter()
                    client.take()
                    ours.append((time.perf_counter() - t) * 1e3)
                what = "GET+CLEAR ioctls" if backend == "bitmap" else "ring read + reset"
                base = report.add(Figure(f"{backend} {ram >> 30} GiB: raw {what}", "ms", raw))
                fig = report.add(Figure(f"{backend} {ram >> 30} GiB: client take()", "ms", ours,
                                        baseline=base.name))
                curves.setdefault(backend, []).append((ram >> 30, fig.median))
            finally:
                m.close()
    return curves


def harvest_vs_pages(report: Report, runs: int) -> None:
    """Harvest cost against pages dirtied (4 GiB of RAM), both backends."""
    for backend in ("bitmap", "ring"):
        for pages in (100, 1000, 10000):
            m = _guest(4 * GiB, pages, backend)
            try:
                client = m.dirty.open("bench")
                samples = []
                for _ in range(max(runs, 10)):
                    time.sleep(0.05)
                    t = time.perf_counter()
                    client.take()
                    samples.append((time.perf_counter() - t) * 1e3)
                report.add(Figure(f"{backend} 4 GiB, {pages}-page working set: client take()",
                                  "ms", samples))
            finally:
                m.close()


def checkpoints(report: Report, work: str, runs: int) -> None:
    for pages in (100, 1000, 10000):
        m = _guest(256 * MiB, pages, "auto")
        try:
            stats = _series(m, os.path.join(work, "c.ckpt"), runs)
            report.add(Figure(f"checkpoint, {pages} pages changed: guest paused", "ms",
                              [s.pause_ms for s in stats],
                              target="<= 2 ms" if pages <= 1000 else None,
                              met=(sorted(s.pause_ms for s in stats)[len(stats) // 2] <= 2.0)
                              if pages <= 1000 else None))
            report.add(Figure(f"checkpoint, {pages} pages changed: written", "ms",
                              [s.write_ms for s in stats]))
        finally:
            m.close()
    # Sustained rate at ~1000 dirtied pages between checkpoints, against full snapshots.
    m = _guest(256 * MiB, 1000, "auto")
    try:
        c = Checkpointer(m, os.path.join(work, "rate.ckpt"))
        c.take()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 3:
            c.take()
            n += 1
        c.close()
        full, t0 = 0, time.perf_counter()
        path = os.path.join(work, "full.snap")
        while time.perf_counter() - t0 < 3:
            live_save(m, path, then="continue", downtime_ms=50)
            full += 1
        base = report.add(Figure("full snapshots (our live save) per second, 256 MiB",
                                 "1/s", [full / 3]))
        report.add(Figure("checkpoints per second, ~1000 pages each, 256 MiB", "1/s", [n / 3],
                          baseline=base.name))
    finally:
        m.close()
    # The same working set, 1 GiB against 16 GiB of RAM.
    times = {}
    for ram in (GiB, 16 * GiB):
        m = _guest(ram, 1000, "auto")
        try:
            stats = _series(m, os.path.join(work, f"{ram}.ckpt"), runs)
            times[ram] = report.add(Figure(
                f"checkpoint of 1000 pages in {ram >> 30} GiB: pause + write", "ms",
                [s.pause_ms + s.write_ms for s in stats],
                baseline=None if ram == GiB else times[GiB].name,
                target=None if ram == GiB else "<= 1.3x 1 GiB"))
            if ram != GiB:
                times[ram].met = times[ram].median <= 1.3 * times[GiB].median
        finally:
            m.close()
            os.unlink(os.path.join(work, f"{ram}.ckpt"))


def resets(report: Report, work: str, runs: int) -> None:
    """Reset in place of a guest dirtying a 100-page working set, 1 and 16 GiB, next to
    a fresh lazy restore of the same file and a cold boot of `hello`, same run."""
    from migrate.reader import restore
    from migrate.reset import ResetPoint
    first = None
    for ram in (GiB, 16 * GiB):
        src = _guest(ram, 100, "auto")
        path = os.path.join(work, f"reset-{ram}.snap")
        try:
            live_save(src, path, then="stop", downtime_ms=50)
        finally:
            src.close()
        lazy = []
        for _ in range(max(runs, 5)):
            t = time.perf_counter()
            m, _ = restore(path, lazy=True)
            lazy.append((time.perf_counter() - t) * 1e3)
            m.close()
        m, _ = restore(path)
        try:
            point = ResetPoint(m, path)
            m.start()
            samples, pages, floor = [], [], []
            for _ in range(max(runs, 15)):
                time.sleep(0.02)
                point.reset()
                samples.append(point.last_ms)
                pages.append(point.last_pages)
                time.sleep(0.02)
                t = time.perf_counter()      # what any reset pays the host to stop the guest
                m.pause_all()
                m.resume_all()
                floor.append((time.perf_counter() - t) * 1e3)
            point.close()
        finally:
            m.close()
        report.add(Figure(f"pause + resume of the running guest, {ram >> 30} GiB (the host's "
                          "floor under any reset)", "ms", floor))
        base = report.add(Figure(f"lazy restore of the {ram >> 30} GiB snapshot", "ms", lazy))
        fig = Figure(f"reset in place, {ram >> 30} GiB, ~{sorted(pages)[len(pages) // 2]} "
                     "dirty pages", "ms", samples, baseline=base.name,
                     target="<= 1 ms" if ram == GiB else "<= 1.3x the 1 GiB reset")
        fig.met = fig.median <= 1.0 if ram == GiB else fig.median <= 1.3 * first.median
        report.add(fig)
        first = first or fig
        os.unlink(path)
    boots = []
    for _ in range(max(runs, 5)):
        t = time.perf_counter()
        with Machine(str(GUESTS / "hello.elf")) as h:
            h.run(timeout=10)
        boots.append((time.perf_counter() - t) * 1e3)
    report.add(Figure("cold boot of hello to its exit, 64 MiB", "ms", boots))


def run(report: Report, runs: int, quick: bool = False) -> dict:
    work = tempfile.mkdtemp(prefix="bench-", dir=ROOT / "bench")
    try:
        curves = harvest(report, [GiB, 4 * GiB] if quick else [GiB, 4 * GiB, 16 * GiB,
                                                                 64 * GiB], runs)
        harvest_vs_pages(report, runs)
        checkpoints(report, work, runs)
        resets(report, work, runs)
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return curves
