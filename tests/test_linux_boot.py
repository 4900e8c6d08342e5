"""A Linux kernel booted all the way to its initrd's /init, and snapshots of it taken
while it boots booting on to the same end.

The boot runs once per test run, in the background from the start of the run
(tests/linux_boot.py; these tests run last): under `make test` the minimal kernel for test
guests (scripts/build-linux, ~90 s here), under `make linux` Debian's stock kernel
(~15 minutes here, where kernel code is emulated). Every later guest starts from the
snapshot it was live-saved to in its late initcalls.

On this host user mode cannot make system calls, so /init dies at its first one and the
kernel panics ("Attempted to kill init!"); on a host where it can, /init exits and the
kernel panics just the same. Either way a run ends with 122 and the panic line."""

from __future__ import annotations

import signal

import pytest

import linux_boot
from helpers import cli, cli_popen, wait_until


@pytest.fixture(scope="module")
def boot(request):
    """The run's boot (Debian's kernel: fails under CI, skips elsewhere, without it)."""
    if linux_boot.KERNEL == "debian":
        request.getfixturevalue("vmlinuz")
    b = linux_boot.the_boot()
    assert b.vmlinuz is not None, b.unavailable
    return b


@pytest.fixture(scope="module")
def mid_boot(boot):
    """The snapshot the boot was live-saved to (--then continue) at MID_BOOT."""
    assert boot.save_returncode == 0, (boot.save_output, boot.stderr[-2000:])
    return boot.snapshot


def boots_on_to_init(returncode: int, out: str, err: str) -> None:
    """The kernel (booted or restored) reached /init and ended there, cleanly."""
    assert "Run /init as init process" in out, out[-3000:]
    assert returncode == 122 and "Attempted to kill init!" in err, (returncode, err[-2000:])
    assert "as unstable" not in out, "a clocksource was marked unstable"
    assert "soft lockup" not in out and "rcu_sched self-detected stall" not in out, out[-3000:]


def test_the_kernel_boots_to_its_initrds_init(boot):
    """Booted from its bzImage through PVH with our initramfs as module 0: it unpacks the
    initramfs, runs /init, and the run ends with the panic's own exit code and line; the
    instructions this host cannot emulate were completed on the way (-v counts them).
    It got there in another process: migrated there mid-boot by post-copy (and saved
    there)."""
    boots_on_to_init(boot.returncode, boot.stdout, boot.stderr)
    assert "Freeing initrd memory" in boot.stdout and \
        "rootfs image is not initramfs" not in boot.stdout, boot.stdout[-3000:]
    assert "kvmguest: completed for the guest:" in boot.stderr and "int3 x" in boot.stderr, \
        boot.stderr[-2000:]
    assert "kvmguest: the guest kernel panicked: " in boot.stderr, boot.stderr[-2000:]
    # migrated by post-copy mid-boot to another process, where it booted on to /init ...
    assert boot.migrate_returncode == 0 and "post-copy:" in boot.migrate_output, \
        boot.migrate_output
    assert boot.source_returncode == 0, boot.stderr[-2000:]
    # ... and was live-saved there, and ran on: a save of a booting kernel leaves it booting
    assert "guest continue" in boot.save_output, boot.save_output


def test_a_snapshot_taken_while_it_boots_carries_its_paravirtual_state(mid_boot):
    info = cli("inspect", mid_boot)
    assert info.returncode == 0, info.stdout + info.stderr
    for what in ("2 vCPU(s)", "kvm-clock system time", "kvm-clock wall clock", "PV EOI",
                 "steal time", "async PF"):
        assert what in info.stdout, (what, info.stdout)


def test_the_kernel_saved_while_it_boots_boots_on_eager_and_lazy(mid_boot):
    """The acid test of our state: restored in new processes, eagerly and lazily (both at
    once), the kernel boots on to the same end, with no clocksource marked unstable and
    no lockup."""
    runs = {how: cli_popen("restore", mid_boot, "--timeout", linux_boot.TIMEOUT, *flags)
            for how, flags in (("eager", ()), ("lazy", ("--lazy",)))}
    try:
        for how, p in runs.items():
            out, err = p.communicate(timeout=linux_boot.TIMEOUT + 300)
            boots_on_to_init(p.returncode, out, err)
    finally:
        for p in runs.values():
            p.kill()
            p.communicate()


def test_the_kernel_checkpointed_while_it_boots_and_killed_boots_on(mid_boot, tmp_path):
    """Restored and checkpointed on every 2 s while it boots; once two more checkpoints
    are committed on demand (the event, not a delay), SIGKILL: the checkpoint boots on
    to /init."""
    ckpt, sock = tmp_path / "g.ckpt", tmp_path / "ctl.sock"
    run = cli_popen("restore", mid_boot, "--checkpoint", ckpt, "--every", "2s", "--control",
                    sock, "--timeout", linux_boot.TIMEOUT, "-q")
    try:
        wait_until(lambda: ckpt.exists() or run.poll() is not None, 300, "a checkpoint")
        for _ in range(2):
            r = cli("checkpoint", "--control", sock, timeout=300)
            assert r.returncode == 0 and r.stdout.startswith("checkpoint "), r.stderr
    finally:
        run.send_signal(signal.SIGKILL)
        run.communicate()
    p = cli("restore", ckpt, "--timeout", linux_boot.TIMEOUT, timeout=linux_boot.TIMEOUT + 300)
    boots_on_to_init(p.returncode, p.stdout, p.stderr)


def test_the_kernel_reset_in_place_to_a_mid_boot_point_boots_on(mid_boot):
    """Reset in place, three times, to the mid-boot snapshot (each time once the kernel
    has written 100 distinct pages since: the event, not a delay), then it boots on to
    /init."""
    from migrate.reader import restore
    from migrate.reset import ResetPoint
    m, _ = restore(str(mid_boot))
    try:
        point = ResetPoint(m, str(mid_boot))
        watch = m.dirty.open("test")
        m.start()
        for _ in range(3):
            written: set = set()

            def wrote_100() -> bool:
                m.dirty.harvest()
                for slot, pages in watch.take().items():
                    written.update((slot, int(p)) for p in pages)
                return len(written) >= 100 or not m.running
            wait_until(wrote_100, 900, "the kernel writing 100 pages")
            assert m.running, m.serial.text()[-3000:]
            assert point.reset(clear_console=True) >= 100
            watch.take()                 # the pages the reset itself wrote back
        result = m.wait(linux_boot.TIMEOUT)
        out = m.serial.text()
        assert result.event == "panic" and "Attempted to kill init!" in result.panic, out[-3000:]
        assert "Run /init as init process" in out and "soft lockup" not in out, out[-3000:]
        point.close()
    finally:
        m.close()


def test_the_kernel_saved_while_it_boots_opens_in_gdb(mid_boot, tmp_path):
    """The mid-boot snapshot restored stopped for gdb: both vCPUs are threads in the
    kernel's half of the address space, memory reads through the kernel's page tables,
    stepi steps kernel code; killed from gdb."""
    import re
    import shutil
    import subprocess
    from helpers import read_until
    gdb = shutil.which("gdb")
    assert gdb, "gdb is missing: `make test` installs it (scripts/bootstrap)"
    sock = tmp_path / "gdb.sock"
    p = cli_popen("restore", mid_boot, "--lazy", "-q", "--gdb", sock)
    read_until(p.stderr, "the guest waits for gdb")
    script = tmp_path / "linux.gdb"
    script.write_text("\n".join([
        "set pagination off", "set confirm off", f"target remote {sock}", "info threads",
        'printf "@pc=%#lx\\n", $pc', "x/1xb $pc", "stepi", 'printf "@pc=%#lx\\n", $pc',
        "thread 2", 'printf "@pc=%#lx\\n", $pc', "kill"]) + "\n")
    out = subprocess.run([gdb, "-batch", "-nx", "-x", str(script)], capture_output=True,
                         text=True, timeout=300).stdout
    pcs = [int(x, 16) for x in re.findall(r"^@pc=(\S+)$", out, re.M)]
    assert len(pcs) == 3 and all(pc >= 0xffffffff80000000 for pc in pcs), out
    assert re.search(r"1 +Thread 1 \(vCPU 0, long mode, CPL0", out), out
    assert re.search(r"2 +Thread 2 \(vCPU 1, long mode, CPL0", out), out
    assert re.search(r"0xffffffff[0-9a-f]+:\s+0x[0-9a-f]{2}", out), out    # kernel memory
    assert p.wait(timeout=120) == 1 and "gdb killed the guest" in p.stderr.read()
