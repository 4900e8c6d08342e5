"""Nothing is lost: killed and failed saves, full disks, read-only restores, permissions,
concurrency, misbehaving guests and impossible snapshots."""

import os
import signal
import subprocess
import threading

import pytest

from helpers import (GO, MARGIN, GiB, MiB, PAGE, RAM, assert_verified, cli, dirty_cmdline,
                     fingerprint, guest,
                     sparse_digest, start_dirty, wait_console, wait_until)
from kvmguest import GuestTimeout
from migrate import format as fmt
from migrate.format import SnapshotError
from migrate.pageio import open_excl
from migrate.precopy import live_save
from migrate.errors import SaveError
from migrate.writer import MappedWriter

BASE = 3 * GiB - 100 * PAGE


def save_cmd(path, pages=600, passes=40, after=0.7, *extra):
    """`run --save` of a dirty guest held by the "oninput" handshake: it never finishes
    before the save, whatever the host's speed; restored, it is told to go."""
    return ("run", guest("dirty"), "--memory", f"{RAM >> 20}M", "--cmdline",
            dirty_cmdline(pages, passes, BASE, oninput=True), "--save", path,
            "--save-after", after, *extra)


def assert_restores_and_verifies(path, pages=600, passes=40, lazy=False):
    p = cli("restore", path, "--console-input", *(["--lazy"] if lazy else []), input=GO,
            timeout=MARGIN)
    assert p.returncode == 0, p.stdout[-1000:] + p.stderr
    assert_verified(p.stdout, pages, passes, oninput=True)


KILL_POINTS = ["pass0", "midpass", "final-pass", "state", "before-rename"]


@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    """A good snapshot, made once, copied into each test's directory."""
    d = tmp_path_factory.mktemp("prev")
    path = d / "guest.snap"
    p = cli(*save_cmd(path, 600, 40, 0.7, "--threads", "2"))
    assert p.returncode == 0, p.stderr
    return path


@pytest.mark.parametrize("point", KILL_POINTS)
def test_save_killed_at_any_point_leaves_previous_snapshot_restorable(previous, tmp_path,
                                                                       point):
    path = tmp_path / "guest.snap"
    subprocess.run(["cp", "--sparse=always", previous, path], check=True)
    before = fingerprint(path)
    p = cli(*save_cmd(path, 600, 40, 0.5), env={"KVMGUEST_FAULT_POINT": point})
    assert p.returncode == -signal.SIGKILL, (point, p.returncode, p.stderr)
    assert fingerprint(path) == before
    assert_restores_and_verifies(path)
    # Whatever the killed save left behind is either refused, or complete and correct.
    leftovers = [f for f in tmp_path.iterdir() if f.name != "guest.snap"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".guest.snap.")
    assert os.stat(leftovers[0]).st_mode & 0o777 == 0o600
    info = cli("inspect", leftovers[0])
    if point == "before-rename":
        assert info.returncode == 0, info.stdout     # complete: must restore correctly
        assert_restores_and_verifies(leftovers[0])
    else:
        assert info.returncode == 1 and "INVALID" in info.stdout and "incomplete" in info.stdout


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs: the disk that fills up."""
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI runs as root and must run the disk-full test")
        pytest.skip("mounting a small filesystem needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_fails_clearly_keeps_guest_running_and_previous_snapshot(small_fs,
                                                                           machine_factory):
    path = small_fs / "guest.snap"
    small = machine_factory(guest("dirty"), memory=256 * MiB, cmdline="pages=100 passes=0")
    small.start()
    wait_console(small, "dirty: pass 2 ok")
    live_save(small, str(path), then="stop")          # ~0.5 MiB of pages: fits
    before = fingerprint(path)
    # 8000 pages (31 MiB) do not fit in 24 MiB.
    m = machine_factory(guest("dirty"), memory=256 * MiB,
                        cmdline=f"pages=8000 base={16 * MiB} passes=30 oninput")
    m.start()
    wait_console(m, "dirty: pass 1 ok")           # all 8000 pages hold data now
    with pytest.raises(SaveError, match="no space left on device"):
        live_save(m, str(path), then="continue")
    assert m.running
    assert fingerprint(path) == before
    assert [f.name for f in small_fs.iterdir()] == ["guest.snap"]
    fmt.read_snapshot(str(path))                      # still valid
    m.serial.feed(GO.encode())                        # it runs on to its end, verified
    result = m.wait(timeout=MARGIN)
    assert result.exit_code == 0
    assert_verified(result.console, 8000, 30, oninput=True)


@pytest.mark.parametrize("lazy", [False, True], ids=["preadv", "lazy"])
def test_restore_never_writes_its_input(previous, tmp_path, lazy):
    path = tmp_path / "ro.snap"
    subprocess.run(["cp", "--sparse=always", previous, path], check=True)
    before = (fingerprint(path), sparse_digest(path))
    assert_restores_and_verifies(path, lazy=lazy)   # the guest rewrites its pages meanwhile
    assert (fingerprint(path), sparse_digest(path)) == before


def test_symlink_at_the_output_path_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "link.snap"
    path.symlink_to(victim)
    from kvmguest.memory import GuestMemory
    from kvmguest.arch.x86.layout import plan_regions
    mem = GuestMemory.anonymous(plan_regions(8 * MiB))
    mem.regions[0].array[:PAGE] = 1
    w = MappedWriter(str(path), mem)
    w.write_pass(None)
    w.finish({"format": "kvmguest-state", "version": 1})
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and os.stat(path).st_mode & 0o777 == 0o600


def test_temporary_name_that_already_exists_is_never_opened(tmp_path):
    target = tmp_path / "planted"
    link = tmp_path / ".x.snap.planted.tmp"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        open_excl(str(link), False)
    assert not target.exists()


def test_second_concurrent_save_of_one_guest_is_refused(machine_factory, tmp_path):
    m = start_dirty(machine_factory, memory=256 * MiB, pages=500, base=16 * MiB)
    started, release, errors = threading.Event(), threading.Event(), []

    def slow(*_):
        started.set()
        release.wait(10)        # the first save holds here until the second has been refused

    def first():
        try:
            live_save(m, str(tmp_path / "a.snap"), then="continue", progress=slow,
                      min_passes=3, max_passes=3)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(10)
    with pytest.raises(SaveError, match="already in progress"):
        live_save(m, str(tmp_path / "b.snap"), then="continue")
    release.set()
    t.join()
    assert errors == [] and (tmp_path / "a.snap").exists() and not (tmp_path / "b.snap").exists()


def test_reader_racing_saves_of_the_same_path_sees_a_complete_snapshot(machine_factory,
                                                                        tmp_path):
    m = start_dirty(machine_factory, memory=256 * MiB, pages=500, base=16 * MiB)
    path = tmp_path / "race.snap"
    live_save(m, str(path), then="continue")
    stop, seen, failures = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                snap = fmt.read_snapshot(str(path))
                seen.add(snap.state["vcpus"][0]["regs"])
            except SnapshotError as err:
                failures.append(str(err))

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(4):
        live_save(m, str(path), then="continue")
    stop.set()
    t.join()
    assert failures == []
    assert len(seen) >= 2                      # it did see old and new snapshots


def test_console_flood_is_bounded_and_the_timeout_still_works(machine_factory):
    m = machine_factory(guest("flood"), console_capacity=16 * 1024)
    with pytest.raises(GuestTimeout):
        m.run(timeout=3)
    assert len(m.serial.output) == 16 * 1024
    assert m.serial.dropped > 0
    # The newest output is kept: the last complete line is a flood line (the guest was
    # stopped mid-line, so the very last one may be partial).
    complete = m.serial.text().split("\n")[:-1]
    assert complete[-1].startswith("flood ") and complete[-1].endswith("lazy dog")


def test_port_io_flood_completes_and_logs_the_unknown_port_once(machine_factory, caplog):
    m = machine_factory(guest("ioloop"), cmdline="iters=50000")
    with caplog.at_level("INFO", logger="kvmguest.devices.bus"):
        result = m.run(timeout=60)
    assert result.exit_code == 0
    assert m.devices.bus.unknown_accesses == 50000
    assert sum("unknown port 0x80" in r.getMessage() for r in caplog.records) == 1


def test_guest_that_finishes_during_the_save_is_not_saved(machine_factory, tmp_path):
    m = machine_factory(guest("dirty"), memory=64 * MiB, cmdline="pages=64 passes=1 oninput")
    m.start()
    wait_console(m, "dirty: range")
    path = tmp_path / "late.snap"

    def finish(*_):           # between passes, the guest is told to finish, and does
        m.serial.feed(GO.encode())
        wait_until(lambda: not m.running, what="guest exit")

    with pytest.raises(SaveError, match="finished during the save"):
        live_save(m, str(path), then="continue", min_passes=20, max_passes=20,
                  progress=finish)
    assert m.wait(timeout=30).exit_code == 0
    assert list(tmp_path.iterdir()) == []
