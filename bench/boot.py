"""Boot and exit-path figures: raw KVM floor, our Machine, QEMU, one port-I/O exit."""

from __future__ import annotations

import shutil
import sys

from kvmguest.exits import IoExit
from kvmguest.arch.x86 import regs as cpu
from kvmguest.kvm import Kvm
from kvmguest.machine import Machine
from kvmguest.memory import GuestMemory
from kvmguest.arch.x86.layout import plan_regions

from .common import GUESTS, Figure, Report, run_cmd, timed

HELLO = str(GUESTS / "hello.elf")


def raw_floor(kvm: Kvm) -> None:
    """The least a VMM can do: VM, 4 MiB slot, vCPU, two instructions to an I/O exit."""
    vm = kvm.create_vm()
    mem = GuestMemory.anonymous(plan_regions(4 << 20))
    r = mem.regions[0]
    vm.set_user_memory_region(0, 0, r.size, r.host_addr)
    vcpu = vm.create_vcpu(0)
    mem.write(0x100000, bytes([0xB0, 0x00, 0xE6, 0xF4]))  # mov al, 0; out 0xf4, al
    cpu.setup_gdt(mem)
    sregs = vcpu.get_sregs()
    cpu.setup_sregs(sregs)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(cpu.setup_regs(0x100000, 0))
    assert isinstance(vcpu.run(), IoExit)
    vcpu.close(), vm.close(), mem.close()


_to_close: list[Machine] = []


def hello_in_process(kvm: Kvm) -> None:
    m = Machine(HELLO, kvm=kvm)
    _to_close.append(m)  # closed after the clock stops: teardown is not part of the figure
    result = m.run(timeout=10)
    assert result.exit_code == 0


def close_machines() -> None:
    """Close the machines hello_in_process left open (after the clock stopped)."""
    while _to_close:
        _to_close.pop().close()


def ioloop(kvm: Kvm, iters: int) -> float:
    m = Machine(str(GUESTS / "ioloop.elf"), kvm=kvm, cmdline=f"iters={iters}")
    try:
        result = m.run(timeout=60)
        assert result.exit_code == 0
        return result.seconds * 1e3
    finally:
        m.close()


def run(report: Report, runs: int) -> None:
    kvm = Kvm()
    report.add(Figure("raw KVM floor: VM+vCPU to first I/O exit", "ms",
                      timed(lambda: raw_floor(kvm), runs)))
    samples = []
    for _ in range(runs + 1):
        samples += timed(lambda: hello_in_process(kvm), 1, warmup=0)
        close_machines()
    report.add(Figure("Machine(hello) create to guest exit", "ms", samples[1:],
                      baseline="raw KVM floor: VM+vCPU to first I/O exit", target="<= 10 ms",
                      met=sorted(samples[1:])[len(samples[1:]) // 2] <= 10.0))
    n = 20000
    per_exit = []
    for _ in range(max(3, runs // 2)):
        per_exit.append((ioloop(kvm, n) - ioloop(kvm, 0)) * 1e3 / n)
    report.add(Figure("port-I/O exit round trip (guest out -> Python -> guest)", "us",
                      per_exit))
    cli = [sys.executable, "-m", "kvmguest", "run", "-q", HELLO]
    report.add(Figure("process: kvmguest run hello", "ms",
                      timed(lambda: run_cmd(cli, check=True), runs)))
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        print("QEMU not installed (apt-get install qemu-system-x86): no QEMU figures")
        return
    qargs = [qemu, "-accel", "kvm", "-m", "64M", "-display", "none", "-nodefaults",
             "-no-reboot", "-kernel", HELLO, "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
             "-serial", "null"]
    report.add(Figure("process: qemu-system-x86_64 -accel kvm hello", "ms",
                      timed(lambda: run_cmd(qargs), runs),
                      note=run_cmd([qemu, "--version"]).stdout.decode().splitlines()[0]))
    ours, theirs = report.figures[-2], report.figures[-1]
    ours.baseline = theirs.name
    ours.target = "faster than QEMU"
    ours.met = ours.median < theirs.median
