"""PNG plots for bench/results/ (matplotlib, headless)."""

from __future__ import annotations

import functools
from pathlib import Path

_said = []


def _optional(plot):
    """A plot is skipped, said once, where matplotlib is not installed (`make bench`
    installs it; `python -m bench` run from a plain `make` venv has no plots)."""
    @functools.wraps(plot)
    def wrapper(*args, **kw):
        try:
            return plot(*args, **kw)
        except ModuleNotFoundError as err:
            if err.name != "matplotlib":
                raise
            if not _said:
                _said.append(True)
                print("plots skipped: matplotlib is not installed "
                      "(make bench installs it: pip install -e '.[bench]')")
            return None
    return wrapper


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@_optional
def size_curve(curves: dict, ram: int, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    mib = 1 << 20
    m, s = curves["mapped"], curves["stream"]
    xs = range(1, len(m["apparent"]) + 1)
    ax.plot(xs, [v / mib for v in m["apparent"]], "o-", label="mapped-ram: apparent size (sparse)")
    ax.plot(xs, [v / mib for v in m["allocated"]], "s-", label="mapped-ram: on disk")
    ax.plot(range(1, len(s["apparent"]) + 1), [v / mib for v in s["apparent"]], "^-",
            label="streaming: file size")
    ax.axhline(ram / mib, color="grey", ls=":", label=f"guest RAM ({ram >> 20} MiB)")
    ax.set_yscale("log")
    ax.set_xlabel("passes written (pre-copy passes + stop-and-copy)")
    ax.set_ylabel("MiB (log scale)")
    ax.set_title("Live save of a guest that keeps re-dirtying memory")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "file-size-vs-passes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@_optional
def bars(report, names: list[str], title: str, unit: str, path: Path) -> Path | None:
    figs = [f for f in report.figures if f.name in names]
    if not figs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(figs) + 1.5))
    ax.barh([f.name for f in figs], [f.median for f in figs],
            xerr=[[f.median - min(f.samples) for f in figs],
                  [max(f.samples) - f.median for f in figs]], color="#4a7fb5")
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@_optional
def harvest_curve(curves: dict, path: Path) -> Path:
    """Harvest cost against RAM size, one line per backend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for backend, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, "o-", label=f"{backend}: client take()")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("guest RAM (GiB), the guest touching the same 2000 pages")
    ax.set_ylabel("ms per harvest")
    ax.set_title("Dirty tracking: bitmap log vs dirty ring")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
