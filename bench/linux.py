"""Debian's kernel on kvmguest and on QEMU 10, side by side in one run
(`python -m bench --only linux`, ~20 minutes here: one whole boot).

Same kernel (Debian's cloud bzImage; also the PVH vmlinux inside it), same initramfs,
same command line (kvmguest.front.testing.linux's, with what an emulating host needs, which
kvmguest adds itself and QEMU is given), 2 vCPUs, 512 MiB:
- boot, from process start to each milestone the console shows: `Linux version`
  (start_kernel), the `x86/fpu:` line (the last QEMU reaches on this host: the next
  instruction is the alternatives self-test's int3, which its KVM cannot emulate and
  QEMU treats as fatal; kvmguest completes it) and `Run /init` (kvmguest only here);
- restore of the late-boot point (live-saved at `Freeing unused kernel image`, ~50 s
  before /init) to its first instruction, eager and lazy, against the boot it replaces;
- reset in place of the booted kernel to that point, against the restore it replaces.
The boots run once each (a kvmguest boot takes ~15 minutes here): single samples."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kvmguest.arch.x86.quirks import (EMULATING_HOST_CMDLINE, EMULATING_HOST_CPU,
                                     emulating_host)
from kvmguest.front.testing.linux import CMDLINE, MACHINE, RUN_INIT, build_initramfs

from .common import ROOT, Figure, Report
from .qemu import qemu_version
from .start import first_instruction

BANNER, FPU = "Linux version", "x86/fpu: x87 FPU will use"
LATE_BOOT = "Freeing unused kernel image (initmem)"
TIMEOUT = 2400


def _timeline(argv: list[str], marks: list[str], on_line=None, stop_at: str | None = None,
              timeout: float = TIMEOUT, stop_also=()) -> tuple[dict[str, float], str]:
    """Start ``argv``; seconds from its start to the first console line holding each
    mark, and the last lines it printed. ``on_line(line)`` sees every line; the process
    is killed at ``stop_at`` (or any of ``stop_also``: a failed boot) or ``timeout``."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
    seen: dict[str, float] = {}
    tail: list[str] = []
    try:
        for raw in p.stdout:
            line = raw.decode(errors="replace")
            tail = (tail + [line])[-20:]
            for mark in marks:
                if mark not in seen and mark in line:
                    seen[mark] = time.monotonic() - t0
            if on_line:
                on_line(line)
            if (stop_at and stop_at in line) or any(s in line for s in stop_also) \
                    or time.monotonic() - t0 > timeout:
                break
    finally:
        p.kill()
        p.wait()
    return seen, "".join(tail)


def boot_figure(report: Report, name: str, seconds: float, base: str | None) -> None:
    """A boot time, compared with QEMU's figure ``base`` (target: no slower) where the
    same run has it."""
    compared = base is not None and any(f.name == base for f in report.figures)
    fig = Figure(name, "s", [seconds], baseline=base if compared else None,
                 target="<= QEMU's" if compared else None)
    if compared:
        fig.met = fig.median <= report.get(base).median
    report.add(fig)


def _qemu(qemu: str, kernel: Path, initrd: Path) -> list[str]:
    # -cpu host without arch-capabilities: QEMU 10 aborts here setting MSR 0x10a.
    emulating = emulating_host()
    cpu = "host,-arch-capabilities" + ("," + EMULATING_HOST_CPU if emulating else "")
    cmdline = CMDLINE + (" " + EMULATING_HOST_CMDLINE if emulating else "")
    return [qemu, "-accel", "kvm", "-cpu", cpu, "-smp", "2", "-m", "512", "-nographic",
            "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]


def _kvmguest(kernel: Path, initrd: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "kvmguest", "run", str(kernel), *MACHINE, "--initrd",
            str(initrd), "--cmdline", CMDLINE, "--timeout", str(TIMEOUT), *map(str, extra)]


def run(report: Report, work: str, runs: int) -> None:
    from kvmguest.arch.x86 import linux
    p = subprocess.run([str(ROOT / "scripts" / "fetch-linux")], capture_output=True,
                       text=True)
    if p.returncode != 0:
        print(f"Debian's kernel could not be fetched ({p.stderr.strip()}): no Linux figures")
        return
    vmlinuz, w = Path(p.stdout.strip()), Path(work)
    vmlinux = w / "vmlinux"
    vmlinux.write_bytes(linux.vmlinux_from_bzimage(str(vmlinuz), vmlinuz.read_bytes()))
    initrd = build_initramfs(w)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or qemu_version(qemu)[0] < 10:
        print("QEMU 10 is not installed (scripts/setup-qemu installs it as root): "
              "kvmguest alone")
        qemu = None
    rows = []            # (who, {mark: seconds}, how it ended), QEMU's (the baselines) first

    def measured(who: str, seen: dict, note: str = "") -> dict:
        rows.append((who, seen, note))
        print(f"  {who}: " + ", ".join(f"{m!r} at {t:.1f} s" for m, t in seen.items())
              + (f"; {note}" if note else ""), flush=True)     # raw, as it comes
        return seen
    for name, kernel in (("bzImage", vmlinuz), ("PVH vmlinux", vmlinux)):
        if qemu:
            seen, tail = _timeline(_qemu(qemu, kernel, initrd), [BANNER, FPU],
                                   stop_at="emulation failure")
            measured(f"QEMU 10, {name}", seen, "stopped: emulation failure" if
                     "emulation failure" in tail else tail[-200:])
    # kvmguest: the vmlinux to QEMU's last line; the bzImage all the way, live-saved late.
    measured("kvmguest, PVH vmlinux",
             _timeline(_kvmguest(vmlinux, initrd), [BANNER, FPU], stop_at=FPU)[0])
    snap, sock = w / "late-boot.snap", w / "ctl.sock"
    saving: list[subprocess.Popen] = []

    def save_late(line: str) -> None:
        if LATE_BOOT in line and not saving:
            saving.append(subprocess.Popen(
                [sys.executable, "-m", "kvmguest", "save", "--control", str(sock),
                 str(snap), "--then", "continue"], cwd=ROOT, stdout=subprocess.DEVNULL))
    seen = measured("kvmguest, bzImage",
                    _timeline(_kvmguest(vmlinuz, initrd, "--control", sock),
                              [BANNER, FPU, LATE_BOOT, RUN_INIT], on_line=save_late)[0])
    assert saving and saving[0].wait(600) == 0, "the late-boot save failed"
    labels = {BANNER: "start_kernel", FPU: "x86/fpu (QEMU's last line here)",
              RUN_INIT: "Run /init"}
    for who, marks, note in rows:
        kernel = who.split(", ")[1]
        for mark, label in labels.items():
            if mark not in marks:
                continue
            boot_figure(report, f"{who}: boot to {label}", marks[mark],
                        f"QEMU 10, {kernel}: boot to {label}" if who.startswith("kvmguest")
                        else None)
        if note:
            print(f"{who}: never reaches Run /init here ({note})")
    _restores(report, snap, seen[LATE_BOOT], runs)


def _restores(report: Report, snap: Path, boot_s: float, runs: int) -> None:
    from migrate.reader import restore
    from migrate.reset import ResetPoint
    booted = report.add(Figure("kvmguest, bzImage: boot to the late-boot point", "ms",
                               [boot_s * 1e3]))
    for lazy in (False, True):
        first_instruction(str(snap), lazy)                            # warm the cache
        fig = Figure(f"restore of the late-boot point ({'lazy' if lazy else 'eager'}, warm): "
                     "call to the kernel's first instruction", "ms",
                     [first_instruction(str(snap), lazy) for _ in range(max(runs, 5))],
                     baseline=booted.name, target="<= 50 ms")
        fig.met = fig.median <= 50
        report.add(fig)
    eager = report.figures[-2].name
    m, _ = restore(str(snap), lazy=True)
    try:
        point = ResetPoint(m, str(snap))
        watch = m.dirty.open("bench")
        m.start()
        times, pages = [], []
        for _ in range(max(runs, 10)):
            written: set = set()
            while len(written) < 50 and m.running:             # it has run on a little
                m.dirty.harvest()
                for slot, ps in watch.take().items():
                    written.update((slot, int(p)) for p in ps)
                time.sleep(0.001)
            t = time.perf_counter()
            pages.append(point.reset())
            times.append((time.perf_counter() - t) * 1e3)
            watch.take()
        fig = Figure("reset in place of the booted kernel to the late-boot point", "ms",
                     times, baseline=eager, target="<= 2 ms at <= 100 pages",
                     note=f"pages copied back: {min(pages)}-{max(pages)}")
        small = [t for t, n in zip(times, pages) if n <= 100]
        fig.met = bool(small) and sorted(small)[len(small) // 2] <= 2
        report.add(fig)
        point.close()
    finally:
        m.close()
    os.unlink(snap)
