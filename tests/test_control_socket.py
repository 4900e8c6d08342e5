"""The control socket: it removes only its own socket, both ends check who is on the
other side, idle and surplus connections are bounded, and whatever comes over it (or
sits at its path) is a one-line answer, never a traceback."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from helpers import (MARGIN, cli, cli_popen, guest, one_line_error, read_until, needs_root,
                     run_dirty,
                     control_guest, fake_server, stop, NOBODY)
from kvmguest.front.control import REQUEST_TIMEOUT, ControlError, request


# --- the control server removes only its own socket -------------------------------------
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


# --- both ends check who is on the other side -------------------------------------------
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


# --- replies and requests that are not what they should be ---------------------------
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


# --- idle connections and connection count are bounded ----------------------------------
def test_idle_connections_neither_keep_the_guest_alive_nor_pile_up_threads(tmp_path):
    """The echo guest waits for "quit" on its console: it ends when the test says so,
    while the idle connections are still open, whatever the machine's speed."""
    sock = tmp_path / "S"
    run = cli_popen("run", guest("echo"), "--console-input", "--control", sock,
                    stdin=subprocess.PIPE)
    read_until(run.stdout, "echo: ready")
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
    run.stdin.write("quit\n")
    run.stdin.flush()
    assert run.wait(timeout=MARGIN) == 0           # the guest finished: the process ends,
    assert time.monotonic() - t < REQUEST_TIMEOUT  # not held until the idle ones time out
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
        # The idle connections hold their slots until the server drops them, after
        # REQUEST_TIMEOUT: every save started before then (up to 12; fewer on a slow
        # machine, never none) must be told busy.
        until = time.monotonic() + REQUEST_TIMEOUT - 2
        tries = 0
        while tries < 12 and (tries == 0 or time.monotonic() < until):
            p = cli("save", "--control", sock, tmp_path / "x.snap", timeout=60)
            assert p.returncode == 1 and "is busy with 4 other connections" in p.stderr, \
                (tries, p.returncode, p.stderr)
            tries += 1
        assert not (tmp_path / "x.snap").exists()
    finally:
        for c in idle:
            c.close()
        stop(run)
