"""virtio devices on the virtio-mmio transport, driven by our own virtio guest (as
kvm-unit-tests' virtio tests do): block reads, writes, flush and id; read-only honoured
by the device; entropy; broken queues set NEEDS_RESET and the VMM goes on; a guest reading
its disk while saved live restores and reads on; a snapshot names its disks and refuses
one that changed."""

from __future__ import annotations

import os
import struct

import pytest

from helpers import GO, MARGIN, Running, cli, guest, one_line_error

pytestmark = pytest.mark.kvm
SECTORS = 2048


def checksum(data: bytes) -> str:
    s = 0
    for b in data:
        s = (s * 31 + b) & 0xFFFFFFFF
    return f"{s:x}"


@pytest.fixture
def disk(tmp_path):
    """An image whose sector 0 holds a pattern and every sector k >= 2 holds k."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 2 + bytes(512))
        for k in range(2, SECTORS):
            f.write(struct.pack("<Q", k).ljust(512, b"\xaa"))
    return path


def test_a_disk_is_read_written_flushed_and_named(disk):
    p = cli("run", guest("virtio"), "--disk", disk, "--device", "rng", timeout=MARGIN)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    pattern = bytes((i * 7 + 1) & 0xFF for i in range(512))
    assert f"virtio: blk at 0xd0000000, {SECTORS} sectors" in out
    assert "virtio: id kvmguest0" in out
    assert "virtio: write status 0" in out and "virtio: flush status 0" in out
    assert f"virtio: read status 0, sector 0 sum {checksum(bytes(range(256)) * 2)}, " \
        f"sector 1 sum {checksum(pattern)}" in out, out
    assert disk.read_bytes()[512:1024] == pattern            # the write reached the image
    assert "virtio: rng gave 64 bytes" in out


def test_a_readonly_disk_refuses_writes_in_the_device(disk):
    before = disk.read_bytes()
    p = cli("run", guest("virtio"), "--disk", f"{disk},readonly", "--cmdline", "readonly",
            timeout=MARGIN)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "virtio: write status 1" in p.stdout             # VIRTIO_BLK_S_IOERR
    assert disk.read_bytes() == before


def test_a_looping_descriptor_chain_sets_needs_reset_and_the_vmm_goes_on(disk):
    p = cli("run", guest("virtio"), "--disk", disk, "--cmdline", "loop", timeout=MARGIN)
    assert p.returncode == 0 and "(needs reset)" in p.stdout, p.stdout + p.stderr
    assert "a descriptor chain longer than the queue (16): a loop?" in p.stderr


def test_bad_disks_are_one_line_before_boot(tmp_path, disk):
    one_line_error(cli("run", guest("hello"), "--disk", tmp_path / "nope.img"), 2,
                   "nope.img: No such file or directory")
    one_line_error(cli("run", guest("hello"), "--disk", "/dev/null"), 2,
                   "is a character device, not a regular file")
    one_line_error(cli("run", guest("hello"), "--disk", tmp_path), 2, "is a directory")
    p = cli("run", guest("hello"), "--disk", f"{disk},rw")    # argparse's usage + one line
    assert p.returncode == 2 and "unknown disk option 'rw'" in p.stderr
    assert "Traceback" not in p.stderr
    os.chmod(disk, 0o444)
    if os.geteuid() != 0:              # root opens it anyway
        one_line_error(cli("run", guest("hello"), "--disk", disk), 2, "add ,readonly")
    held = Running("run", guest("virtio"), "--disk", disk, "--cmdline", "reads=0")
    try:
        held.until("virtio: read 256 ok")
        one_line_error(cli("run", guest("hello"), "--disk", disk), 2,
                       "is in use by another guest")
    finally:
        held.stop()


def test_a_guest_reading_its_disk_saved_live_restores_and_reads_on(tmp_path, disk):
    """The used ring and the read data are written by the device, not the guest: they
    must be in the snapshot (marked dirty), and the queue's cursors in its state."""
    snap = tmp_path / "g.snap"
    p = cli("run", guest("virtio"), "--disk", disk, "--cmdline", "reads=300 oninput",
            "--save", snap, "--save-after", "0.5", "-q", timeout=MARGIN)
    assert p.returncode == 0, p.stderr
    info = cli("inspect", snap, "--json")
    assert info.returncode == 0
    r = cli("restore", snap, "--console-input", input=GO, timeout=MARGIN)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "go after" in r.stdout and "virtio: every read right" in r.stdout, r.stdout[-2000:]


def test_a_snapshot_refuses_a_disk_that_changed_and_takes_a_moved_one(tmp_path, disk):
    snap = tmp_path / "g.snap"
    p = cli("run", guest("virtio"), "--disk", disk, "--cmdline", "reads=300 oninput",
            "--save", snap, "--save-after", "0.5", "-q", timeout=MARGIN)
    assert p.returncode == 0, p.stderr
    moved = tmp_path / "moved.img"
    moved.write_bytes(disk.read_bytes())
    os.utime(disk)                                           # touched: not the same disk
    one_line_error(cli("restore", snap), 2, "is not the one the snapshot was taken with",
                   "mtime_ns changed")
    r = cli("restore", snap, "--console-input", "--disk", moved, input=GO, timeout=MARGIN)
    assert r.returncode == 0 and "virtio: every read right" in r.stdout, r.stderr
    with open(moved, "r+b") as f:
        f.truncate(SECTORS * 512 // 2)
    one_line_error(cli("restore", snap, "--disk", f"virtio-blk0={moved}"), 2,
                   "its size changed")


def test_the_dsdt_describes_each_device_as_firecracker_does(machine_factory, disk):
    """Device (VRnn) { _HID "LNRO0005", _UID n, _CRS { Memory32Fixed (RW, window, 4K),
    Interrupt (Consumer, Edge, ActiveHigh) { line } } } in \\_SB (bytes checked with iasl -d)."""
    from kvmguest.arch.x86 import acpi, layout
    from kvmguest.devices import DeviceSpec
    m = machine_factory(guest("hello"), virtio=[DeviceSpec("blk", {"path": str(disk)}),
                                                DeviceSpec("rng")])
    fadt = m.memory.read(layout.ACPI_RSDP, 36)          # RSDP -> XSDT -> FADT -> DSDT
    xsdt_at = struct.unpack_from("<Q", fadt, 24)[0]
    fadt_at = struct.unpack_from("<Q", m.memory.read(xsdt_at, 52), 44)[0]
    dsdt_at = struct.unpack_from("<I", m.memory.read(fadt_at, 44), 40)[0]
    length = struct.unpack_from("<I", m.memory.read(dsdt_at, 8), 4)[0]
    table = m.memory.read(dsdt_at, length)
    assert table == acpi.dsdt([(0xD0000000, 5), (0xD0001000, 6)]) and sum(table) % 256 == 0
    assert table[36:].hex().startswith(
        "1041085c5f53425f5b823b56523030085f4849440d4c4e524f3030303500085f5549440a00085f4352"
        "53111a0a1786090001000000d00010000089060003010500000079005b823b5652303108")


NET_PEER = r'''
import select, socket, subprocess, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
s.bind(("kvt0", 0))
p = subprocess.Popen([sys.executable, "-m", "kvmguest", "run", sys.argv[1], "--net",
                      "tap=kvt0,mac=52:54:00:aa:bb:cc", "--cmdline", "net"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
assert select.select([s], [], [], float(sys.argv[2]))[0], "no frame from the guest"
frame = s.recv(2048)
print("host got:", frame[:6].hex(), frame[6:12].hex(), frame[14:34].decode())
s.send(frame[6:12] + bytes.fromhex("020000000001") + b"\x88\xb5"
       + b"hello from the host".ljust(46, b"\0"))
out, err = p.communicate(timeout=float(sys.argv[2]))
print(out + err + f"exit {p.returncode}")
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace and a tap")
def test_a_network_device_sends_and_receives_frames_through_a_tap(tmp_path):
    """In a network namespace the test makes (nothing leaves it): the guest's frame comes
    out of the tap with its MAC; a frame sent into the tap reaches the guest."""
    import subprocess
    import sys
    from helpers import ROOT
    ns = f"kvmguest-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "kvt0", "mode", "tap"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "kvt0", "up"], check=True)
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", NET_PEER,
                            str(guest("virtio")), str(MARGIN)], cwd=ROOT, capture_output=True,
                           text=True, timeout=MARGIN * 2)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "host got: ffffffffffff 525400aabbcc hello from the guest" in p.stdout, p.stdout
    assert "virtio: net at 0xd0000000, mac 52:54:0:aa:bb:cc" in p.stdout
    assert "virtio: frame received: hello from the host" in p.stdout and "exit 0" in p.stdout


def resets_page_exact(machine_factory, tmp_path, spec, cmdline: str, progress: str) -> None:
    """The virtio guest saved live once it reports ``progress`` 256, restored, and reset
    in place three times, each after it went on (a ``progress`` line): every block the
    snapshot holds (RAM, device memory) is as saved after each reset, and the guest's
    own checks hold to the end."""
    import numpy as np

    from helpers import wait_console
    from migrate.precopy import live_save
    from migrate.reader import restore
    from migrate.reset import ResetPoint
    src = machine_factory(guest("virtio"), virtio=[spec], cmdline=cmdline)
    src.start()
    wait_console(src, f"{progress} 256 ok")
    path = tmp_path / "g.snap"
    live_save(src, str(path), then="stop")
    src.close()
    m, _ = restore(str(path))
    try:
        point = ResetPoint(m, str(path))
        snap = {r.slot: r.pages().copy() for r in m.memory.saved_regions}
        m.start()
        for round_ in range(3):
            m.serial.clear_output()
            wait_console(m, progress)                   # it went on from the snapshot
            m.pause_all()
            assert point.reset() > 0
            for r in m.memory.saved_regions:
                assert np.array_equal(r.pages(), snap[r.slot]), (round_, r.slot)
            m.resume_all()
        m.serial.clear_output()
        wait_console(m, progress)
        assert "BAD" not in m.serial.text()
        point.close()
    finally:
        m.close()


def test_a_guest_reading_its_disk_resets_in_place_page_exact(machine_factory, tmp_path, disk):
    """The device's writes into guest RAM (read data, used ring) are dirty pages like the
    guest's: a reset in place puts every one back, and the guest reads on."""
    from kvmguest.devices import DeviceSpec
    resets_page_exact(machine_factory, tmp_path,
                      DeviceSpec("blk", {"path": str(disk), "readonly": True}),
                      "readonly reads=0", "virtio: read")


def test_a_checkpointed_guest_reading_its_disk_killed_restores_and_reads_on(tmp_path, disk):
    import signal
    ckpt = tmp_path / "g.ckpt"
    run = Running("run", guest("virtio"), "--disk", f"{disk},readonly", "--cmdline",
                  "readonly reads=300 oninput", "--checkpoint", ckpt, "--every", "50ms")
    run.until("virtio: read 512 ok")
    from helpers import wait_until
    wait_until(lambda: ckpt.exists() and cli("inspect", ckpt).returncode == 0,
               what="a complete checkpoint")
    run.p.send_signal(signal.SIGKILL)
    run.p.communicate(timeout=MARGIN)
    r = cli("restore", ckpt, "--console-input", input=GO, timeout=MARGIN)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "go after" in r.stdout and "virtio: every read right" in r.stdout, r.stdout[-2000:]


# --- overlay disks: the guest's writes kept with RAM, never in the image --------------------
def sha(path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_overlay_takes_the_guests_writes_and_never_touches_the_image(disk):
    before = sha(disk)
    p = cli("run", guest("virtio"), "--disk", f"{disk},overlay", "--cmdline", "writes=600",
            timeout=MARGIN)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    pattern = bytes((i * 7 + 1) & 0xFF for i in range(512))
    assert "virtio: write status 0" in p.stdout
    assert f"sector 1 sum {checksum(pattern)}" in p.stdout            # read back from it
    assert "virtio: every write kept" in p.stdout, p.stdout[-2000:]
    assert sha(disk) == before
    # Many guests may share the image: an overlay takes a shared lock, as readonly does.
    held = Running("run", guest("virtio"), "--disk", f"{disk},overlay", "--cmdline",
                   "writes=0")
    try:
        held.until("virtio: write 256 ok")
        again = cli("run", guest("virtio"), "--disk", f"{disk},overlay", "--cmdline",
                    "writes=300", timeout=MARGIN)
        assert again.returncode == 0 and "virtio: every write kept" in again.stdout
        one_line_error(cli("run", guest("hello"), "--disk", disk), 2,
                       "is in use by another guest")
    finally:
        held.stop()
    p = cli("run", guest("hello"), "--disk", f"{disk},overlay,readonly")
    assert p.returncode == 2 and "readonly or overlay, not both" in p.stderr
    assert "Traceback" not in p.stderr


def test_an_overlay_saved_live_restores_its_writes_with_ram(tmp_path, disk):
    """Blocks and RAM from the same instant: the guest checks every read against what its
    RAM says it last wrote (a disk a write ahead or behind its RAM is caught), and at
    the end every sector."""
    before = sha(disk)
    snap = tmp_path / "g.snap"
    p = cli("run", guest("virtio"), "--disk", f"{disk},overlay", "--cmdline",
            "writes=300 oninput", "--save", snap, "--save-after", "0.5", "-q", timeout=MARGIN)
    assert p.returncode == 0, p.stderr
    info = cli("inspect", snap)
    assert info.returncode == 0 and "block virtio-blk0-overlay" in info.stdout, info.stdout
    assert "RAM 64 MiB" in info.stdout
    for _ in range(2):                        # the snapshot, not the last run, holds them
        r = cli("restore", snap, "--console-input", input=GO, timeout=MARGIN)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
        assert "go after" in r.stdout and "virtio: every write kept" in r.stdout, \
            r.stdout[-2000:]
    assert sha(disk) == before


def test_an_overlay_checkpointed_and_killed_mid_write_restores_disk_and_ram_together(
        tmp_path, disk):
    import signal

    from helpers import wait_until
    before = sha(disk)
    ckpt = tmp_path / "g.ckpt"
    run = Running("run", guest("virtio"), "--disk", f"{disk},overlay", "--cmdline",
                  "writes=300 oninput", "--checkpoint", ckpt, "--every", "20ms")
    run.until("virtio: write 768 ok")
    wait_until(lambda: ckpt.exists() and cli("inspect", ckpt).returncode == 0,
               what="a complete checkpoint")
    run.p.send_signal(signal.SIGKILL)        # mid-write: the guest never stops writing
    run.p.communicate(timeout=MARGIN)
    r = cli("restore", ckpt, "--console-input", input=GO, timeout=MARGIN)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "go after" in r.stdout and "virtio: every write kept" in r.stdout, r.stdout[-2000:]
    assert sha(disk) == before


def test_an_overlay_resets_in_place_with_ram(machine_factory, tmp_path, disk):
    """A reset puts the overlay's blocks and its block map back with RAM: the guest
    writes on from the snapshot and every check it makes holds."""
    from kvmguest.devices import DeviceSpec
    resets_page_exact(machine_factory, tmp_path,
                      DeviceSpec("blk", {"path": str(disk), "overlay": True}), "writes=0",
                      "virtio: write")


def test_console_input_reaches_hvc0_as_it_reaches_the_uart():
    """What the console is given (standard input here) goes to hvc0 through the receive
    buffers the guest offers, whenever it arrives (before the driver came up, too)."""
    p = cli("run", guest("virtio"), "--device", "console", "--cmdline", "console",
            "--console-input", input="ping from the host\n", timeout=MARGIN)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "virtio: hello on hvc0" in p.stdout                   # its output: stdout
    assert "virtio: hvc0 input: ping from the host" in p.stdout, p.stdout


def test_hvc0_input_waiting_in_the_device_travels_in_its_state(machine_factory):
    """Input not yet delivered is device state: it is saved, checked, and given to the
    guest of the machine the state is restored into."""
    from kvmguest.devices import DeviceSpec
    from kvmguest.devices.virtio import check_state
    first = machine_factory(guest("virtio"), virtio=[DeviceSpec("console")], cmdline="console")
    first.console.send(b"early ")             # before the guest runs: waits in the device
    state = first.devices.virtio.save_state()["virtio-console0"]
    assert state["device"] == {"input": b"early ".hex()}
    assert check_state("virtio-console0", state) is None
    assert "hex" in check_state("virtio-console0", {**state, "device": {"input": "zz"}})
    m = machine_factory(guest("virtio"), virtio=[DeviceSpec("console")], cmdline="console")
    m.devices.virtio.restore_state({"virtio-console0": state})
    m.start()
    assert m.serial.wait_for("hello on hvc0", MARGIN)
    m.console.send(b"and late\n")
    result = m.wait(MARGIN)
    assert result.exit_code == 0 and "virtio: hvc0 input: early and late" in result.console


def test_a_damaged_overlay_block_map_is_refused_before_any_device_exists():
    """The overlay's block map is input like the rest of a snapshot: bad base64, a map
    longer or shorter than its disk, a decompression bomb, a wrong block count: each
    one line, checked by check_state before a restore makes anything."""
    import base64
    import zlib

    from kvmguest.devices.virtio import check_state
    from kvmguest.devices.virtio.blk import check_overlay_state

    def held(raw: bytes) -> str:
        return base64.b64encode(zlib.compress(raw)).decode()
    good = {"blocks": 256, "held": held(bytes(32))}
    assert check_overlay_state(good) is None
    assert "damaged" in check_overlay_state({**good, "held": "***"})
    assert "longer" in check_overlay_state({**good, "held": held(bytes(33))})
    assert "shorter" in check_overlay_state({**good, "held": held(bytes(31))})
    assert "longer" in check_overlay_state({**good, "held": held(bytes(64 << 20))})
    assert "block count" in check_overlay_state({"blocks": -1, "held": good["held"]})
    assert "256 blocks, the disk 512" in check_overlay_state(good, 512)
    disk = {"path": "/x.img", "size": 1 << 20, "inode": 1, "mtime_ns": 1}
    state = {"status": 0, "driver_features": 0, "offered": 1 << 32, "interrupt_status": 0,
             "queue_sel": 0, "dev_features_sel": 0, "drv_features_sel": 0,
             "config_generation": 0, "index": 0, "queues": [],
             "device": {"disk": disk, "readonly": False, "overlay": {**good, "held": "!"}}}
    assert "virtio-blk0: the overlay's block map is damaged" in check_state("virtio-blk0", state)


def test_an_overlay_of_a_disk_that_ends_mid_block_reads_and_writes_its_last_sector(tmp_path):
    """A disk whose size is not a whole number of overlay blocks (4 KiB): its last block
    is partly past the end; the last sector is still written to and read from it."""
    path = tmp_path / "odd.img"
    sectors = 2047                               # 1 MiB - 512: the last block ends early
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 2 + bytes(512))
        for k in range(2, sectors):
            f.write(struct.pack("<Q", k).ljust(512, b"\xaa"))
    before = sha(path)
    p = cli("run", guest("virtio"), "--disk", f"{path},overlay", "--cmdline", "writes=4100",
            timeout=MARGIN)
    assert p.returncode == 0 and f"{sectors} sectors" in p.stdout, p.stdout[-2000:] + p.stderr
    assert "virtio: every write kept" in p.stdout, p.stdout[-2000:]
    assert sha(path) == before
