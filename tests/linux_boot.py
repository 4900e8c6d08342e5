"""A Linux kernel booted once per test run in the background, to its initrd's /init.

Which kernel: KVMGUEST_LINUX_BOOT=minimal (the default, `make test`: the kernel for test
guests, scripts/build-linux, ~90 s to /init here) or debian (`make linux`: Debian's stock
kernel, scripts/fetch-linux, ~15 minutes here, where kernel code is emulated).
conftest.py starts the boot as soon as the run's tests are collected (when any test of
test_linux_boot.py is selected) and the rest of the suite runs meanwhile; those tests run
last. When the boot prints MID_BOOT (in its late initcalls, both vCPUs up) it is migrated,
by post-copy, to a `kvmguest restore --incoming` process, and there live-saved at once
(`kvmguest save --control ... --then continue`); it runs on to /init: one run proves the
boot and the migration of a booting kernel, and every later Linux test starts from the
snapshot."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from helpers import ROOT

from kvmguest.front.testing.linux import CMDLINE, MACHINE, build_initramfs

KERNEL = os.environ.get("KVMGUEST_LINUX_BOOT", "minimal")
# Debian's: ~140 s of guest time before /init, late initcalls (certificates, keys,
# IMA/EVM); the minimal kernel's: ~14 s before, its serial driver (then its network
# stack); two vCPUs up, kvm-clock, timers and IPIs flowing, either way.
MID_BOOT = {"debian": "Loading compiled-in X.509 certificates",
            "minimal": "Serial: 8250/16550 driver"}[KERNEL]
TIMEOUT = 2400                 # seconds: Debian's boot here takes ~900, the minimal one ~90


def kernel() -> tuple[Path | None, str]:
    """The kernel KERNEL names: (its path, "") or (None, why it is missing)."""
    if KERNEL == "debian":
        return fetch_linux()
    p = subprocess.run([str(ROOT / "scripts" / "build-linux")], capture_output=True,
                       text=True, timeout=3600)
    if p.returncode != 0:
        return None, f"scripts/build-linux failed: {p.stderr.strip()[-2000:]}"
    return Path(p.stdout.strip().splitlines()[-1]), ""


def fetch_linux() -> tuple[Path | None, str]:
    """scripts/fetch-linux: (the vmlinuz, "") or (None, why not)."""
    try:
        p = subprocess.run([str(ROOT / "scripts" / "fetch-linux")], capture_output=True,
                           text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return None, "scripts/fetch-linux took more than 10 minutes"
    if p.returncode != 0:
        return None, p.stderr.strip()
    return Path(p.stdout.strip()), ""


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "kvmguest", *map(str, args)]


class Boot:
    """The run's one boot: :meth:`start` it in a thread, :meth:`result` waits for it."""

    def __init__(self):
        self.work = Path(tempfile.mkdtemp(prefix="kvmguest-linux-"))
        self.snapshot = self.work / "mid-boot.snap"
        self.vmlinuz: Path | None = None
        self.initramfs: Path | None = None
        self.unavailable = ""          # why Debian's kernel could not be fetched
        self.stdout = self.stderr = self.save_output = ""
        self.returncode: int | None = None
        self.save_returncode: int | None = None
        self.migrate_output = ""
        self.migrate_returncode: int | None = None
        self.source_returncode: int | None = None
        self.error: BaseException | None = None
        self._procs: list[subprocess.Popen] = []
        self._thread = threading.Thread(target=self._run, name="linux-boot", daemon=True)

    def start(self) -> "Boot":
        self._thread.start()
        return self

    def result(self) -> "Boot":
        self._thread.join(TIMEOUT + 900)
        assert not self._thread.is_alive(), "the Linux boot never ended"
        if self.error is not None:
            raise self.error
        return self

    def close(self) -> None:
        """Stop whatever still runs; remove the work folder."""
        for p in self._procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if not os.environ.get("KVMGUEST_KEEP_LINUX"):        # kept for a post-mortem
            import shutil
            shutil.rmtree(self.work, ignore_errors=True)

    def _run(self) -> None:
        try:
            self.vmlinuz, self.unavailable = kernel()
            if self.vmlinuz is None:
                return
            self.initramfs = build_initramfs(self.work)
            self._boot()
        except BaseException as err:           # handed to the test that waits for it
            self.error = err

    def _boot(self) -> None:
        address = f"unix:{self.work / 'mig.sock'}"
        with open(self.work / "boot.err", "w+") as err, \
                open(self.work / "dest.err", "w+") as dest_err:
            dest = subprocess.Popen(
                _cli("restore", "--incoming", address, "--timeout", TIMEOUT, "-v",
                     "--control", self.work / "dest.sock"), cwd=ROOT,
                stdout=subprocess.PIPE, stderr=dest_err, text=True)
            self._procs.append(dest)
            run = subprocess.Popen(
                _cli("run", self.vmlinuz, *MACHINE, "--initrd", self.initramfs, "--cmdline",
                     CMDLINE, "--control", self.work / "ctl.sock", "--timeout", TIMEOUT,
                     "-v"), cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
            self._procs.append(run)
            out, mover = [], None
            log = open(self.work / "boot.out", "w", buffering=1)     # line by line
            for line in run.stdout:
                out.append(line)
                log.write(line)
                if mover is None and MID_BOOT in line:
                    mover = threading.Thread(target=self._move, args=(address,), daemon=True)
                    mover.start()
            self.source_returncode = run.wait()
            for line in dest.stdout:             # the boot, carried on there
                out.append(line)
                log.write(line)
            self.returncode = dest.wait()
            log.close()
            self.stdout = "".join(out)
            err.seek(0)
            dest_err.seek(0)
            self.stderr = err.read() + dest_err.read()
        if mover is not None:
            mover.join(600)

    def _move(self, address: str) -> None:
        """The booting kernel moved by post-copy, then saved where it went."""
        p = subprocess.run(_cli("migrate", "--control", self.work / "ctl.sock", address,
                                "--postcopy"), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        self.migrate_output = p.stdout + p.stderr
        self.migrate_returncode = p.returncode
        p = subprocess.run(_cli("save", "--control", self.work / "dest.sock", self.snapshot,
                                "--then", "continue"), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
        self.save_output = p.stdout + p.stderr
        self.save_returncode = p.returncode


BOOT: Boot | None = None


def start_in_background() -> None:
    """Called by conftest.py once the run's tests are known."""
    global BOOT
    if BOOT is None and os.access("/dev/kvm", os.R_OK | os.W_OK):
        BOOT = Boot().start()


def the_boot() -> Boot:
    """The run's boot, waited for (started now when it was not started in time)."""
    global BOOT
    if BOOT is None:
        BOOT = Boot().start()
    return BOOT.result()


def close() -> None:
    if BOOT is not None:
        BOOT.close()
