"""Live migration (`python -m bench --only migrate`): the source in this process, the
destination a process of its own (`python -m bench.live ADDRESS`, what `restore
--incoming` does), as two hosts would run them; p50 and p95 over ``runs`` migrations.

- an idle 1 GiB guest (the dirty guest keeping 64 pages busy) over a Unix socket and
  loopback TCP: the total (live save start to the destination's acknowledgement) and the
  downtime end to end (the source's final pause to the destination's first KVM_RUN;
  CLOCK_MONOTONIC, which both processes share), and the source's own downtime (pause to
  the state read: what QEMU's query-migrate calls downtime);
- a guest dirtying 256 MiB of its 1 GiB all the time: downtime and bytes sent per byte
  of RAM, pre-copy switching to post-copy when it stops converging (the default);
- post-copy (`--postcopy`) of that guest: how soon the destination runs after the
  source stops, and the pager's remote fault latency;
- local mode (`--local`, RAM in memfds handed over) of an idle 1 GiB and 8 GiB guest;
- QEMU (qemu-system-x86_64 -accel kvm, the same guest ELF) in the same run: idle over a
  Unix socket and TCP, its total-time and downtime; the dirtying guest, and post-copy.

Baseline: a live save of the same idle guest to a file, in the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from .common import ROOT, Figure, Report

GiB = 1 << 30
IDLE = "pages=64 passes=0 quiet"
BUSY = "pages=65536 passes=0"                 # 256 MiB rewritten, pass after pass


def _p95(samples: list[float]) -> float:
    return sorted(samples)[max(0, int(round(0.95 * len(samples))) - 1)]


def _address(kind: str, work: str, n: int) -> str:
    if kind == "unix":
        return f"unix:{os.path.join(work, f'mig{n}.sock')}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp:127.0.0.1:{s.getsockname()[1]}"


def destination_main(address: str) -> None:
    """The destination process: one migration taken, its guest run until the first
    KVM_RUN (and post-copy over); one JSON line on stdout."""
    from kvmguest.front.control import listen_for_migration
    from migrate.live import restore_incoming
    server = listen_for_migration(address)
    print("listening", flush=True)
    try:
        m, _ = restore_incoming(server)
    finally:
        server.close()
    m.start()
    while m.first_run_at is None and m.running:
        time.sleep(0.0001)        # as bench.start.first_instruction: no GIL-holding spin
    first = m.first_run_at
    stats = {}
    if m.postcopy is not None:
        m.postcopy.done.wait(600)
        stats = m.postcopy.stats
    print(json.dumps({"first_run": first, "postcopy": stats}), flush=True)
    m.stop()
    m.close()


def _migrate(kind: str, work: str, n: int, cmdline: str, ready: str,
             postcopy: str = "auto", local: bool = False, memory: int = GiB,
             threads: int = 1) -> dict:
    from kvmguest.machine import Machine
    from migrate.precopy import live_save
    address = _address(kind, work, n)
    dest = subprocess.Popen([sys.executable, "-m", "bench.live", address], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert dest.stdout.readline().strip() == "listening"
        with Machine(str(ROOT / "guests" / "build" / "dirty.elf"), memory=memory,
                     cmdline=cmdline, shared_memory=local) as m:
            m.start()
            m.serial.wait_for(ready, 300)
            report = live_save(m, address, format="migrate", then="stop", postcopy=postcopy,
                               local=local, threads=threads)
        got = json.loads(dest.stdout.readline())
        dest.wait(120)
    finally:
        dest.kill()
        dest.wait()
    sent = sum(p.bytes_written for p in report.passes) + report.postcopy.get("pushed", 0) \
        * 4096 + report.postcopy.get("answered", 0) * 4096
    return {"total": report.total_seconds * 1e3, "down": (got["first_run"] - report.paused_at)
            * 1e3, "source_down": report.downtime_ms, "sent": sent / GiB,
            "postcopy": got["postcopy"], "reason": report.stop_reason,
            "pc_seconds": report.postcopy.get("seconds", 0.0)}


def _file(work: str) -> tuple[float, float]:
    from kvmguest.machine import Machine
    from migrate.precopy import live_save
    guest = str(ROOT / "guests" / "build" / "dirty.elf")
    with Machine(guest, memory=GiB, cmdline=IDLE) as m:
        m.start()
        m.serial.wait_for("dirty: pass 16 ok", 120)
        report = live_save(m, os.path.join(work, "g.snap"), then="stop")
    return report.total_seconds * 1e3, report.downtime_ms


def _figure(report: Report, name: str, samples: list[float], unit: str = "ms",
            target: float | None = None, baseline=None, digits: int = 1) -> Figure:
    fig = Figure(name, unit, samples, baseline=baseline.name if baseline else None,
                 target=f"<= {target:g} {unit}" if target is not None else None,
                 note=f"p95 {_p95(samples):.{digits}f}")
    if target is not None:
        fig.met = statistics.median(samples) <= target
    return report.add(fig)


def _qemu(report: Report, work: str, runs: int) -> None:
    from .qemu import QemuGuest, qemu_version, wait_text
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or qemu_version(qemu)[0] < 9:
        print("QEMU >= 9 is not installed (scripts/setup-qemu installs it as root): no QEMU "
              "figures")
        return
    version = qemu_version(qemu)[1]

    def one(kind: str, n: int, cmdline: str, ready: str, postcopy: bool) -> dict:
        address = _address(kind, work, 1000 + n)
        src = QemuGuest(qemu, work, GiB, cmdline)
        dst = QemuGuest(qemu, work, GiB, cmdline, incoming=True)
        try:
            wait_text(src.console, ready, 300)
            caps = [{"capability": "postcopy-ram", "state": postcopy}]
            for g in (src, dst):
                g.qmp.cmd("migrate-set-capabilities", capabilities=caps)
                g.qmp.cmd("migrate-set-parameters", **{"downtime-limit": 50,
                                                      "max-bandwidth": 1 << 40})
            dst.qmp.cmd("migrate-incoming", uri=address)
            src.qmp.cmd("migrate", uri=address)
            if postcopy:
                src.qmp.cmd("migrate-start-postcopy")
            st = src.qmp.wait_migration()
            ram = st.get("ram", {})
            return {"total": float(st["total-time"]), "down": float(st.get("downtime", 0)),
                    "sent": ram.get("transferred", 0) / GiB}
        finally:
            src.close()
            dst.close()
            if kind == "unix":
                try:
                    os.unlink(address[5:])
                except FileNotFoundError:
                    pass

    for kind in ("unix", "tcp"):
        got = [one(kind, i, IDLE, "dirty: pass 16 ok", False) for i in range(runs)]
        _figure(report, f"QEMU: idle 1 GiB over {kind}: total-time", [g["total"] for g in got])
        _figure(report, f"QEMU: idle 1 GiB over {kind}: downtime", [g["down"] for g in got])
    n = max(3, runs // 4)
    got = [one("unix", 100 + i, BUSY, "dirty: pass 1 ok", False) for i in range(n)]
    _figure(report, "QEMU: dirtying 256 MiB of 1 GiB over unix: downtime",
            [g["down"] for g in got])
    _figure(report, "QEMU: dirtying 256 MiB of 1 GiB over unix: GiB sent per GiB of RAM",
            [g["sent"] for g in got], unit="x", digits=2)
    got = [one("unix", 200 + i, BUSY, "dirty: pass 1 ok", True) for i in range(n)]
    _figure(report, "QEMU: post-copy of the dirtying guest over unix: total-time",
            [g["total"] for g in got])
    _figure(report, "QEMU: post-copy of the dirtying guest over unix: downtime",
            [g["down"] for g in got])
    print(f"  ({version})")


def run(report: Report, runs: int) -> None:
    runs = max(runs, 20)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=ROOT / "bench") as work:
        base = [_file(work) for _ in range(runs)]
        total_base = _figure(report, "live save of an idle 1 GiB guest to a file: total",
                             [t for t, _ in base])
        down_base = _figure(report, "live save of an idle 1 GiB guest to a file: downtime",
                            [d for _, d in base], digits=2)
        for kind in ("unix", "tcp"):
            got = [_migrate(kind, work, i, IDLE, "dirty: pass 16 ok") for i in range(runs)]
            _figure(report, f"migration of an idle 1 GiB guest over {kind}: total",
                    [g["total"] for g in got], target=150, baseline=total_base)
            _figure(report, f"migration of an idle 1 GiB guest over {kind}: downtime end to "
                    "end (source pause to the destination's first KVM_RUN)",
                    [g["down"] for g in got], target=1, baseline=down_base, digits=2)
            _figure(report, f"migration of an idle 1 GiB guest over {kind}: the source's "
                    "downtime (pause to state read, as QEMU counts it)",
                    [g["source_down"] for g in got], digits=2)
        n = max(3, runs // 4)
        got = [_migrate("unix", work, 400 + i, IDLE, "dirty: pass 16 ok", threads=2)
               for i in range(n)]
        _figure(report, "migration of an idle 1 GiB guest over unix, --threads 2: total",
                [g["total"] for g in got])
        got = [_migrate("unix", work, 100 + i, BUSY, "dirty: pass 1 ok") for i in range(n)]
        _figure(report, "dirtying 256 MiB of 1 GiB over unix: downtime end to end",
                [g["down"] for g in got], target=5, digits=2)
        _figure(report, "dirtying 256 MiB of 1 GiB over unix: GiB sent per GiB of RAM",
                [g["sent"] for g in got], unit="x", target=2, digits=2)
        print(f"  (how pre-copy ended: {got[-1]['reason']})")
        got = [_migrate("unix", work, 200 + i, BUSY, "dirty: pass 1 ok", "now")
               for i in range(n)]
        _figure(report, "post-copy of the dirtying guest over unix: destination running "
                "after the source stops", [g["down"] for g in got], target=2, digits=2)
        _figure(report, "post-copy of the dirtying guest over unix: total",
                [g["total"] for g in got])
        faults = [g["postcopy"]["p50_us"] for g in got if g["postcopy"].get("remote_faults")]
        if faults:
            _figure(report, "post-copy: remote fault p50 (pager, loopback)", faults, unit="us",
                    target=100)
        print(f"  (remote faults per run: {[g['postcopy'].get('remote_faults') for g in got]})")
        for size in (1, 8):
            got = [_migrate("unix", work, 300 + 10 * size + i, IDLE, "dirty: pass 16 ok",
                            local=True, memory=size * GiB) for i in range(n)]
            _figure(report, f"local mode, idle {size} GiB: downtime end to end",
                    [g["down"] for g in got], target=5, digits=2)
            _figure(report, f"local mode, idle {size} GiB: total", [g["total"] for g in got])
        _qemu(report, work, runs)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    destination_main(sys.argv[1])
