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


def run_qemu(qemu, name, cmdline="", smp=1):
    # -cpu host (x2APIC, TSC-deadline) without arch-capabilities: QEMU >= 10 sets MSR
    # 0x10a for it, which some hosts' KVM refuses (this one's does).
    p = subprocess.run(
        [qemu, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-smp", str(smp),
         "-m", "64M", "-display", "none", "-nodefaults", "-no-reboot",
         "-kernel", str(guest(name)), "-append", cmdline,
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio"],
        capture_output=True, timeout=120)
    return p.returncode, p.stdout.decode().replace("\r\n", "\n")


@pytest.mark.parametrize("name,cmdline", [("hello", "q=1"), ("dirty", "pages=32 passes=2"),
                                          ("cpustate", "iters=1000")])
def test_guest_behaves_the_same_under_qemu(qemu, boot_guest, name, cmdline):
    ours = boot_guest(guest(name), cmdline=cmdline)
    rc, console = run_qemu(qemu, name, cmdline)
    assert rc == (ours.exit_code << 1) | 1     # isa-debug-exit: (value << 1) | 1
    assert console == ours.console


@pytest.mark.parametrize("name,cmdline,verdict", [
    ("smp", "pages=64 passes=4", "smp: verified 64 pages on 4 cpus over 4 passes"),
    ("ipi", "rounds=20 quiet", "all delivered once"),
    ("timer", "ticks=30 quiet", "timer: every timer ticked on 4 cpus")])
def test_smp_guests_behave_the_same_under_qemu_smp_4(qemu, boot_guest, name, cmdline, verdict):
    ours = boot_guest(guest(name), cmdline=cmdline, vcpus=4, timeout=120)
    rc, console = run_qemu(qemu, name, cmdline, smp=4)
    assert ours.exit_code == 0 and verdict in ours.console
    assert rc == 1 and verdict in console, console[-2000:]       # (0 << 1) | 1
    if name == "smp":                                             # no timings in its output
        assert console == ours.console


def test_echo_answers_serial_input_under_qemu_too(qemu):
    p = subprocess.run(
        [qemu, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "64M", "-display",
         "none", "-nodefaults", "-no-reboot", "-kernel", str(guest("echo")),
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio"],
        input=b"over there\nquit\n", capture_output=True, timeout=120)
    console = p.stdout.decode().replace("\r\n", "\n")
    assert p.returncode == 1, console                               # (0 << 1) | 1
    assert "echo: over there\n" in console and "echo: bye" in console


def test_fault_guest_resets_under_qemu(qemu):
    rc, console = run_qemu(qemu, "fault")
    assert rc == 0 and "loading an empty IDT" in console   # -no-reboot: triple fault exits
