"""Findings of the hostile review (issue "Hardening"), one test or more per finding, each
named after the behaviour it proves. Numbers in comments are the review's items."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from helpers import (GiB, MiB, RAM, ROOT, assert_alive_and_clean, cli, cli_popen,
                     dirty_cmdline, guest, one_line_error, read_until, restore_runs_on,
                     rss_bytes)
from migrate import format as fmt
from migrate.control import ControlError, request
from migrate.format import SnapshotError
from migrate.reader import restore
from migrate.writer import MappedWriter

NOBODY = 65534
STALL = "KVMGUEST_STALL_POINT"


def needs_root():
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI runs as root and must run this test")
        pytest.skip("needs root (device nodes, other users)")


def run_dirty(*extra, pages=300, passes=0, memory="256M"):
    return ("run", guest("dirty"), "--memory", memory, "--cmdline",
            f"pages={pages} passes={passes} quiet", *extra)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A small, valid snapshot of a running dirty guest (passes=0: it never ends)."""
    path = tmp_path_factory.mktemp("snap") / "g.snap"
    p = cli(*run_dirty("--save", path, "--save-after", "0.3", "-q", memory=f"{RAM >> 20}M"))
    assert p.returncode == 0, p.stderr
    assert len(fmt.read_snapshot(str(path)).layout.blocks) == 2
    return path


@pytest.fixture
def shared_dir():
    """A directory other users can reach (pytest's own are private to root)."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="kvmguest-test-", dir="/tmp")
    os.chmod(d, 0o777)
    yield __import__("pathlib").Path(d)
    shutil.rmtree(d, ignore_errors=True)


def control_guest(sock, *extra, env=None):
    """`run dirty --control SOCK` in the background, after its first pass report."""
    run = cli_popen(*run_dirty("--control", sock, *extra), env=env)
    read_until(run.stdout, "dirty: pass 16 ok")
    return run


def fake_server(path, reply: bytes | None = None) -> socket.socket:
    """A socket of ours listening at ``path``; with ``reply``, it answers the first
    request with those bytes (a guest that says something odd, or hostile)."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def answer():
        c, _ = srv.accept()
        c.recv(65536)
        c.sendall(reply)
        c.close()

    if reply is not None:
        threading.Thread(target=answer, daemon=True).start()
    return srv


def stop(proc, sig=signal.SIGTERM, timeout=30):
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout)


# --- 1. --save replaces only regular files ------------------------------------------------
def _special_files(tmp_path):
    needs_root()
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()
    return {"a character device": dev, "a FIFO": fifo, "a socket": sock}


def test_save_refuses_to_replace_a_device_fifo_or_socket_before_booting(tmp_path):
    for kind, path in _special_files(tmp_path).items():
        before = os.lstat(path)
        t = time.monotonic()
        p = cli(*run_dirty("--save", path, "--save-after", "5"))
        one_line_error(p, 2, kind, "refusing")
        assert time.monotonic() - t < 4, "the path must be checked before the guest runs"
        assert p.stdout == ""                                    # no guest ran (17)
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode, after.st_rdev) == \
            (before.st_ino, before.st_mode, before.st_rdev)


def test_save_over_the_control_socket_refuses_special_files_too(tmp_path):
    specials = _special_files(tmp_path)
    sock = tmp_path / "ctl.sock"
    run = control_guest(sock)
    try:
        for kind, path in specials.items():
            p = cli("save", "--control", sock, path)
            assert p.returncode == 1 and kind in p.stderr, p.stderr
            assert stat.S_IFMT(os.lstat(path).st_mode) != stat.S_IFREG
        assert run.poll() is None                                # the guest runs on
    finally:
        stop(run)


# --- 2. whatever run accepts, restore accepts ---------------------------------------------
@pytest.mark.slow
def test_a_guest_with_more_ram_than_the_host_saves_and_restores_eager_and_lazy(tmp_path):
    path = tmp_path / "big.snap"
    p = cli(*run_dirty("--save", path, "--save-after", "0.3", "-q", memory="64G"))
    assert p.returncode == 0, p.stderr
    for lazy in ([], ["--lazy"]):
        restore_runs_on(path, *lazy)


def test_a_snapshot_beyond_what_run_accepts_is_refused_before_allocating(tmp_path,
                                                                        monkeypatch):
    class Spec:                                 # the writer only needs the block list here
        def __init__(self, slot, gpa, size, name):
            self.slot, self.gpa, self.size, self.name = slot, gpa, size, name
            self.npages = size // 4096

    class Plan:
        regions = [Spec(0, 0, 3 * GiB, "ram-low"), Spec(1, 4 * GiB, 6 * GiB, "ram-high")]

    path = tmp_path / "huge.snap"
    w = MappedWriter(str(path), Plan)
    w.finish({"format": "kvmguest-state", "version": 1})
    # A host whose guest-physical space is 8 GiB: this 9 GiB guest (ending at 10 GiB)
    # could not boot here, so it is not restored here either.
    import kvmguest.memory
    monkeypatch.setattr(kvmguest.memory, "host_phys_bits", lambda: 33)
    rss = rss_bytes()
    for lazy in (False, True):
        with pytest.raises(SnapshotError, match="cannot be restored on this host: .*address "
                                                "space"):
            restore(str(path), lazy=lazy)
    assert rss_bytes() - rss < 16 * MiB
    p = cli("run", guest("hello"), "--memory", "16T")            # run says the same
    one_line_error(p, 2, "per memory slot")


# --- 3. the control server removes only its own socket -------------------------------------
def test_save_to_the_control_socket_path_is_refused(tmp_path):
    sock = tmp_path / "S"
    run = control_guest(sock)
    try:
        p = cli("save", "--control", sock, sock)
        assert p.returncode == 1 and "socket" in p.stderr, p.stderr
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        assert request(str(sock), {"op": "status"})["running"] is True
    finally:
        stop(run)
    p = cli(*run_dirty("--control", tmp_path / "x", "--save", tmp_path / "x",
                       "--save-after", "1"))
    one_line_error(p, 2, "same path")


def test_a_guest_exiting_leaves_another_guests_socket_at_the_same_path(tmp_path):
    sock = tmp_path / "S"
    a = control_guest(sock)
    try:
        os.unlink(sock)                            # someone removes A's socket ...
        b = control_guest(sock)                    # ... and B takes the path
        try:
            assert stop(a) == 143
            assert stat.S_ISSOCK(os.lstat(sock).st_mode), "A removed B's socket"
            assert request(str(sock), {"op": "status"})["running"] is True
        finally:
            stop(b)
    finally:
        stop(a)
    assert not sock.exists()                       # B removed its own


# --- 4. both ends check who is on the other side -------------------------------------------
def _listen_as(uid, path):
    """A process running as ``uid`` that listens at ``path`` and answers every request
    with a fake success."""
    code = ("import socket,os,sys\n"
            "s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); os.chmod(sys.argv[1],0o777)\n"
            "s.listen(4); print('ready', flush=True)\n"
            "while True:\n"
            "  c,_=s.accept(); c.recv(65536)\n"
            "  c.sendall(b'{\"ok\": true, \"summary\": \"saved (fake)\"}\\n'); c.close()\n")
    p = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                          sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_save_client_refuses_a_socket_or_server_of_another_user(shared_dir, tmp_path):
    needs_root()
    sock = shared_dir / "other.sock"
    fake = _listen_as(NOBODY, sock)
    try:
        p = cli("save", "--control", sock, tmp_path / "x.snap")
        one_line_error(p, 2, "belongs to another user")
        os.chown(sock, 0, 0)                       # the file looks like ours; the peer is not
        p = cli("save", "--control", sock, tmp_path / "x.snap")
        one_line_error(p, 2, "runs as another user")
        assert not (tmp_path / "x.snap").exists()
    finally:
        fake.kill()


def test_control_server_refuses_a_stale_socket_of_another_user_in_one_line(tmp_path):
    needs_root()
    sock = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()
    os.chown(sock, NOBODY, NOBODY)
    p = cli(*run_dirty("--control", sock))
    one_line_error(p, 2, "owned by another user")
    assert os.lstat(sock).st_uid == NOBODY


def test_control_server_serves_only_its_own_user(shared_dir):
    needs_root()
    sock = shared_dir / "S"
    run = control_guest(sock)
    try:
        os.chmod(sock, 0o777)                      # even if the mode lets them in
        code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
                "s.sendall(b'{\"op\": \"status\"}\\n'); print(s.makefile().readline())")
        p = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                            "--clear-groups", sys.executable, "-c", code, str(sock)],
                           capture_output=True, text=True, timeout=30)
        assert "permission denied" in p.stdout and '"ok": false' in p.stdout, p.stdout
    finally:
        stop(run)


# --- 5/6. stream files and block order (also in test_fuzz.py) -------------------------------
@pytest.mark.parametrize("damage", ["header-only", "state-list", "truncated-state"])
def test_damaged_stream_snapshots_are_one_line_errors(tmp_path, damage):
    path = tmp_path / "s.stream"
    p = cli(*run_dirty("--save", path, "--save-after", "0.3", "--format", "stream", "-q"))
    assert p.returncode == 0, p.stderr
    data = path.read_bytes()
    if damage == "header-only":
        data = data[:64]
    elif damage == "truncated-state":
        data = data[:-100]
    else:
        import struct
        import zlib
        at = data.rindex(b'{"devices"') - 28      # the state record's header
        body = b"[]"
        data = data[:at] + struct.pack("<IIQ", 3, 0, 0) + struct.pack(
            "<QI", len(body), zlib.crc32(body)) + body + struct.pack("<IIQ", 4, 0, 0)
    path.write_bytes(data)
    for command in (("restore", path), ("inspect", path)):
        r = cli(*command)
        assert "Traceback" not in r.stderr and r.returncode in (1, 2), r.stderr
        if command[0] == "restore":
            one_line_error(r, 2)
            assert r.stdout == ""


def patched_copy(src, dst, edit) -> None:
    """A sparse copy of snapshot ``src`` whose first 8 KiB (header and block table) were
    changed by ``edit(bytearray)``."""
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    with open(dst, "r+b") as f:
        head = bytearray(f.read(8192))
        edit(head)
        f.seek(0)
        f.write(head)


def test_blocks_out_of_guest_physical_order_are_refused(snapshot, tmp_path):
    import struct

    def swap(data):
        t, e = fmt.HEADER_SIZE, fmt.BLOCK_ENTRY_SIZE
        data[t:t + 2 * e] = data[t + e:t + 2 * e] + data[t:t + e]
        struct.pack_into("<I", data, fmt.HEADER.offsets["table_crc"],
                         fmt.crc(bytes(data[t:t + 2 * e])))
        h = fmt.HEADER.offsets["header_crc"]
        struct.pack_into("<I", data, h, fmt.crc(bytes(data[:h])))

    path = tmp_path / "swapped.snap"
    patched_copy(snapshot, path, swap)
    one_line_error(cli("restore", path), 2, "ascending guest-physical order")


# --- 7. permission advice ---------------------------------------------------------------------
def test_permission_advice_never_suggests_the_root_group(tmp_path):
    from kvmguest.kvm import explain_open_error
    dev = tmp_path / "kvm"
    dev.write_text("")
    os.chmod(dev, 0o600)
    msg = explain_open_error(PermissionError(13, "Permission denied"), str(dev))
    assert "usermod" not in msg and "setfacl -m u:$USER:rw" in msg and "udev" in msg
    if os.geteuid() == 0:
        os.chown(dev, 0, 100)                       # a real group with rw: suggest it
        os.chmod(dev, 0o660)
        import grp
        group = grp.getgrgid(100).gr_name
        msg = explain_open_error(PermissionError(13, "Permission denied"), str(dev))
        assert f"usermod -aG {group}" in msg


# --- 8. terminal escapes ------------------------------------------------------------------------
def test_inspect_and_save_escape_terminal_controls_from_files_and_sockets(snapshot, tmp_path):
    snap = fmt.read_snapshot(str(snapshot))
    state = dict(snap.state, guest={"kernel": "/k\x1b]0;owned\x07", "cmdline": "\x1b[2J",
                                    "memory": 1})
    from kvmguest.memory import GuestMemory, Region, RegionSpec
    mem = GuestMemory([Region(RegionSpec(0, 0, 8 * MiB, "ram\x1b[31m"))])
    path = tmp_path / "esc.snap"
    w = MappedWriter(str(path), mem)
    w.write_pass(None)
    w.finish(state)
    mem.close()
    p = cli("inspect", path)
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "\x07" not in p.stdout and "\\x1b" in p.stdout
    sock = tmp_path / "evil.sock"
    srv = fake_server(sock, json.dumps({"ok": False, "error": "\x1b]0;pwned\x07\x1b[2J"})
                      .encode() + b"\n")
    p = cli("save", "--control", sock, tmp_path / "x.snap")
    assert p.returncode == 1 and "\x1b" not in p.stderr and "\\x1b]0;pwned" in p.stderr
    srv.close()


# --- 9/16/17. one line, the real problem, checked before anything runs ----------------------
BAD_INVOCATIONS = {
    "memory 100T": (("run", "HELLO", "--memory", "100T"), "per memory slot"),
    "memory 300T": (("run", "HELLO", "--memory", "300T"), "address space"),
    "memory 10^20 T": (("run", "HELLO", "--memory", "99999999999999999999T"), "larger than any"),
    "memory 16T": (("run", "HELLO", "--memory", "16T"), "per memory slot"),
    "timeout inf": (("run", "HELLO", "--timeout", "inf"), "finite"),
    "timeout 1e10": (("run", "HELLO", "--timeout", "1e10"), "at most"),
    "timeout 0": (("run", "HELLO", "--timeout", "0"), "> 0"),
    "timeout -1": (("run", "HELLO", "--timeout", "-1"), "> 0"),
    "timeout nan": (("run", "HELLO", "--timeout", "nan"), "finite"),
    "save-after inf": (("run", "HELLO", "--save", "X", "--save-after", "inf"), "finite"),
    "save-after -1": (("run", "HELLO", "--save", "X", "--save-after", "-1"), ">= 0"),
    "save-after nan": (("run", "HELLO", "--save", "X", "--save-after", "nan"), "finite"),
    "downtime -1": (("run", "HELLO", "--save", "X", "--save-after", "1", "--downtime", "-1"),
                    "> 0"),
    "downtime nan": (("run", "HELLO", "--save", "X", "--save-after", "1", "--downtime", "nan"),
                     "finite"),
    "threads 0": (("run", "HELLO", "--save", "X", "--save-after", "1", "--threads", "0"),
                  "1 to 64"),
    "threads 100000": (("run", "HELLO", "--save", "X", "--save-after", "1", "--threads",
                        "100000"), "1 to 64"),
    "restore threads 0": (("restore", "SNAP", "--threads", "0"), "1 to 64"),
    "max-migrations alone": (("run", "HELLO", "--max-migrations", "2"),
                             "--max-migrations goes with --guest-migrate"),
    "max-migrations -1": (("restore", "SNAP", "--guest-migrate", "--max-migrations", "-1"),
                          "-1 migrations: use 0 to 1000000"),
    "restore threads huge": (("restore", "SNAP", "--threads", "1000000"), "1 to 64"),
    "save ''": (("run", "HELLO", "--save", "", "--save-after", "1"), "path is empty"),
    "socket path 108 bytes": (("run", "HELLO", "--control", "/tmp/" + "s" * 103),
                              "at most 107"),
    "restore a directory": (("restore", "/tmp"), "is a directory"),
    "restore /proc/self/mem": (("restore", "/proc/self/mem"), "cannot read"),
    "restore /dev/kvm": (("restore", "/dev/kvm"), "character device"),
    "run /dev/zero": (("run", "/dev/zero"), "not a regular file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INVOCATIONS))
def test_bad_input_is_one_line_naming_the_problem_with_exit_2(case, snapshot, tmp_path):
    args, fragment = BAD_INVOCATIONS[case]
    args = [str(guest("hello")) if a == "HELLO" else str(snapshot) if a == "SNAP"
            else str(tmp_path / "x.snap") if a == "X" else a for a in args]
    t = time.monotonic()
    p = cli(*args, timeout=30)
    assert time.monotonic() - t < 10
    if p.stderr.startswith("usage:") or "\nkvmguest" in p.stderr and "usage:" in p.stderr:
        # argparse's own errors: usage, then one line naming the option and the problem
        assert p.returncode == 2 and fragment in p.stderr and "Traceback" not in p.stderr
    else:
        one_line_error(p, 2, fragment)
    assert p.stdout == ""


def test_non_utf8_command_line_is_a_usage_error():
    p = subprocess.run([sys.executable, "-m", "kvmguest.cli", "run", str(guest("hello")),
                        "--cmdline", b"x=\xff"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "not valid UTF-8" in p.stderr and "Traceback" not in p.stderr


def test_restore_checks_kvm_before_reading_the_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)                                  # reading it would block forever
    p = cli("restore", fifo, env={"KVMGUEST_DEVICE": str(tmp_path / "nokvm")}, timeout=30)
    one_line_error(p, 2, "does not exist")


def test_another_programs_socket_at_the_control_path_is_named(tmp_path):
    sock = tmp_path / "busy.sock"
    srv = fake_server(sock)
    try:
        p = cli(*run_dirty("--control", sock))
        one_line_error(p, 2, "in use by another program", f"pid {os.getpid()}")
    finally:
        srv.close()


def test_malformed_control_requests_get_a_reply_not_a_traceback(tmp_path):
    sock = tmp_path / "S"
    run = control_guest(sock)
    try:
        for req in (b"[]\n", b'{"op":"save"}\n', b"\xff\xfe\n", b'{"op":"save","path":3}\n',
                    b'{"op":"save","path":"/x","threads":"many"}\n', b'{"op":"nope"}\n'):
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(sock))
            c.sendall(req)
            reply = json.loads(c.makefile().readline())
            c.close()
            assert reply["ok"] is False and reply["error"].startswith("bad request"), reply
        assert run.poll() is None
    finally:
        stop(run)
    assert "Traceback" not in run.stderr.read()


@pytest.mark.parametrize("command", ["save", "checkpoint"])
@pytest.mark.parametrize("reply", [b"[]\n", b'{"ok": true}\n', b"garbage\n", b""])
def test_odd_replies_to_the_save_and_checkpoint_clients_are_one_line_errors(tmp_path, reply,
                                                                            command):
    """`checkpoint` checks a reply as `save` does (it printed an empty line for
    {"ok": true}, and exited 0)."""
    sock = tmp_path / "odd.sock"
    srv = fake_server(sock, reply)
    args = ["save", "--control", sock, tmp_path / "x.snap"] if command == "save" else \
        ["checkpoint", "--control", sock]
    p = cli(*args)
    one_line_error(p, 2, "the guest" if reply else "")
    assert p.stdout == ""
    srv.close()


def test_a_silent_guest_is_given_up_on_with_a_clear_error(tmp_path):
    sock = tmp_path / "silent.sock"
    srv = fake_server(sock)
    with pytest.raises(ControlError, match="no word from the guest for 0.5 s"):
        request(str(sock), {"op": "status"}, silence=0.5)
    srv.close()


# --- 10. idle connections and connection count are bounded ----------------------------------
def test_idle_connections_neither_keep_the_guest_alive_nor_pile_up_threads(tmp_path):
    sock = tmp_path / "S"
    run = cli_popen("run", guest("dirty"), "--cmdline", "pages=64 passes=64",
                    "--control", sock)
    read_until(run.stdout, "dirty: pass 1 ok")
    idle = []
    for _ in range(8):
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(sock))
        idle.append(c)
    # Beyond the bound, a connection is told at once that the guest is busy.
    c = socket.socket(socket.AF_UNIX)
    c.connect(str(sock))
    c.settimeout(5)
    assert "busy" in c.makefile().readline()
    t = time.monotonic()
    assert run.wait(timeout=60) == 0               # the guest finished: the process ends
    assert time.monotonic() - t < 15
    for c in idle:
        c.close()


def test_beyond_the_connection_bound_every_client_is_told_busy(tmp_path):
    """The same condition gives the same answer every time: busy (exit 1), never a
    broken pipe (exit 2) from a guest that closed before it read the request."""
    sock = tmp_path / "S"
    run = cli_popen("run", guest("dirty"), "--cmdline", "pages=64 passes=0 quiet",
                    "--control", sock)
    idle = []
    try:
        read_until(run.stdout, "dirty: pass 16 ok")
        for _ in range(4):
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(sock))
            idle.append(c)
        for _ in range(12):
            p = cli("save", "--control", sock, tmp_path / "x.snap", timeout=60)
            assert p.returncode == 1 and "is busy with 4 other connections" in p.stderr, \
                (p.returncode, p.stderr)
        assert not (tmp_path / "x.snap").exists()
    finally:
        for c in idle:
            c.close()
        stop(run)


# --- 11. kernels: regular files only, header first, bounded -------------------------------
def test_kernel_that_is_a_fifo_device_or_huge_junk_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    junk = tmp_path / "junk.elf"
    with open(junk, "wb") as f:
        f.write(b"\x7fELF" + b"\x02" * 60)
        f.truncate(2 * GiB)                        # sparse: 2 GiB to read, none on disk
    notelf = tmp_path / "notelf"
    with open(notelf, "wb") as f:
        f.truncate(2 * GiB)
    for path, fragment in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                           (junk, "too large"), (notelf, "not an ELF file")):
        t = time.monotonic()
        p = cli("run", path, timeout=30)
        one_line_error(p, 2, fragment)
        assert time.monotonic() - t < 5
    for command in ("inspect", "restore"):
        p = cli(command, fifo, timeout=30)
        assert p.returncode == 2 and "FIFO" in (p.stdout + p.stderr)


# --- 12/13. signals: cancel cleanly and say so --------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_a_save_removes_the_temporary_file_and_the_socket(tmp_path, sig):
    sock, path = tmp_path / "S", tmp_path / "g.snap"
    run = cli_popen(*run_dirty("--control", sock, "--save", path, "--save-after", "0.2"),
                    env={STALL: "pass0"})
    read_until(run.stderr, "stalled at pass0")
    assert [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
    run.send_signal(sig)
    assert run.wait(timeout=30) == 128 + sig
    assert sorted(f.name for f in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    assert "Traceback" not in run.stderr.read()


def test_ctrl_c_on_run_cancels_a_save_requested_over_the_socket(tmp_path):
    sock, path = tmp_path / "S", tmp_path / "g.snap"
    run = control_guest(sock, env={STALL: "pass0"})
    saver = cli_popen("save", "--control", sock, path)
    read_until(run.stderr, "stalled at pass0")
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=30) == 130
    assert saver.wait(timeout=30) == 1
    assert "cancel" in saver.stderr.read()
    assert sorted(f.name for f in tmp_path.iterdir()) == []


def test_ctrl_c_on_the_save_client_cancels_the_save_and_the_guest_runs_on(tmp_path):
    sock, path = tmp_path / "S", tmp_path / "g.snap"
    run = control_guest(sock, env={STALL: "pass0"})
    try:
        saver = cli_popen("save", "--control", sock, path)
        read_until(run.stderr, "stalled at pass0")
        saver.send_signal(signal.SIGINT)
        assert saver.wait(timeout=30) == 130
        err = saver.stderr.read()
        assert "the save was cancelled; the guest keeps running" in err, err
        assert run.poll() is None
        assert request(str(sock), {"op": "status"})["running"] is True
        assert sorted(f.name for f in tmp_path.iterdir()) == ["S"]
    finally:
        stop(run)


def test_double_ctrl_c_never_kills_the_process_with_the_kick_signal(tmp_path):
    for n in range(5):
        sock = tmp_path / f"S{n}"
        run = control_guest(sock, env={STALL: "pass0"})
        saver = cli_popen("save", "--control", sock, tmp_path / f"g{n}.snap")
        read_until(run.stderr, "stalled at pass0")
        run.send_signal(signal.SIGINT)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=30) == 130          # never -SIGRT/138: a clean exit
        saver.wait(timeout=30)
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def test_ctrl_c_during_an_eager_restore_stops_the_readers_at_once(tmp_path):
    from kvmguest.arch.x86.layout import plan_regions
    from kvmguest.memory import GuestMemory
    path = tmp_path / "full.snap"
    mem = GuestMemory.anonymous(plan_regions(512 * MiB))
    mem.regions[0].array[:] = 0x5A                  # 8 chunks of 64 MiB to read
    w = MappedWriter(str(path), mem)
    w.write_pass(None)
    w.finish(fmt.read_snapshot(str(_a_real_snapshot(tmp_path))).state)
    mem.close()
    p = cli_popen("restore", path, "--threads", "2", env={STALL: "read-chunk"})
    read_until(p.stderr, "stalled at read-chunk")
    t = time.monotonic()
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 130
    assert time.monotonic() - t < 2.0               # 8 stalled chunks would take minutes


def _a_real_snapshot(tmp_path):
    path = tmp_path / "real.snap"
    p = cli(*run_dirty("--save", path, "--save-after", "0.2", "-q", memory="64M"))
    assert p.returncode == 0, p.stderr
    return path


# --- 14. lazy restore and a snapshot that changes under it ----------------------------------
@pytest.mark.parametrize("change", ["truncate", "overwrite"])
def test_lazy_restore_survives_the_snapshot_being_truncated_or_overwritten(tmp_path, change):
    path = tmp_path / "g.snap"
    p = cli("run", guest("dirty"), "--memory", f"{RAM >> 20}M", "--cmdline",
            dirty_cmdline(pages=900), "--save", path, "--save-after", "0.3", "-q")
    assert p.returncode == 0, p.stderr
    r = cli_popen("restore", path, "--lazy", "--timeout", "6")
    read_until(r.stdout, "dirty: pass")
    if change == "truncate":
        os.truncate(path, 4096)                    # waits for the guest to let go
    else:
        with open(path, "r+b") as f:           # the open waits for the guest to let go
            f.seek(fmt.read_snapshot(str(path)).layout.blocks[0].pages_offset)
            f.write(b"\xee" * (8 << 20))
    out, err = r.communicate(timeout=60)
    assert r.returncode == 124, err                # ran to the timeout, no SIGBUS
    assert_alive_and_clean(out)
    assert "Traceback" not in err


# --- 15. exit codes through one error tree --------------------------------------------------
def test_bad_snapshots_and_bad_save_paths_exit_2(tmp_path, snapshot):
    empty = tmp_path / "empty.snap"
    empty.write_bytes(b"")
    notsnap = tmp_path / "notsnap"
    notsnap.write_bytes(b"hello" * 2000)
    truncated = tmp_path / "trunc.snap"
    with open(snapshot, "rb") as f:
        truncated.write_bytes(f.read(10000))
    incomplete = tmp_path / "inc.snap"
    patched_copy(snapshot, incomplete, lambda d: d.__setitem__(fmt.HEADER.offsets["flags"], 0))
    for path, fragment in ((empty, "0 bytes"), (notsnap, "not a kvmguest snapshot"),
                           (truncated, "truncated"), (incomplete, "incomplete")):
        one_line_error(cli("restore", path), 2, fragment)
    one_line_error(cli(*run_dirty("--save", tmp_path / "no" / "dir.snap", "--save-after",
                                  "1")), 2, "does not exist")


def test_unexpected_errors_are_one_line_and_v_shows_the_traceback(monkeypatch, capsys):
    from kvmguest import cli as kcli

    def boom(args):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(kcli, "cmd_info", boom)
    assert kcli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError" in err
    assert "Traceback" not in err and "-v" in err
    assert kcli.main(["info", "-v"]) == 1           # -v after the subcommand works too
    assert "Traceback" in capsys.readouterr().err


# --- 16. inspect says what a file is ------------------------------------------------------
def test_inspect_describes_stream_snapshots_and_unreadable_files(tmp_path):
    path = tmp_path / "s.stream"
    p = cli(*run_dirty("--save", path, "--save-after", "0.3", "--format", "stream", "-q"))
    assert p.returncode == 0, p.stderr
    info = cli("inspect", path)
    assert info.returncode == 0, info.stdout + info.stderr
    assert "valid, complete kvmguest snapshot (stream, version 1)" in info.stdout
    assert "page records" in info.stdout
    data = json.loads(cli("inspect", path, "--json").stdout)
    assert data["valid"] and data["pages_present"] > 300
    info = cli("inspect", tmp_path)
    assert info.returncode == 2 and "UNREADABLE" in info.stdout and "directory" in info.stdout


# --- 18. the README's commands work as typed ----------------------------------------------
def readme_commands(section: str = "## Using it") -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split(section, 1)[1].split("```", 2)[1]
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.split("  #", 1)[0].rstrip()
        if not line or line == "sh":
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return lines


@pytest.mark.parametrize("section", ["## Using it", "## Continuous checkpoints"])
def test_every_command_in_the_readme_works_as_typed(tmp_path, section):
    """The README's command blocks ("Using it", checkpoints), run in order in a fresh
    directory with `guests/` beside it (commands ending in & run in the background)."""
    os.symlink(ROOT / "guests", tmp_path / "guests")
    background = []
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               XDG_RUNTIME_DIR=str(tmp_path))
    commands = readme_commands(section)
    assert len(commands) >= 4 and all(c.startswith("kvmguest ") for c in commands), commands
    try:
        for command in commands:
            if command.endswith("&"):
                p = subprocess.Popen(command[:-1], shell=True, cwd=tmp_path, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                read_until(p.stdout, "ok")
                background.append(p)
                continue
            p = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=300)
            assert p.returncode == 0, (command, p.returncode, p.stdout[-1000:], p.stderr)
    finally:
        for p in background:
            if p.poll() is None:
                p.kill()


# --- 19. progress, version, -v anywhere ---------------------------------------------------
class Tty:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_never_goes_backwards_and_shows_pass_0_and_clears_its_line(
        machine_factory, tmp_path):
    from helpers import start_dirty
    from kvmguest.progress import Progress
    from migrate.precopy import live_save
    m = start_dirty(machine_factory, pages=900)
    seen = []
    live_save(m, str(tmp_path / "p.snap"), then="stop", min_passes=3,
              progress=lambda what, f: seen.append((what, f)))
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(w == "pass 0" and 0 < f < 1 for w, f in seen)         # shown during pass 0
    tty = Tty()
    bar = Progress("saving", min_seconds=0, stream=tty)
    bar("pass 0", 0.5)
    bar("pass 1", 0.3)                                                # never backwards
    assert tty.text.endswith("50% pass 1              ")
    bar.done()
    assert tty.text.endswith("\r")                                    # a clean line after


def test_restore_reports_progress_while_reading(snapshot):
    seen = []
    m, _ = restore(str(snapshot), progress=lambda what, f: seen.append(f))
    m.close()
    assert seen and seen == sorted(seen) and seen[-1] == 1.0


def test_version_and_verbose_after_the_subcommand(snapshot):
    p = cli("--version")
    assert p.returncode == 0 and p.stdout.startswith("kvmguest 0.")
    for args in (("-v", "restore", snapshot), ("restore", snapshot, "-v")):
        p = cli(*args, "--timeout", "1")
        assert p.returncode == 124 and "restored " in p.stderr and "DEBUG" in p.stderr
