"""A save's target: it replaces only a regular file (or a link), never a device, a FIFO,
a socket or a directory, whether asked on the command line or over the control socket."""

from __future__ import annotations

import os
import socket
import stat
import time

from helpers import cli, one_line_error, needs_root, run_dirty, control_guest, stop


# --- --save replaces only regular files ------------------------------------------------
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
