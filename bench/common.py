"""Measuring helpers: repeated runs, median/min/max, and a results table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests" / "build"
RESULTS = ROOT / "bench" / "results"


@dataclass
class Figure:
    name: str
    unit: str
    samples: list[float]
    baseline: str | None = None          # name of the Figure this one is compared with
    target: str | None = None            # e.g. "<= 10 ms"
    met: bool | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        print(self.row(fig), flush=True)
        return fig

    def get(self, name: str) -> Figure:
        return next(f for f in self.figures if f.name == name)

    def ratio(self, fig: Figure) -> str:
        if not fig.baseline:
            return "baseline"
        base = self.get(fig.baseline)
        return f"{fig.median / base.median:.2f}x {base.name}"

    def row(self, f: Figure) -> str:
        target = f.target or ""
        if f.met is not None:
            target += " (met)" if f.met else " (NOT met)"
        return (f"| {f.name} | {f.median:.3f} {f.unit} | {min(f.samples):.3f} | "
                f"{max(f.samples):.3f} | {len(f.samples)} | {self.ratio(f)} | {target} |"
                + (f" {f.note}" if f.note else ""))

    def markdown(self) -> str:
        head = ("| figure | median | min | max | runs | vs baseline (same run) | target |\n"
                "|---|---|---|---|---|---|---|")
        return head + "\n" + "\n".join(self.row(f) for f in self.figures)

    def write(self, title: str, section: str = "") -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        machine = describe_machine()
        stem = f"results-{section}" if section else "results"
        (RESULTS / f"{stem}.json").write_text(json.dumps(
            {"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "figures": [asdict(f) | {"median": f.median} for f in self.figures]}, indent=2))
        md = RESULTS / f"{stem}.md"
        md.write_text(f"# {title}\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                      f"{machine}\n\n{self.markdown()}\n")
        return md


def describe_machine() -> str:
    from kvmguest.kvm import backend_module
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{os.cpu_count()} cores ({cpu}), {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GiB, "
            f"Linux {platform.release()}, KVM backend {backend_module()}, Python {platform.python_version()}")


def timed(fn, runs: int, warmup: int = 1) -> list[float]:
    """Run fn() warmup+runs times; the seconds of the last `runs`, in milliseconds."""
    out = []
    for i in range(warmup + runs):
        t = time.perf_counter()
        fn()
        dt = (time.perf_counter() - t) * 1e3
        if i >= warmup:
            out.append(dt)
    return out


def run_cmd(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, **kw)
