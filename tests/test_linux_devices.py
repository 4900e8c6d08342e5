"""The minimal kernel for test guests (scripts/build-linux: Debian's linux-source-6.1,
tinyconfig + guests/linux/kvmguest.config) on kvmguest's virtio devices: it mounts an
ext4 root from virtio-blk and runs /sbin/init from it, its whole log on hvc0 alone, the
rng device feeds it; saved live while init pages itself in from the disk, the restored
kernel reads on and init proves it read every byte right; its netconsole's lines reach a
UDP socket through a tap in a network namespace the test makes."""

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
BLOB = 16 << 20                 # bytes init hashes, paged in from the disk as it reads


@pytest.fixture(scope="session")
def minimal_kernel() -> Path:
    p = subprocess.run([str(ROOT / "scripts" / "build-linux")], capture_output=True,
                       text=True, timeout=BUILD_TIMEOUT)
    if p.returncode != 0:
        pytest.fail(f"scripts/build-linux failed: {p.stderr.strip()[-2000:]}", pytrace=False)
    return Path(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def root_disk(tmp_path_factory) -> tuple[Path, int]:
    """An ext4 image whose /sbin/init hashes 16 MiB of itself (guests/linux/init.c) and
    faults at the address that says the hash; the image and that address."""
    import numpy as np
    d = tmp_path_factory.mktemp("root")
    tree = d / "tree"
    for sub in ("sbin", "dev", "proc", "sys"):
        (tree / sub).mkdir(parents=True)
    blob = np.random.default_rng(27).bytes(BLOB)
    (d / "blob").write_bytes(blob)
    subprocess.run(["gcc", "-static", "-nostdlib", "-O2", f'-DBLOB="{d / "blob"}"', "-o",
                    str(tree / "sbin" / "init"), str(ROOT / "guests" / "linux" / "init.c")],
                   check=True)
    words = np.frombuffer(blob, dtype="<u8")
    with np.errstate(over="ignore"):
        h = int(np.sum(words * (2 * np.arange(len(words), dtype=np.uint64) + 1),
                       dtype=np.uint64))
    address = 0x500000000000 + (((h ^ (h >> 32)) & 0xFFFFFFFF) << 12)
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    subprocess.run([mkfs, "-q", "-F", "-d", str(tree), str(d / "root.img"), "32M"], check=True)
    return d / "root.img", address


def test_linux_on_virtio_saved_live_while_init_pages_in_from_its_disk(
        minimal_kernel, root_disk, machine_factory, tmp_path):
    """console=hvc0 and nothing else: the whole log arrives through virtio-console (its
    first line too: the kernel's replay at registration, see
    guests/linux/patches/); the root is ext4 on /dev/vda; the rng device's buffers are
    filled. The guest is saved live as init starts, while the kernel pages init's 16 MiB
    in from the disk; the restored kernel reads on, and init's fault address says the hash
    of every byte it read (it can make no system call here)."""
    from kvmguest.devices import DeviceSpec
    from migrate.precopy import live_save
    from migrate.reader import restore
    image, address = root_disk
    m = machine_factory(str(minimal_kernel), memory=256 << 20, cmdline=CMDLINE,
                        virtio=[DeviceSpec("blk", {"path": str(image), "readonly": True}),
                                DeviceSpec("console"), DeviceSpec("rng")])
    m.start()
    assert m.serial.wait_for("Run /sbin/init as init process", BOOT_TIMEOUT), \
        m.serial.text()[-3000:]
    snap = tmp_path / "linux.snap"
    live_save(m, str(snap), then="stop")
    log = m.serial.text()
    assert log.lstrip().startswith("[    0.000000] Linux version"), log[:2000]
    assert "Command line: console=hvc0 root=/dev/vda" in log, log[:3000]
    assert "virtio_blk virtio0: [vda] 65536 512-byte logical blocks" in log, log[-3000:]
    assert "VFS: Mounted root (ext4 filesystem)" in log, log[-3000:]
    assert m.devices.virtio.transports["virtio-rng0"].device.given > 0
    m.close()
    r, _ = restore(str(snap))
    try:
        r.start()
        result = r.wait(BOOT_TIMEOUT)
    finally:
        r.close()
    assert f"init[1]: segfault at {address:x}" in result.console, result.console[-3000:]
    assert result.event == "panic" and "Attempted to kill init" in result.panic


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
                            str(minimal_kernel), str(root_disk[0]), str(BOOT_TIMEOUT)], cwd=ROOT,
                           capture_output=True, text=True, timeout=BOOT_TIMEOUT + MARGIN)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "netconsole: network logging started" in p.stdout or \
        "Run /sbin/init" in p.stdout, p.stdout[-3000:]
    assert "Run /sbin/init as init process" in p.stdout, p.stdout[-3000:]
