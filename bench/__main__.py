"""`make bench` / `python -m bench [--quick]`: prints a table, writes bench/results/
(results.md, results.json, PNG plots). Every figure is shown with the baseline it was
measured against in the same run."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

from . import boot, devices, dirty, disk, gdb, linux, migration, plots, qemu, smp, start
from .common import RESULTS, ROOT, Report

GiB, MiB = 1 << 30, 1 << 20


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--quick", action="store_true", help="smaller sizes, under two minutes")
    p.add_argument("--runs", type=int, default=None, help="runs per figure (default 3)")
    p.add_argument("--no-qemu", action="store_true", help="skip the QEMU side by side")
    p.add_argument("--only", choices=("boot", "smp", "dirty", "start", "qemu", "linux", "gdb",
                                      "devices", "migrate"),
                   help="only these figures")
    args = p.parse_args()
    runs = args.runs or 3
    if args.quick:
        sizes, lazy_sizes, configs, minutes = [GiB], [GiB, 4 * GiB], [(False, 2), (True, 2)], 2
    else:
        sizes, lazy_sizes = [GiB, 4 * GiB], [GiB, 4 * GiB, 16 * GiB]
        configs, minutes = [(False, 1), (False, 2), (True, 1), (True, 2)], 20
    print(f"kvmguest benchmarks ({'quick' if args.quick else 'full'}): {runs} runs per figure, "
          f"median [min, max]; expect about {minutes} minutes", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-", dir=ROOT / "bench")   # on the project's disk
    report = Report()
    t0 = time.monotonic()
    print("| figure | median | min | max | runs | vs baseline (same run) | target |")
    if args.only == "dirty":
        curves = dirty.run(report, runs, args.quick)
        print(f"\nwrote {report.write('kvmguest benchmark results: dirty', 'dirty')}")
        plots.harvest_curve(curves, RESULTS / "harvest-vs-ram.png")
        return 0
    if args.only == "qemu":
        try:
            qemu.side_by_side(report, work, GiB, 16384 if args.quick else 65536, runs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"\nwrote {report.write('kvmguest benchmark results: QEMU side by side', 'qemu')}")
        return 0
    if args.only == "linux":
        try:
            linux.run(report, work, runs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"\nwrote {report.write('kvmguest benchmark results: Linux', 'linux')}")
        return 0
    if args.only == "devices":
        try:
            devices.run(report, work, runs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"\nwrote {report.write('kvmguest benchmark results: devices', 'devices')}")
        return 0
    if args.only == "migrate":
        from . import live
        live.run(report, runs)
        print(f"\nwrote {report.write('kvmguest benchmark results: live migration', 'migrate')}")
        return 0
    if args.only == "gdb":
        gdb.run(report)
        print(f"\nwrote {report.write('kvmguest benchmark results: gdb', 'gdb')}")
        return 0
    if args.only == "start":
        try:
            start.run(report, work, runs, args.quick)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"\nwrote {report.write('kvmguest benchmark results: start and clones', 'start')}")
        return 0
    if args.only:            # a section alone, with its own results file
        (boot if args.only == "boot" else smp).run(report, max(runs, 5) if args.only ==
                                                   "boot" else runs)
        print(f"\nwrote {report.write(f'kvmguest benchmark results: {args.only}', args.only)}")
        return 0
    try:
        boot.run(report, max(runs, 5))
        smp.run(report, runs)
        ceilings = disk.ceilings(report, work, sizes, runs)
        snaps = migration.save_figures(report, work, sizes, runs, ceilings, configs)
        migration.restore_figures(report, snaps, sizes, runs, ceilings)
        migration.lazy_figures(report, work, lazy_sizes, runs)
        migration.harvest_figures(report, 4 * GiB, runs)
        harvest_curves = dirty.run(report, runs, args.quick)
        start.run(report, work, runs, args.quick)
        curves = migration.size_curve(work, GiB, 8 if args.quick else 16)
        if not args.no_qemu:
            qemu.side_by_side(report, work, GiB, 16384 if args.quick else 65536, runs)
        gdb.run(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = report.write("kvmguest benchmark results")
    (RESULTS / "size-curve.json").write_text(json.dumps(curves))
    plots.size_curve(curves, GiB, RESULTS)
    plots.harvest_curve(harvest_curves, RESULTS / "harvest-vs-ram.png")
    plots.bars(report, [f.name for f in report.figures if "throughput" in f.name
                        or f.name.startswith(("ceiling", "restore"))],
               "Save and restore throughput against this machine's ceilings", "GB/s",
               RESULTS / "throughput.png")
    plots.bars(report, [f.name for f in report.figures if f.name.startswith(("QEMU", "kvmguest ("))
                        and f.unit == "ms"],
               "kvmguest vs QEMU mapped-ram (same guest, same RAM)", "ms", RESULTS / "qemu.png")
    missed = [f for f in report.figures if f.met is False]
    print(f"\nwrote {md} (+ results.json, PNG plots) in {time.monotonic() - t0:.0f} s")
    if missed:
        print("targets NOT met:\n" + "\n".join(f"  - {f.name}: {f.median:.3f} {f.unit} "
                                               f"(target {f.target})" for f in missed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
