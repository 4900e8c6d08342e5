"""QEMU side by side: the same `dirty` guest ELF under qemu-system-x86_64 -accel kvm,
saved over QMP with mapped-ram (with and without multifd, with direct-io) to `file:`,
restored with -incoming; against our save and restore of the same workload."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

from kvmguest.machine import Machine
from migrate.precopy import live_save
from migrate.reader import restore

from .common import GUESTS, Figure, Report, run_cmd
from .disk import drop_cache
from .smp import parts_note

CONFIGS = {
    "mapped-ram": ({"mapped-ram": True}, {}),
    "mapped-ram + multifd 2": ({"mapped-ram": True, "multifd": True}, {"multifd-channels": 2}),
    "mapped-ram + multifd 2 + direct-io": ({"mapped-ram": True, "multifd": True},
                                           {"multifd-channels": 2, "direct-io": True}),
}


class QMP:
    def __init__(self, path: str, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.f = self.sock.makefile("rwb")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")

    def wait_migration(self, timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.cmd("query-migrate")
            if st.get("status") == "completed":
                return st
            if st.get("status") == "failed":
                raise RuntimeError(f"QEMU migration failed: {st}")
            time.sleep(0.002)
        raise TimeoutError("QEMU migration did not complete")

    def close(self):
        self.sock.close()


def qemu_version(qemu: str) -> tuple[int, str]:
    line = run_cmd([qemu, "--version"]).stdout.decode().splitlines()[0]
    major = int(line.split("version ")[1].split(".")[0])
    return major, line


class QemuGuest:
    def __init__(self, qemu: str, workdir: str, ram: int, cmdline: str, incoming: bool = False):
        self.dir = tempfile.mkdtemp(dir=workdir)
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.serial = os.path.join(self.dir, "serial.txt")
        args = [qemu, "-accel", "kvm", "-m", f"{ram >> 20}M", "-display", "none", "-nodefaults",
                "-no-reboot", "-kernel", str(GUESTS / "dirty.elf"), "-append", cmdline,
                "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", f"file:{self.serial}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if incoming:
            args += ["-incoming", "defer"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.qmp = QMP(self.qmp_path)

    def console(self) -> str:
        try:
            with open(self.serial) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def configure(self, config: str) -> None:
        caps, params = CONFIGS[config]
        # The same downtime target as ours, and no bandwidth cap (QEMU's default caps a
        # migration at 128 MiB/s, which would make the comparison meaningless).
        params = {"downtime-limit": 50, "max-bandwidth": 1 << 40, **params}
        self.qmp.cmd("migrate-set-capabilities",
                     capabilities=[{"capability": c, "state": v} for c, v in caps.items()])
        self.qmp.cmd("migrate-set-parameters", **params)

    def close(self) -> None:
        self.qmp.close()
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_text(get, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in get():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} never appeared")
        time.sleep(0.02)


def side_by_side(report: Report, workdir: str, ram: int, ws_pages: int, runs: int) -> dict:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or qemu_version(qemu)[0] < 9:
        print("QEMU >= 9 with mapped-ram is not installed (scripts/setup-qemu installs it as "
              "root): no QEMU figures")
        return {}
    version = qemu_version(qemu)[1]
    cmdline = f"pages={ws_pages} passes=0"
    label = f"{ram >> 30} GiB, {ws_pages * 4096 >> 20} MiB working set"
    out = {}
    # QEMU: one VM per configuration, saved `runs` times (cont between saves).
    for config in CONFIGS:
        g = QemuGuest(qemu, workdir, ram, cmdline)
        saves, durable, downs, sizes, restores = [], [], [], [], []
        try:
            wait_text(g.console, "dirty: pass 1 ok")
            g.configure(config)
            for i in range(runs):
                path = os.path.join(workdir, f"qemu-{i}.snap")
                t = time.perf_counter()
                g.qmp.cmd("migrate", uri=f"file:{path}")
                st = g.qmp.wait_migration()
                saves.append((time.perf_counter() - t) * 1e3)
                # QEMU does not fsync the file; ours does, before the rename. Timing an
                # fsync of QEMU's file right after gives the same durability.
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
                durable.append((time.perf_counter() - t) * 1e3)
                downs.append(float(st.get("downtime", 0)))
                s = os.stat(path)
                sizes.append((s.st_size, s.st_blocks * 512))
                g.qmp.cmd("cont")
                # Restore in a fresh QEMU (incoming), timed from migrate-incoming.
                r = QemuGuest(qemu, workdir, ram, cmdline, incoming=True)
                try:
                    r.configure(config)
                    drop_cache(path)           # both restores read a cold file
                    t = time.perf_counter()
                    r.qmp.cmd("migrate-incoming", uri=f"file:{path}")
                    r.qmp.wait_migration()
                    restores.append((time.perf_counter() - t) * 1e3)
                finally:
                    r.close()
                os.unlink(path)
                time.sleep(0.3)
        finally:
            g.close()
        report.add(Figure(f"QEMU {config}: save {label}, without fsync", "ms", saves,
                          note=version))
        out[config] = {"save": report.add(Figure(f"QEMU {config}: save + fsync", "ms", durable)),
                       "downtime": report.add(Figure(f"QEMU {config}: downtime", "ms", downs)),
                       "restore": report.add(Figure(f"QEMU {config}: restore", "ms", restores)),
                       "size": sizes[-1]}
    # Ours: the same guest, the same working set; buffered and O_DIRECT, 2 threads each,
    # and the better of the two is compared with QEMU's best configuration.
    ours = {}
    m = Machine(str(GUESTS / "dirty.elf"), memory=ram, cmdline=cmdline)
    try:
        m.start()
        wait_text(m.serial.text, "dirty: pass 1 ok")
        for direct in (False, True):
            saves, downs, restores, parts = [], [], [], []
            for i in range(runs):
                path = os.path.join(workdir, f"ours-{i}.snap")
                rep = live_save(m, path, threads=2, direct=direct, then="continue")
                saves.append(rep.total_seconds * 1e3)
                downs.append(rep.downtime_ms)
                parts.append(rep.downtime_parts)
                size = (rep.file_size, rep.allocated)
                drop_cache(path)
                t = time.perf_counter()
                r, _ = restore(path, threads=2)
                restores.append((time.perf_counter() - t) * 1e3)
                r.close()
                os.unlink(path)
            ours["O_DIRECT" if direct else "buffered"] = (saves, downs, restores, parts)
    finally:
        m.close()
    mine = min(ours, key=lambda k: sorted(ours[k][0])[len(ours[k][0]) // 2])
    saves, downs, restores, parts = ours[mine]
    best = {k: min(out, key=lambda c: out[c][k].median) for k in ("save", "downtime", "restore")}
    for key, samples, target, factor in (("save", saves, "no slower than QEMU's best", 1.0),
                                         ("downtime", downs, "<= 1/5 of QEMU's best", 0.2),
                                         ("restore", restores, "<= 0.5x QEMU's best", 0.5)):
        base = out[best[key]][key]
        fig = Figure(f"kvmguest ({mine}, 2 threads): {key} {label}", "ms", samples,
                     baseline=base.name, target=target,
                     note=parts_note(parts) if key == "downtime" else "")
        fig.met = fig.median <= factor * base.median
        report.add(fig)
    report.add(Figure("file size: kvmguest vs QEMU best (apparent, allocated MiB)", "MiB",
                      [size[1] / 2**20],
                      note=f"kvmguest {size[0] / 2**20:.0f}/{size[1] / 2**20:.0f} MiB; QEMU "
                           f"{out[best['save']]['size'][0] / 2**20:.0f}/"
                           f"{out[best['save']]['size'][1] / 2**20:.0f} MiB"))
    return out
