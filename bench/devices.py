"""The minimal kernel for test guests on its devices, kvmguest and QEMU 10 side by side in
one run (`python -m bench --only devices`): the same bzImage (scripts/build-linux), the
same ext4 root image (read-only: both boot the same bytes), the same command line (with
what an emulating host needs: kvmguest adds it itself, QEMU is given it), 1 vCPU, 256 MiB,
virtio-mmio devices (QEMU: `-M microvm`). From process start to `VFS: Mounted root` and to
`Run /sbin/init`, each boot once (single samples: a boot is ~1.5 minutes here); then the
kernel saved at `Run /sbin/init` with its disk (an overlay) and its devices, restored
eagerly and lazily (the call to the guest's first instruction, against the KVM floor for
its RAM) and reset in place once init has run; then the time a live save's downtime
spends on the machine's state with the devices and without (the same guest), over
several saves."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvmguest.arch.x86.quirks import EMULATING_HOST_CMDLINE, EMULATING_HOST_CPU, emulating_host

from .common import ROOT, Figure, Report
from .linux import _timeline, boot_figure
from .qemu import qemu_version

MOUNTED, INIT = "VFS: Mounted root (ext4 filesystem)", "Run /sbin/init as init process"
PANIC = "Kernel panic - not syncing"
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
        # QEMU is given the vmlinux inside the bzImage (PVH, as kvmguest boots it): with the
        # bzImage it would run the kernel's own XZ decompressor as guest code, minutes of
        # emulated kernel code on a host like this one. earlyprintk shows where a boot
        # that fails stops; a panic or KVM's emulation failure ends the run. On a host
        # that emulates kernel code QEMU gets no figure: Linux's int3 self-test
        # (alternative_instructions) is an int3 at CPL0 that host cannot emulate, which
        # kvmguest completes itself and QEMU stops at ("KVM internal error", q35 or
        # microvm with acpi=off); microvm with ACPI takes a divide error in con_init first.
        from kvmguest.arch.x86 import linux
        vmlinux = w / "vmlinux"
        vmlinux.write_bytes(linux.vmlinux_from_bzimage(str(kernel), kernel.read_bytes()))
        cpu = "host,-arch-capabilities" + ("," + EMULATING_HOST_CPU if emulating else "")
        argv = [qemu, "-M", "microvm", "-accel", "kvm", "-cpu", cpu, "-m", "256", "-nographic",
                "-no-reboot", "-kernel", str(vmlinux), "-append",
                CMDLINE + " earlyprintk=serial,ttyS0"
                + (" " + EMULATING_HOST_CMDLINE if emulating else ""),
                "-drive", f"id=root,file={image},format=raw,if=none,readonly=on",
                "-device", "virtio-blk-device,drive=root", "-device", "virtio-rng-device"]
        seen, tail = _timeline(argv, [MOUNTED, INIT, PANIC], stop_at=INIT, timeout=TIMEOUT,
                               stop_also=(PANIC, "KVM internal error", "emulation failure"))
        print(f"  QEMU 10: {seen}" + ("" if INIT in seen else f"; ended: {tail[-600:]!r}"))
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
    restores(report, kernel, image, w, max(runs, 5))
    notify_paths(report, max(runs, 5))
    state_downtime(report, image, max(runs, 5))
    shutil.rmtree(w, ignore_errors=True)


def restores(report: Report, kernel: Path, image: Path, work: Path, runs: int) -> None:
    """The booted kernel with its disk: saved at `Run /sbin/init`, restored (eager, lazy)
    to its first instruction, and reset in place after init ran, ``runs`` times each."""
    from kvmguest.devices import DeviceSpec
    from kvmguest.machine import Machine
    from migrate.precopy import live_save
    from migrate.reset import ResetPoint

    from .migration import slot_floor
    from .start import first_instruction
    ram = 256 << 20
    snap = work / "booted.snap"
    virtio = [DeviceSpec("blk", {"path": str(image), "overlay": True}), DeviceSpec("console"),
              DeviceSpec("rng")]
    with Machine(str(kernel), memory=ram, cmdline=CMDLINE, virtio=virtio) as m:
        m.start()
        if not m.serial.wait_for(INIT, TIMEOUT):
            print(f"  the kernel did not reach {INIT!r}: no restore figures")
            return
        live_save(m, str(snap), then="stop")
    floor = report.add(Figure("KVM floor, 256 MiB: VM + memory slots alone", "ms",
                              [slot_floor(ram) for _ in range(runs)]))
    for lazy in (False, True):
        fig = Figure(f"restore ({'lazy' if lazy else 'eager'}) of the booted kernel with its "
                     "disk: call to first instruction", "ms",
                     [first_instruction(str(snap), lazy=lazy) for _ in range(runs)],
                     baseline=floor.name, target="<= 50 ms")
        fig.met = fig.median <= 50
        report.add(fig)
    from migrate.reader import restore
    m, _ = restore(str(snap))
    samples = []
    try:
        point = ResetPoint(m, str(snap))
        m.serial.watch_panics = False       # the panic after init must not end the run
        m.start()
        for _ in range(runs):
            if not m.serial.wait_for("segfault at", TIMEOUT):     # init ran (then panics)
                break
            point.reset(clear_console=True)
            samples.append(point.last_ms)
        point.close()
    finally:
        m.close()
    if samples:
        fig = Figure("reset in place of the booted kernel with its disk, after init ran", "ms",
                     samples, baseline=floor.name, target="<= 50 ms")
        fig.met = fig.median <= 50
        report.add(fig)


def state_downtime(report: Report, image: Path, runs: int) -> None:
    """What device state adds to a live save's downtime: the virtio guest reading its
    disk (virtio-blk + rng), paused as the stop-and-copy pauses it; the whole state part
    (kvmguest.state.read_machine: vCPUs, VM, every device) is the baseline, the virtio
    devices' part of it (VirtioDevices.save_state: transports, queues, disk identity by
    fstat) the figure; and the state part of real live saves of the same machine."""
    from kvmguest.devices import DeviceSpec
    from kvmguest.machine import Machine
    from kvmguest.state import read_machine
    from migrate.precopy import live_save
    import struct
    disk = image.with_name("numbered.img")          # sector k holds k (what the guest checks)
    disk.write_bytes(b"".join(struct.pack("<Q", k).ljust(512, b"\xaa") for k in range(2048)))
    virtio = [DeviceSpec("blk", {"path": str(disk), "readonly": True}), DeviceSpec("rng")]
    whole, devices, saves = [], [], []
    with Machine(str(ROOT / "guests" / "build" / "virtio.elf"), virtio=virtio,
                 cmdline="readonly reads=0") as m:
        m.start()
        if not m.serial.wait_for("virtio: read 256 ok", TIMEOUT):
            print(f"  the virtio guest did not read its disk: {m.serial.text()[-300:]!r}")
            return
        for _ in range(runs):
            m.pause_all()
            try:
                t0 = time.perf_counter()
                read_machine(m)
                t1 = time.perf_counter()
                m.devices.virtio.save_state()
                t2 = time.perf_counter()
            finally:
                m.resume_all()
            whole.append((t1 - t0) * 1e3)
            devices.append((t2 - t1) * 1e3)
        with tempfile.TemporaryDirectory(prefix="bench-", dir=ROOT / "bench") as d:
            for i in range(runs):
                r = live_save(m, str(Path(d) / f"s{i}.snap"), then="continue")
                saves.append(r.downtime_parts["state"])
    base = report.add(Figure("paused: the whole machine state (vCPUs, VM, devices)", "ms",
                             whole))
    fig = Figure("paused: the virtio devices' state (virtio-blk + rng) within it", "ms",
                 devices, baseline=base.name, target="<= 0.1 ms")
    fig.met = fig.median <= 0.1
    report.add(fig)
    report.add(Figure("live save (then continue): state part of the downtime, same guest",
                      "ms", saves, baseline=base.name))


def notify_paths(report: Report, runs: int, iters: int = 20000) -> None:
    """What a virtio notification and a virtio interrupt cost each way: a guest writing
    QueueNotify ``iters`` times, handled as an MMIO exit by the VMM (the path the devices
    take: end to end it is the faster, docs/devices.md) or signalled in the kernel through
    an ioeventfd (no exit); and an edge on an interrupt line by two KVM_IRQ_LINE ioctls or
    one write to an irqfd (the path taken)."""
    import os
    import threading

    from kvmguest.arch.x86 import layout
    from kvmguest.machine import Machine
    guest = str(ROOT / "guests" / "build" / "ioloop.elf")
    notify = layout.VIRTIO_MMIO_BASE + 0x50

    def loop(n: int, eventfd: bool) -> float:
        m = Machine(guest, cmdline=f"iters={n} mmio={notify:#x}")
        efd, stop = -1, False
        try:
            if eventfd:
                efd = os.eventfd(0, os.EFD_CLOEXEC)
                m.platform.vm.ioeventfd(efd, notify, 4)

                def drain():                     # an I/O thread taking the signals
                    while not stop:
                        os.eventfd_read(efd)
                t = threading.Thread(target=drain, daemon=True)
                t.start()
            result = m.run(timeout=300)
            assert result.exit_code == 0
            return result.seconds * 1e3
        finally:
            stop = True
            if efd >= 0:
                os.eventfd_write(efd, 1)
            m.close()
            if efd >= 0:
                os.close(efd)

    per = {}
    for eventfd in (False, True):
        per[eventfd] = [(loop(iters, eventfd) - loop(0, eventfd)) * 1e3 / iters
                        for _ in range(runs)]
    base = report.add(Figure("virtio notify: an MMIO exit handled by the VMM (the path "
                             "taken)", "us", per[False]))
    report.add(Figure("virtio notify: an ioeventfd signalled in the kernel (no exit)", "us",
                      per[True], baseline=base.name))
    m = Machine(guest, cmdline="iters=0")
    try:
        vm, n = m.platform.vm, 20000
        line = []
        for _ in range(runs):
            t = time.perf_counter()
            for _ in range(n):
                vm.irq_line(15, 1)
                vm.irq_line(15, 0)
            line.append((time.perf_counter() - t) * 1e6 / n)
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        vm.irqfd(efd, 15)
        fd_ = []
        for _ in range(runs):
            t = time.perf_counter()
            for _ in range(n):
                os.eventfd_write(efd, 1)
            fd_.append((time.perf_counter() - t) * 1e6 / n)
        vm.irqfd(efd, 15, assign=False)
        os.close(efd)
    finally:
        m.close()
    base = report.add(Figure("virtio interrupt: an edge by two KVM_IRQ_LINE ioctls", "us", line))
    report.add(Figure("virtio interrupt: an edge by one irqfd write (the path taken)", "us",
                      fd_, baseline=base.name))
