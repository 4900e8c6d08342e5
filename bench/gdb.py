"""gdb round trips (`python -m bench --only gdb`): the same gdb script on the same guest
(guests/build/debug.elf) against QEMU's gdbstub (the baseline, measured first in the
same run) and kvmguest's, in alternating rounds so that the host's drift falls on both
alike. Timed inside gdb (its Python), per operation:

- ``stepi``: one instruction stepped, gdb's register reads included;
- ``continue`` to a hardware breakpoint (``hbreak tick``, hit every few instructions);
- ``continue`` to a software breakpoint (``break tick``): kvmguest only; QEMU kills the
  guest on this host (KVM cannot emulate the ``int3`` at CPL0 and QEMU treats that as
  fatal), so it is compared with QEMU's hardware breakpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from .common import GUESTS, ROOT, Figure, Report

DEBUG = GUESTS / "debug.elf"
STEPS, HITS, ROUNDS = 150, 100, 4     # per round; QEMU and kvmguest alternate rounds

SCRIPT = """set pagination off
set confirm off
target remote {target}
hbreak work
continue
delete
python
import gdb, time
def timed(command, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        gdb.execute(command, to_string=True)
        out.append((time.perf_counter() - t) * 1e3)
    return ",".join("%.4f" % x for x in out)
print("@stepi=" + timed("stepi", {steps}))
gdb.execute("hbreak tick", to_string=True)
print("@hbreak=" + timed("continue", {hits}))
gdb.execute("delete", to_string=True)
if {software}:
    gdb.execute("break tick", to_string=True)
    print("@break=" + timed("continue", {hits}))
end
kill
"""


def _measure(target: str, software: bool, work: str) -> dict[str, list[float]]:
    script = os.path.join(work, "bench.gdb")
    with open(script, "w") as f:
        f.write(SCRIPT.format(target=target, steps=STEPS, hits=HITS, software=software))
    r = subprocess.run(["gdb", "-batch", "-nx", "-x", script, str(DEBUG)], capture_output=True,
                       text=True, timeout=600)
    found = dict(re.findall(r"^@(\w+)=(\S+)$", r.stdout, re.M))
    if "stepi" not in found:
        raise RuntimeError(f"gdb against {target} measured nothing: {r.stdout[-800:]}"
                           f"{r.stderr[-800:]}")
    return {k: [float(x) for x in v.split(",")] for k, v in found.items()}


def _qemu(work: str) -> dict[str, list[float]]:
    sock = os.path.join(work, "qemu-gdb.sock")
    q = subprocess.Popen(
        [shutil.which("qemu-system-x86_64"), "-accel", "kvm", "-cpu", "host,-arch-capabilities",
         "-m", "64M", "-display", "none", "-nodefaults", "-no-reboot", "-kernel", str(DEBUG),
         "-append", "rounds=100000", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-serial", "none", "-chardev", f"socket,id=g,path={sock},server=on,wait=off",
         "-gdb", "chardev:g", "-S"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if q.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start: {q.stderr.read().decode()[-500:]}")
            time.sleep(0.01)
        return _measure(sock, False, work)
    finally:
        q.kill()
        q.wait()


def _ours(work: str) -> dict[str, list[float]]:
    sock = os.path.join(work, "kvmguest-gdb.sock")
    p = subprocess.Popen([sys.executable, "-m", "kvmguest", "run", str(DEBUG), "-q",
                          "--cmdline", "rounds=100000", "--gdb", sock], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while "waits for gdb" not in (line := p.stderr.readline()):
            if not line:
                raise RuntimeError("kvmguest ended before gdb could attach")
        return _measure(sock, True, work)
    finally:
        p.kill()
        p.wait()


def run(report: Report) -> None:
    if shutil.which("gdb") is None:
        print("gdb not installed (apt-get install gdb): no gdb figures")
        return
    work = tempfile.mkdtemp(prefix="bench-gdb-")
    try:
        names = {"stepi": "gdb stepi round trip", "hbreak": "gdb continue to hbreak",
                 "break": "gdb continue to break (software)"}
        qemu = shutil.which("qemu-system-x86_64")
        if not qemu:
            print("QEMU not installed: kvmguest's gdb figures without a baseline")
        theirs: dict[str, list[float]] = {}
        ours: dict[str, list[float]] = {}
        for _ in range(ROUNDS):
            for side, measure in ((theirs, _qemu if qemu else None), (ours, _ours)):
                if measure is not None:
                    for key, samples in measure(work).items():
                        side.setdefault(key, []).extend(samples)
        for key in ("stepi", "hbreak") if theirs else ():
            report.add(Figure(f"{names[key]} (QEMU gdbstub)", "ms", theirs[key]))
        for key in ("stepi", "hbreak", "break"):
            base = f"{names['hbreak' if key == 'break' else key]} (QEMU gdbstub)"
            fig = Figure(f"{names[key]} (kvmguest)", "ms", ours[key],
                         baseline=base if theirs else None, target="faster than QEMU")
            if theirs:
                fig.met = fig.median < report.get(base).median
            if key == "break":
                fig.note = "QEMU's software breakpoint kills the guest on this host"
            report.add(fig)
    finally:
        shutil.rmtree(work, ignore_errors=True)
