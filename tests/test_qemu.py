"""The same guest binaries boot under QEMU with the same console and result."""

import os
import shutil
import subprocess

import pytest

from helpers import guest

QEMU = shutil.which("qemu-system-x86_64")


@pytest.fixture
def qemu():
    if QEMU is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("qemu-system-x86_64 missing: .ci/run installs qemu-system-x86")
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    return QEMU


def run_qemu(qemu, name, cmdline=""):
    p = subprocess.run(
        [qemu, "-accel", "kvm", "-m", "64M", "-display", "none", "-nodefaults", "-no-reboot",
         "-kernel", str(guest(name)), "-append", cmdline,
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio"],
        capture_output=True, timeout=60)
    return p.returncode, p.stdout.decode().replace("\r\n", "\n")


@pytest.mark.parametrize("name,cmdline", [("hello", "q=1"), ("dirty", "pages=32 passes=2"),
                                          ("cpustate", "iters=1000")])
def test_guest_behaves_the_same_under_qemu(qemu, boot_guest, name, cmdline):
    ours = boot_guest(guest(name), cmdline=cmdline)
    rc, console = run_qemu(qemu, name, cmdline)
    assert rc == (ours.exit_code << 1) | 1     # isa-debug-exit: (value << 1) | 1
    assert console == ours.console


def test_fault_guest_resets_under_qemu(qemu):
    rc, console = run_qemu(qemu, "fault")
    assert rc == 0 and "loading an empty IDT" in console   # -no-reboot: triple fault exits
