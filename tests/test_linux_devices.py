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
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = pytest.mark.kvm
BOOT_TIMEOUT = 1800             # seconds for a boot to /sbin/init, on a loaded machine too
CMDLINE = "console=hvc0 root=/dev/vda"
BLOB = 16 << 20                 # bytes init hashes, paged in from the disk as it reads


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


def in_netns(ns: str, fn):
    """``fn()`` in a thread that joined the network namespace ``ns``: the taps and sockets
    it opens stay in there (the rest of the process does not move)."""
    import ctypes
    import threading
    libc = ctypes.CDLL(None, use_errno=True)
    out: dict = {}

    def body():
        fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:                   # CLONE_NEWNET
                out["error"] = OSError(ctypes.get_errno(), f"setns into {ns}")
                return
        finally:
            os.close(fd)
        try:
            out["value"] = fn()
        except BaseException as err:
            out["error"] = err
    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def netns():
    """A network namespace with the tap kvt0 at 10.0.2.2/24 (nothing leaves it)."""
    ns = f"kvmguest-net-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["tuntap", "add", "kvt0", "mode", "tap"], ["link", "set", "lo", "up"],
                    ["addr", "add", "10.0.2.2/24", "dev", "kvt0"],
                    ["link", "set", "kvt0", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


NETCONSOLE = ("ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off "
              "netconsole=@10.0.2.15/eth0,6666@10.0.2.2/")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace and a tap")
def test_linux_on_virtio_devices_saved_live_while_init_pages_in_from_its_disk(
        minimal_kernel, root_disk, machine_factory, netns, tmp_path):
    """One boot of the minimal kernel on every device. console=hvc0 and nothing else: the
    whole log arrives through virtio-console (its first line too: the kernel's replay at
    registration, see guests/linux/patches/); the root is ext4 on /dev/vda; the rng
    device's buffers are filled; netconsole sends the log as UDP through virtio-net and a
    tap to a socket in a network namespace the test made. The guest is saved live as init
    starts, while the kernel pages init's 16 MiB in from the disk; the restored kernel
    reads on, and init's fault address says the hash of every byte it read (it can make
    no system call here)."""
    import socket
    import threading

    from kvmguest.devices import DeviceSpec
    from migrate.precopy import live_save
    from migrate.reader import restore
    image, address = root_disk

    def machine():
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("10.0.2.2", 6666))
        m = machine_factory(str(minimal_kernel), memory=256 << 20,
                            cmdline=f"{CMDLINE} {NETCONSOLE}",
                            virtio=[DeviceSpec("blk", {"path": str(image), "readonly": True}),
                                    DeviceSpec("net", {"ifname": "kvt0"}),
                                    DeviceSpec("console"), DeviceSpec("rng")])
        return m, udp
    m, udp = in_netns(netns, machine)
    received: list[str] = []
    done = threading.Event()

    def read_udp():
        udp.settimeout(0.2)
        while not done.is_set():
            try:
                received.append(udp.recv(4096).decode(errors="replace"))
            except TimeoutError:
                continue
    reader = threading.Thread(target=read_udp, daemon=True)
    reader.start()
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
    from helpers import wait_until
    wait_until(lambda: "Run /sbin/init as init process" in "".join(received), 60,
               "netconsole's line")
    assert "netconsole: network logging started" in "".join(received), received[-20:]
    done.set()
    reader.join()
    udp.close()
    r, _ = in_netns(netns, lambda: restore(str(snap)))
    try:
        r.start()
        result = r.wait(BOOT_TIMEOUT)
    finally:
        r.close()
    assert f"init[1]: segfault at {address:x}" in result.console, result.console[-3000:]
    assert result.event == "panic" and "Attempted to kill init" in result.panic
