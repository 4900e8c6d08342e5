"""The minimal kernel for test guests on its devices, kvmguest and QEMU 10 side by side in
one run (`python -m bench --only devices`): the same bzImage (scripts/build-linux), the
same ext4 root image (read-only: both boot the same bytes), the same command line (with
what an emulating host needs: kvmguest adds it itself, QEMU is given it), 1 vCPU, 256 MiB,
virtio-mmio devices (QEMU: `-M microvm`). From process start to `VFS: Mounted root` and to
`Run /sbin/init`, each boot once (single samples: a boot is ~1.5 minutes here); then the
time a live save's downtime spends on the machine's state with the devices and without
(the same guest), over several saves."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kvmguest.arch.x86.quirks import EMULATING_HOST_CMDLINE, EMULATING_HOST_CPU, emulating_host

from .common import ROOT, Figure, Report
from .linux import _timeline, boot_figure
from .qemu import qemu_version

MOUNTED, INIT = "VFS: Mounted root (ext4 filesystem)", "Run /sbin/init as init process"
CMDLINE = "console=ttyS0 root=/dev/vda"
TIMEOUT = 900


def root_image(work: Path) -> Path:
    tree = work / "tree"
    for sub in ("sbin", "dev", "proc", "sys"):
        (tree / sub).mkdir(parents=True)
    subprocess.run(["gcc", "-static", "-nostdlib", "-O2", "-o", str(tree / "sbin" / "init"),
                    str(ROOT / "guests" / "linux" / "init.c")], check=True)
    image = work / "root.img"
    subprocess.run([shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4", "-q", "-F", "-d",
                    str(tree), str(image), "16M"], check=True)
    return image


def run(report: Report, work: str, runs: int) -> None:
    p = subprocess.run([str(ROOT / "scripts" / "build-linux")], capture_output=True, text=True)
    if p.returncode != 0:
        print(f"the minimal kernel could not be built ({p.stderr.strip()[-300:]}): no figures")
        return
    kernel, w = Path(p.stdout.strip().splitlines()[-1]), Path(tempfile.mkdtemp(dir=work))
    image = root_image(w)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or qemu_version(qemu)[0] < 10:
        print("QEMU 10 is not installed (scripts/setup-qemu installs it as root): kvmguest alone")
        qemu = None
    emulating = emulating_host()
    if qemu:
        cpu = "host,-arch-capabilities" + ("," + EMULATING_HOST_CPU if emulating else "")
        argv = [qemu, "-M", "microvm", "-accel", "kvm", "-cpu", cpu, "-m", "256", "-nographic",
                "-no-reboot", "-kernel", str(kernel), "-append",
                CMDLINE + (" " + EMULATING_HOST_CMDLINE if emulating else ""),
                "-drive", f"id=root,file={image},format=raw,if=none,readonly=on",
                "-device", "virtio-blk-device,drive=root", "-device", "virtio-rng-device"]
        seen, tail = _timeline(argv, [MOUNTED, INIT], stop_at=INIT, timeout=TIMEOUT)
        print(f"  QEMU 10: {seen}" + ("" if INIT in seen else f"; ended: {tail[-300:]!r}"))
        for mark, label in ((MOUNTED, "VFS: Mounted root"), (INIT, "Run /sbin/init")):
            if mark in seen:
                report.add(Figure(f"QEMU 10 microvm: boot to {label}", "s", [seen[mark]]))
    argv = [sys.executable, "-m", "kvmguest", "run", str(kernel), "--memory", "256M",
            "--disk", f"{image},readonly", "--device", "rng", "--cmdline", CMDLINE,
            "--timeout", str(TIMEOUT)]
    seen, tail = _timeline(argv, [MOUNTED, INIT], stop_at=INIT, timeout=TIMEOUT)
    print(f"  kvmguest: {seen}")
    for mark, label in ((MOUNTED, "VFS: Mounted root"), (INIT, "Run /sbin/init")):
        if mark in seen:
            boot_figure(report, f"kvmguest: boot to {label}", seen[mark],
                        f"QEMU 10 microvm: boot to {label}")
    state_downtime(report, image, max(runs, 5))
    shutil.rmtree(w, ignore_errors=True)


def state_downtime(report: Report, image: Path, runs: int) -> None:
    """The state part of a live save's downtime of the virtio guest reading its disk, with
    its devices, against the same guest's state part with none (hello: no device)."""
    from kvmguest.devices import DeviceSpec
    from kvmguest.machine import Machine
    from migrate.precopy import live_save
    guests = ROOT / "guests" / "build"
    parts = {}
    for name, kernel, virtio, cmdline in (
            ("no device", guests / "hello.elf", [], "panic"),
            ("virtio-blk + rng", guests / "virtio.elf",
             [DeviceSpec("blk", {"path": str(image), "readonly": True}), DeviceSpec("rng")],
             "readonly reads=0")):
        samples = []
        for _ in range(runs):
            with tempfile.TemporaryDirectory(dir=ROOT / "bench") as d, \
                    Machine(str(kernel), virtio=virtio, cmdline=cmdline) as m:
                m.start()
                report_ = live_save(m, str(Path(d) / "s.snap"), then="stop")
                samples.append(report_.downtime_parts["state"])
        parts[name] = samples
    base = report.add(Figure("live save: state part of the downtime, no device", "ms",
                             parts["no device"]))
    fig = Figure("live save: state part of the downtime, virtio-blk + rng", "ms",
                 parts["virtio-blk + rng"], baseline=base.name,
                 target="<= 0.1 ms more than no device")
    fig.met = fig.median - base.median <= 0.1
    report.add(fig)
