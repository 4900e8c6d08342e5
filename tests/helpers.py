"""What the tests share: paths, the CLI runner, guest handshakes and verdicts, snapshot
comparisons. (Fixtures live in conftest.py; everything else lives here, once.)"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests" / "build"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096
RAM = 3 * GiB + 32 * MiB                 # two slots: [0, 3G) and [4G, 4G+32M)
WS_BASE = 3 * GiB - 100 * PAGE           # dirty's working set: 100 pages low, the rest high


def guest(name: str) -> Path:
    path = GUESTS / f"{name}.elf"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make` (it builds the guests)", pytrace=False)
    return path


def dirty_cmdline(pages: int = 900, passes: int = 0, base: int = WS_BASE,
                  quiet: bool = True, oninput: bool = False) -> str:
    """``oninput``: the guest runs until a byte arrives on its console (``GO``), then
    ``passes`` more: what holds a guest a test races with a save."""
    return f"pages={pages} base={base} passes={passes}" + (" quiet" if quiet else "") + \
        (" oninput" if oninput else "")


GO = "go\n"            # the byte an "oninput" guest waits for (`--console-input`)


# --- the CLI in a child process -----------------------------------------------------------
def cli(*args, env=None, timeout=120, input=None, cwd=ROOT) -> subprocess.CompletedProcess:
    """`kvmguest ARGS` in a new process: (returncode, stdout, stderr)."""
    return subprocess.run([sys.executable, "-m", "kvmguest", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, input=input,
                          env=dict(os.environ, **(env or {})))


def cli_popen(*args, env=None, **kw) -> subprocess.Popen:
    """`kvmguest ARGS` started in the background, stdout and stderr piped (text)."""
    return subprocess.Popen([sys.executable, "-m", "kvmguest", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})), **kw)


# The most a handshake with a guest may take (a console line, a process ending) before a
# test gives up: generous, because a test must pass on a loaded machine; no verdict
# depends on it (a guest a test races is held by a handshake, never by the clock).
MARGIN = 180.0


def read_until(stream, text: str, timeout: float = MARGIN) -> str:
    """Read lines from a child's pipe until one holds ``text``: a handshake with a guest
    running in another process. Returns what was read."""
    import selectors
    seen = ""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while text not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} never appeared; got {seen[-2000:]!r}"
            if sel.select(left):
                line = stream.readline()
                assert line, f"the process ended before {text!r}; got {seen[-2000:]!r}"
                seen += line
    finally:
        sel.unregister(stream)
    return seen


def one_line_error(p: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """The CLI failed the way the README promises: exit ``code``, one stderr line starting
    ``kvmguest: error:`` naming the problem, no traceback, no guest output."""
    assert p.returncode == code, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("kvmguest: error: ") and p.stderr.count("\n") == 1, p.stderr
    for f in fragments:
        assert f in p.stderr, (f, p.stderr)


# --- handshakes with a guest in this process ---------------------------------------------
def wait_console(m, text: str, timeout: float = MARGIN) -> None:
    """Wait until the guest has printed ``text`` (the console is the handshake)."""
    assert m.serial.wait_for(text, timeout), f"{text!r} never appeared: {m.serial.text()[-2000:]!r}"


def wait_until(predicate, timeout: float = MARGIN, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} never held within {timeout:g} s"
        time.sleep(0.002)


def start_dirty(factory, memory: int = RAM, passes_first: int = 16, machine: dict = None,
                **kw):
    """A running `dirty` guest, well into its passes: it has reported pass
    ``passes_first`` (quiet guests report every 16th). ``machine``: more Machine options."""
    m = factory(guest("dirty"), memory=memory, cmdline=dirty_cmdline(**kw), **(machine or {}))
    m.start()
    wait_console(m, f"dirty: pass {passes_first} ok")
    return m


def guest_pass(m, base: int | None = None) -> int:
    """The pass the dirty guest is stamping, read from its first working-set page
    (word 1 holds the pass): a handshake through guest memory, not a sleep. ``base``:
    the guest's base= (read from the command line by default; a restored machine has none)."""
    if base is None:
        base = int(m.cmdline.split("base=")[1].split()[0])
    first = base if m.memory.is_ram(base) else 4 * GiB     # the set starts above the hole
    return int.from_bytes(m.memory.read(first + 8, 8), "little")


# --- guest verdicts, parsed one way -------------------------------------------------------
_VERIFIED = re.compile(r"dirty: verified (\d+) pages over (\d+) passes")
_BAD = re.compile(r"BAD page|dirty: pass \d+: \d+ bad pages|BAD \w+=")


def verdict(output: str) -> dict:
    """What a guest's console says about it: ``bad`` lines (any guest's failure reports),
    ``passes_ok`` (dirty's per-pass reports), ``verified`` (pages, passes) or None,
    ``registers_intact`` (cpustate)."""
    m = _VERIFIED.search(output)
    return {"bad": _BAD.findall(output),
            "passes_ok": len(re.findall(r"dirty: pass \d+ ok", output)),
            "verified": (int(m.group(1)), int(m.group(2))) if m else None,
            "registers_intact": "all 12 GPRs and 16 XMM registers intact" in output}


def assert_verified(output: str, pages: int, passes: int, oninput: bool = False) -> None:
    """dirty verified ``pages`` over ``passes`` passes (``oninput``: ``passes`` after the
    pass at which it was told to go)."""
    v = verdict(output)
    if oninput:
        go = re.search(r"^go after (\d+)$", output, re.M)
        assert go, output[-2000:]
        passes += int(go.group(1))
    assert v["bad"] == [] and v["verified"] == (pages, passes), (v, output[-2000:])


def restore_runs_on(path, *args, passes: int = 1) -> str:
    """`kvmguest restore PATH ARGS` of a dirty guest that runs forever, stopped once the
    guest has reported ``passes`` verified passes after the restore (the event, not a
    wall-clock --timeout: a slow machine proves the same); its console, checked clean;
    with its stderr, which must hold no traceback."""
    rc, out, err = Running("restore", path, *args).passes(passes).stop()
    assert "Traceback" not in err, err
    assert_alive_and_clean(out)
    return out + err


class Running:
    """A `kvmguest ARGS` process whose console the test reads line by line: ``until``
    a text, ``passes`` more of dirty's verified passes, then ``stop`` it (SIGTERM)."""

    def __init__(self, *args, env=None):
        self.p = cli_popen(*args, env=env)
        self.out = ""

    def until(self, text: str) -> "Running":
        self.out += read_until(self.p.stdout, text)
        return self

    def passes(self, n: int = 2) -> "Running":
        for _ in range(n):
            self.until(" ok")         # "dirty: pass N ok"
        return self

    def stop(self) -> tuple[int, str, str]:
        """End it (it may have ended already): (exit code, all its stdout, its stderr)."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        out, err = self.p.communicate(timeout=MARGIN)
        self.out += out
        return self.p.returncode, self.out, err


def assert_alive_and_clean(output: str) -> None:
    """A guest that runs forever was still verifying, with no bad page."""
    v = verdict(output)
    assert v["bad"] == [] and v["passes_ok"] >= 1, (v, output[-2000:])


# --- files and memory ------------------------------------------------------------------------
def fingerprint(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def sparse_digest(path) -> str:
    """SHA-256 over the data extents (and their positions) of a sparse file."""
    from migrate.pageio import data_extents
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end in data_extents(fd, 0, os.fstat(fd).st_size):
            h.update(f"{start}-{end}".encode())
            h.update(os.pread(fd, end - start, start))
    finally:
        os.close(fd)
    return h.hexdigest()


def assert_file_matches_source(path, machine, lazy: bool) -> int:
    """The snapshot's page areas hold exactly the source RAM at the pause, byte for byte.
    Returns the number of pages compared."""
    import numpy as np

    from migrate import format as fmt
    from migrate.formats.mapped import load_memory

    fd = os.open(path, os.O_RDONLY)
    try:
        snap = fmt.read_snapshot(str(path), fd)
        mem, _ = load_memory(snap, fd, lazy=lazy, threads=2)
    finally:
        os.close(fd)
    compared = 0
    try:
        assert [r.slot for r in mem.regions] == [r.slot for r in machine.memory.regions]
        for src, got in zip(machine.memory.regions, mem.regions):
            differ = np.flatnonzero((src.pages() != got.pages()).any(axis=1))
            assert len(differ) == 0, f"{src.name}: pages {differ[:10]} differ from the source"
            compared += src.npages
    finally:
        mem.close()
    return compared


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# --- the hardening tests' guests, sockets and files -------------------------------------
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


def patched_copy(src, dst, edit) -> None:
    """A sparse copy of snapshot ``src`` whose first 8 KiB (header and block table) were
    changed by ``edit(bytearray)``."""
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    with open(dst, "r+b") as f:
        head = bytearray(f.read(8192))
        edit(head)
        f.seek(0)
        f.write(head)
