"""The command line's errors: one line naming the real problem, checked before anything
runs, with the exit code of the error tree; terminal controls escaped; permission
advice that never suggests the root group; kernels that are not files refused at once;
inspect saying what a file is; progress, --version and -v anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import (GiB, MiB, ROOT, cli, guest, one_line_error, run_dirty, fake_server,
                     patched_copy)
from migrate import format as fmt
from migrate.reader import restore
from migrate.writer import MappedWriter


# --- permission advice ---------------------------------------------------------------------
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


# --- terminal escapes ------------------------------------------------------------------------
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


# --- one line, the real problem, checked before anything runs ----------------------
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
    p = subprocess.run([sys.executable, "-m", "kvmguest", "run", str(guest("hello")),
                        "--cmdline", b"x=\xff"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "not valid UTF-8" in p.stderr and "Traceback" not in p.stderr


def test_restore_checks_kvm_before_reading_the_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)                                  # reading it would block forever
    p = cli("restore", fifo, env={"KVMGUEST_DEVICE": str(tmp_path / "nokvm")}, timeout=30)
    one_line_error(p, 2, "does not exist")


# --- kernels: regular files only, header first, bounded -------------------------------
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


# --- exit codes through one error tree --------------------------------------------------
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
    from kvmguest.front import cli as kcli

    def boom(args):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(kcli, "cmd_info", boom)
    assert kcli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError" in err
    assert "Traceback" not in err and "-v" in err
    assert kcli.main(["info", "-v"]) == 1           # -v after the subcommand works too
    assert "Traceback" in capsys.readouterr().err


# --- inspect says what a file is ------------------------------------------------------
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


# --- progress, version, -v anywhere ---------------------------------------------------
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
    from kvmguest.front.progress import Progress
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
