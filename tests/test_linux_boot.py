"""Debian's stock kernel booted all the way to its initrd's /init (`make linux`: about 15
minutes on a host that emulates kernel code, so not part of `make test`).

On this host user mode cannot make system calls, so /init dies at its first one and the
kernel panics ("Attempted to kill init!"); on a host where it can, /init exits and the
kernel panics just the same. Either way the run ends with 122 and the panic line."""

from __future__ import annotations

import subprocess

import pytest

from helpers import cli

# What Debian's kernel needs on a kvm_pvm host (README, "Linux kernels"; DEVELOPERS.md).
CMDLINE = ("console=ttyS0 earlyprintk=serial,ttyS0 noxsave clearcpuid=smap,smep,fsgsbase,"
           "avx,avx2,umip,popcnt,movbe,ssse3,sse4_1,sse4_2,aes,pclmulqdq,rdrand,rdseed,erms,"
           "fsrm,bmi1,bmi2,sha_ni initcall_blacklist=ftrace_check_for_weak_functions "
           "preempt=full cryptomgr.notests")
INIT = """
.globl _start
_start:
    mov $60, %eax           /* exit(0) */
    xor %edi, %edi
    syscall
    hlt
"""


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory):
    """A newc initramfs whose /init exits at once (built with gcc and Debian's cpio)."""
    work = tmp_path_factory.mktemp("initramfs")
    (work / "init.S").write_text(INIT)
    root = work / "root"
    root.mkdir()
    subprocess.run(["gcc", "-nostdlib", "-static", "-o", root / "init", work / "init.S"],
                   check=True)
    with open(work / "initramfs.cpio", "wb") as out:
        subprocess.run("find . | cpio -o -H newc --quiet", shell=True, cwd=root, stdout=out,
                       check=True)
    return work / "initramfs.cpio"


def test_debians_kernel_boots_to_its_initrds_init(vmlinuz, initramfs):
    p = cli("run", vmlinuz, "--memory", "512M", "--vcpus", "2", "--cpu", "host,-cx16",
            "--initrd", initramfs, "--cmdline", CMDLINE, "--timeout", "2400", "-v",
            timeout=2500)
    out = p.stdout
    assert "Unpacking initramfs" in out or "Freeing initrd memory" in out, out[-3000:]
    assert "Run /init as init process" in out, out[-3000:]
    assert p.returncode == 122 and "Attempted to kill init!" in p.stderr, \
        (p.returncode, p.stderr[-2000:])
    assert "as unstable" not in out, "a clocksource was marked unstable"


def boots_on_to_init(p) -> None:
    """A restore of a booting Debian kernel reached /init as a boot does, cleanly."""
    assert "Run /init as init process" in p.stdout, p.stdout[-3000:]
    assert p.returncode == 122 and "Attempted to kill init!" in p.stderr, \
        (p.returncode, p.stderr[-2000:])
    assert "as unstable" not in p.stdout and "soft lockup" not in p.stdout, p.stdout[-3000:]


@pytest.fixture(scope="module")
def mid_boot(vmlinuz, initramfs, tmp_path_factory):
    """Debian's kernel live-saved while it boots: two vCPUs deep in their initcalls
    (kvm-clock just chosen, timers and IPIs flowing)."""
    from helpers import cli_popen, read_until
    work = tmp_path_factory.mktemp("mid-boot")
    sock, snap = work / "ctl.sock", work / "mid.snap"
    run = cli_popen("run", vmlinuz, "--memory", "512M", "--vcpus", "2", "--cpu", "host,-cx16",
                    "--initrd", initramfs, "--cmdline", CMDLINE, "--control", sock,
                    "--timeout", "2400")
    try:
        read_until(run.stdout, "clocksource: Switched to clocksource kvm-clock", timeout=1200)
        saved = cli("save", "--control", sock, snap, "--then", "stop", timeout=300)
        assert saved.returncode == 0, saved.stderr
        assert run.wait(timeout=120) == 0
    finally:
        run.kill()
        run.communicate()
    return snap


@pytest.mark.parametrize("how", ["eager", "lazy"])
def test_debians_kernel_saved_while_it_boots_boots_on_from_the_snapshot(mid_boot, how):
    """The acid test of our state: restored in a new process, eagerly or lazily, the
    kernel boots on to the same end, with no clocksource marked unstable."""
    info = cli("inspect", mid_boot)
    assert "2 vCPU(s)" in info.stdout and "kvm-clock system time" in info.stdout and \
        "PV EOI" in info.stdout, info.stdout
    p = cli("restore", mid_boot, "--timeout", "2400", *(["--lazy"] if how == "lazy" else []),
            timeout=2500)
    boots_on_to_init(p)


def test_debians_kernel_checkpointed_while_it_boots_and_killed_boots_on(vmlinuz, initramfs,
                                                                       tmp_path):
    """Continuous checkpoints every 2 s while it boots, then SIGKILL: the last one boots
    on to /init."""
    import signal

    from helpers import cli_popen, read_until
    ckpt = tmp_path / "g.ckpt"
    run = cli_popen("run", vmlinuz, "--memory", "512M", "--vcpus", "2", "--cpu", "host,-cx16",
                    "--initrd", initramfs, "--cmdline", CMDLINE, "--checkpoint", ckpt,
                    "--every", "2s", "--timeout", "2400")
    try:
        read_until(run.stdout, "clocksource: Switched to clocksource kvm-clock", timeout=1200)
    finally:
        run.send_signal(signal.SIGKILL)
        run.communicate()
    boots_on_to_init(cli("restore", ckpt, "--timeout", "2400", timeout=2500))


def test_debians_kernel_reset_in_place_to_a_mid_boot_point_boots_on(mid_boot):
    """Reset in place, three times, to the mid-boot snapshot (each time once the kernel
    has written 100 distinct pages since: the event, not a delay), then it boots on to
    /init."""
    from helpers import wait_until
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
        result = m.wait(2400)
        out = m.serial.text()
        assert result.event == "panic" and "Attempted to kill init!" in result.panic, out[-3000:]
        assert "Run /init as init process" in out and "soft lockup" not in out, out[-3000:]
        point.close()
    finally:
        m.close()
