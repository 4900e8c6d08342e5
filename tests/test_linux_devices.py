"""The minimal kernel for test guests (scripts/build-linux: Debian's linux-source-6.1,
tinyconfig + guests/linux/kvmguest.config) on kvmguest's virtio devices: it mounts an
ext4 root from virtio-blk and runs /sbin/init from it, its whole log on hvc0 alone, the
rng device feeds it, and its netconsole's lines reach a UDP socket through a tap in a
network namespace the test makes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import MARGIN, ROOT

pytestmark = pytest.mark.kvm
BUILD_TIMEOUT = 3600            # the first build on a machine (cached after): ~20 minutes
BOOT_TIMEOUT = 1800             # seconds for a boot to /sbin/init, on a loaded machine too
CMDLINE = "console=hvc0 root=/dev/vda"


@pytest.fixture(scope="session")
def minimal_kernel() -> Path:
    p = subprocess.run([str(ROOT / "scripts" / "build-linux")], capture_output=True,
                       text=True, timeout=BUILD_TIMEOUT)
    if p.returncode != 0:
        pytest.fail(f"scripts/build-linux failed: {p.stderr.strip()[-2000:]}", pytrace=False)
    return Path(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def root_disk(tmp_path_factory) -> Path:
    """An ext4 image whose /sbin/init faults at 0xdead000 (guests/linux/init.c)."""
    d = tmp_path_factory.mktemp("root")
    tree = d / "tree"
    for sub in ("sbin", "dev", "proc", "sys"):
        (tree / sub).mkdir(parents=True)
    subprocess.run(["gcc", "-static", "-nostdlib", "-O2", "-o", str(tree / "sbin" / "init"),
                    str(ROOT / "guests" / "linux" / "init.c")], check=True)
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    subprocess.run([mkfs, "-q", "-F", "-d", str(tree), str(d / "root.img"), "16M"], check=True)
    return d / "root.img"


def test_linux_mounts_its_root_from_virtio_blk_and_logs_on_hvc0_alone(minimal_kernel,
                                                                      root_disk,
                                                                      machine_factory):
    """console=hvc0 and nothing else: the log arrives through virtio-console (from the
    moment its driver is up: what the kernel printed before is not replayed on hvc0, see
    docs/devices.md), the panic line there ends the run; the root is ext4 on /dev/vda; init
    runs (and faults where it says); the rng device's buffers were filled."""
    from kvmguest.devices import DeviceSpec
    m = machine_factory(str(minimal_kernel), memory=256 << 20, cmdline=CMDLINE,
                        virtio=[DeviceSpec("blk", {"path": str(root_disk), "readonly": True}),
                                DeviceSpec("console"), DeviceSpec("rng")])
    result = m.run(timeout=BOOT_TIMEOUT)
    log = result.console
    assert "virtio_blk virtio0: [vda] 32768 512-byte logical blocks" in log, log[-3000:]
    assert "VFS: Mounted root (ext4 filesystem)" in log, log[-3000:]
    assert "Run /sbin/init as init process" in log, log[-3000:]
    assert "segfault at dead000" in log, log[-3000:]
    assert result.event == "panic" and "Attempted to kill init" in result.panic
    assert m.devices.virtio.transports["virtio-rng0"].device.given > 0


NETCONSOLE_PEER = r'''
import socket, subprocess, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("10.0.2.2", 6666))
u.settimeout(float(sys.argv[3]))
p = subprocess.Popen([sys.executable, "-m", "kvmguest", "run", sys.argv[1], "--memory", "256M",
                      "--disk", sys.argv[2] + ",readonly", "--net", "tap=kvt0",
                      "--cmdline", "console=ttyS0 root=/dev/vda ip=10.0.2.15::10.0.2.2:255.255.255.0"
                      "::eth0:off netconsole=@10.0.2.15/eth0,6666@10.0.2.2/", "-q"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
lines = []
try:
    while True:
        data = u.recv(4096).decode(errors="replace")
        lines.append(data)
        if "Run /sbin/init" in data or "Attempted to kill init" in data:
            break
finally:
    p.kill()
    p.communicate()
print("".join(lines))
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace and a tap")
def test_netconsole_sends_the_kernel_log_through_virtio_net(minimal_kernel, root_disk):
    ns = f"kvmguest-net-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["tuntap", "add", "kvt0", "mode", "tap"], ["link", "set", "lo", "up"],
                    ["addr", "add", "10.0.2.2/24", "dev", "kvt0"],
                    ["link", "set", "kvt0", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", NETCONSOLE_PEER,
                            str(minimal_kernel), str(root_disk), str(BOOT_TIMEOUT)], cwd=ROOT,
                           capture_output=True, text=True, timeout=BOOT_TIMEOUT + MARGIN)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "netconsole: network logging started" in p.stdout or \
        "Run /sbin/init" in p.stdout, p.stdout[-3000:]
    assert "Run /sbin/init as init process" in p.stdout, p.stdout[-3000:]
