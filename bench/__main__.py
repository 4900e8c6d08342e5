"""`make bench` / `python -m bench [--quick]`: prints a table, writes bench/results/."""

from __future__ import annotations

import argparse
import time

from . import boot
from .common import Report


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--quick", action="store_true", help="fewer runs (under two minutes)")
    p.add_argument("--runs", type=int, default=None, help="runs per figure")
    args = p.parse_args()
    runs = args.runs or (3 if args.quick else 9)
    print(f"kvmguest benchmarks, {runs} runs per figure (median, min, max); "
          f"expect about {1 if args.quick else 2} minute(s)")
    report = Report()
    print("| figure | median | min | max | runs | vs baseline (same run) | target |")
    t = time.monotonic()
    boot.run(report, runs)
    path = report.write("kvmguest benchmark results")
    print(f"\nwrote {path} and results.json in {time.monotonic() - t:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
