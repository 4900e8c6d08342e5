"""Snapshots as pytest fixtures: boot a guest to its ready point once, reset it per test.

In a conftest.py::

    from kvmguest.front.testing import guest_fixture
    app = guest_fixture("guests/build/fixture.elf", cmdline="pages=256")

and in a test::

    def test_something(app):                 # a running machine, reset to the ready point
        app.console.send(b"check\\n")
        assert app.serial.wait_for("clean", 10)

The ready point is where the guest writes READY to the kvmguest port (``ready=None``,
the default; see kvmguest/devices/guest_port.py and docs/fixtures.md) or where its
console first shows ``ready`` (a string). The guest is booted to it once, saved, and
the snapshot kept in a cache directory (``KVMGUEST_CACHE``, else
``$XDG_CACHE_HOME/kvmguest/snapshots``) under a name derived from the kernel's bytes,
the command line, memory, vCPUs, the ready point and kvmguest's snapshot format, so a
changed kernel or setting boots again and an unchanged one is not booted at all. Each
pytest process (each pytest-xdist worker) restores it lazily once and, before every
test, resets the machine in place to the snapshot (migrate/reset.py): the pages the last
test dirtied are copied back, the vCPU and device state re-applied, the console output
cleared. A machine whose guest finished or crashed is replaced by a fresh restore.
Processes share the cache under a lock on its directory (``flock``), so one boots and
the others wait and reuse; nothing but the snapshots stays behind.

A snapshot from the cache is restored into every test, so the cache is trusted only if
nobody else could have written it: the directory (made 0700) and each snapshot must be
owned by the user and not writable by group or others, or the fixture refuses in one
line. A process that holds the lock longer than a guest's boot can take (plus
LOCK_GRACE) makes the others fail, naming it, instead of waiting forever.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import time
from dataclasses import dataclass

from kvmguest.errors import KvmguestError

DEFAULT_TIMEOUT = 60.0
CACHE_ENV = "KVMGUEST_CACHE"
LOCK_GRACE = 60.0           # seconds beyond a guest's boot timeout to wait for the lock


class FixtureError(KvmguestError):
    """The guest never reached its ready point (it finished, crashed or timed out)."""


@dataclass(frozen=True)
class GuestSpec:
    kernel: str
    cmdline: str = ""
    memory: int = 64 << 20
    vcpus: int = 1
    ready: str | None = None          # None: the kvmguest port's READY; else console text
    timeout: float = DEFAULT_TIMEOUT

    def key(self) -> str:
        from migrate import format as fmt
        from kvmguest.state import STATE_VERSION
        h = hashlib.sha256()
        with open(self.kernel, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(repr((self.cmdline, self.memory, self.vcpus, self.ready, fmt.VERSION,
                       STATE_VERSION)).encode())
        return h.hexdigest()[:20]


def cache_dir() -> str:
    base = os.environ.get(CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "kvmguest", "snapshots")
    return base


def _boot_to_ready(spec: GuestSpec, path: str) -> None:
    """Boot ``spec`` until its ready point and save it to ``path`` (temp file + rename)."""
    from migrate.precopy import live_save

    from kvmguest.devices.guest_port import READY, REQUESTS
    from kvmguest.machine import Machine

    m = Machine(spec.kernel, memory=spec.memory, cmdline=spec.cmdline, vcpus=spec.vcpus)
    try:
        requests = m.listen_guest_requests() if spec.ready is None else None
        m.start()
        deadline = time.monotonic() + spec.timeout
        while True:
            if spec.ready is not None and m.serial.wait_for(spec.ready, 0.05):
                break
            if requests is not None and not requests.empty():
                req, _ = requests.get()
                if req == READY:
                    break
                raise FixtureError(f"{spec.kernel} asked for {REQUESTS[req]!r} before it "
                                   "was ready")
            if not m.running:
                raise FixtureError(f"{spec.kernel} ended before its ready point: "
                                   f"{_tail(m)}")
            if time.monotonic() > deadline:
                what = f"{spec.ready!r} on its console" if spec.ready else \
                    "READY on the kvmguest port"
                raise FixtureError(f"{spec.kernel} did not reach its ready point ({what}) "
                                   f"within {spec.timeout:g} s: {_tail(m)}")
            if requests is not None:
                m.wait_done(0.005)
        live_save(m, path, then="stop")
    finally:
        m.close()


def _tail(m) -> str:
    text = m.serial.text().strip()
    return f"console ends {text[-300:]!r}" if text else "nothing on its console"


def _check_private(st: os.stat_result, what: str) -> None:
    """Refuse what another user could have written (FixtureError, one line)."""
    if st.st_uid != os.geteuid():
        raise FixtureError(f"{what} belongs to uid {st.st_uid}, not to you: refusing to "
                           "trust it (set KVMGUEST_CACHE to a directory of your own)")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise FixtureError(f"{what} is writable by group or others (mode "
                           f"{stat.S_IMODE(st.st_mode):o}): refusing to trust it "
                           "(chmod go-w, or set KVMGUEST_CACHE to a private directory)")


def _lock_holders(dfd: int) -> str:
    """Who holds a lock on the directory behind ``dfd``: "pid N (command)", from
    /proc/locks."""
    st = os.fstat(dfd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[5] == inode and "->" not in line:
                    pid = fields[4]
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as c:
                            cmd = c.read().replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        cmd = "?"
                    holders.append(f"pid {pid} ({cmd.strip()[:80]})")
    except OSError:
        pass
    return ", ".join(holders) or "another process"


def _lock(dfd: int, directory: str, wait: float) -> None:
    """Take the cache's lock, waiting at most ``wait`` seconds."""
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise FixtureError(f"the snapshot cache {directory} has been locked by "
                                   f"{_lock_holders(dfd)} for over {wait:g} s") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def snapshot_for(spec: GuestSpec) -> str:
    """The cached snapshot of ``spec`` at its ready point, made now if there is none (or
    the one there does not validate). Safe from several processes at once."""
    from migrate.format import SnapshotError
    from migrate.formats.mapped import validate

    directory = os.path.abspath(cache_dir())
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise FixtureError(f"cannot use the snapshot cache {directory}: {err.strerror}") \
            from None
    try:
        _check_private(os.fstat(dfd), f"the snapshot cache {directory}")
        _lock(dfd, directory, spec.timeout + LOCK_GRACE)   # one boots, the others wait
        name = os.path.splitext(os.path.basename(spec.kernel))[0]
        path = os.path.join(directory, f"{name}-{spec.key()}.snap")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                raise FixtureError(f"{path} in the snapshot cache is not a regular file")
            _check_private(st, f"the cached snapshot {path}")
            try:
                validate(path)
                return path
            except SnapshotError:
                os.unlink(path)                 # damaged: make it again
        _boot_to_ready(spec, path)
        return path
    finally:
        os.close(dfd)                           # releases the lock


class Prepared:
    """One restored machine of one spec in this process, reset before each test."""

    def __init__(self, spec: GuestSpec):
        self.spec = spec
        self.path = snapshot_for(spec)
        self.machine = None
        self.point = None
        self.handed = 0

    def _restore(self) -> None:
        from migrate.reader import restore
        from migrate.reset import ResetPoint
        self.close()
        m, _ = restore(self.path, lazy=True)
        try:
            self.point = ResetPoint(m, self.path)
            m.start()
        except BaseException:
            m.close()
            raise
        self.machine = m

    def take(self):
        """The machine, as at the ready point: reset in place, or restored afresh."""
        if self.machine is not None and self.handed and self.machine.running:
            # Once reset has paused it, a guest is either parked or finished (an exit
            # in flight completes first): a finished one is restored afresh below.
            self.point.reset(clear_console=True)
        if self.machine is None or not self.machine.running or self.machine.error:
            self._restore()
        self.handed += 1
        return self.machine

    def close(self) -> None:
        if self.point is not None:
            self.point.close()
            self.point = None
        if self.machine is not None:
            self.machine.close()
            self.machine = None


class Pool:
    """Every Prepared machine of this pytest process (the plugin's session fixture)."""

    def __init__(self):
        self.prepared: dict[GuestSpec, Prepared] = {}

    def take(self, spec: GuestSpec):
        p = self.prepared.get(spec)
        if p is None:
            p = self.prepared[spec] = Prepared(spec)
        return p.take()

    def close(self) -> None:
        for p in self.prepared.values():
            p.close()
        self.prepared.clear()


def guest_fixture(kernel: str, *, cmdline: str = "", memory: int = 64 << 20, vcpus: int = 1,
                  ready: str | None = None, timeout: float = DEFAULT_TIMEOUT):
    """A function-scoped pytest fixture handing each test a running Machine reset to the
    guest's ready point (see the module's doc). ``kernel`` relative to where pytest runs."""
    import pytest

    spec = _spec(kernel, cmdline, memory, vcpus, ready, timeout)

    @pytest.fixture
    def fixture(request):
        request.getfixturevalue("kvm_available")
        pool = request.getfixturevalue("kvmguest_pool")
        try:
            m = pool.take(spec)
        except KvmguestError as err:
            pytest.fail(f"kvmguest fixture for {kernel}: {err}", pytrace=False)
        from kvmguest.front.testing.common import remember
        remember(request, m)
        return m

    return fixture


def guest_snapshot(kernel: str, *, cmdline: str = "", memory: int = 64 << 20, vcpus: int = 1,
                   ready: str | None = None, timeout: float = DEFAULT_TIMEOUT):
    """A session-scoped pytest fixture: the path of the cached snapshot of the guest at its
    ready point (made once, as guest_fixture's), for tests that restore it themselves
    (``migrate.reader.restore(path, lazy=True)``: a clone)."""
    import pytest

    from kvmguest.front.testing.common import ensure_kvm

    spec = _spec(kernel, cmdline, memory, vcpus, ready, timeout)

    @pytest.fixture(scope="session")
    def fixture():
        ensure_kvm()
        try:
            return snapshot_for(spec)
        except KvmguestError as err:
            pytest.fail(f"kvmguest snapshot of {kernel}: {err}", pytrace=False)

    return fixture


def _spec(kernel, cmdline, memory, vcpus, ready, timeout) -> GuestSpec:
    return GuestSpec(os.path.abspath(kernel), cmdline, int(memory), vcpus, ready, timeout)
