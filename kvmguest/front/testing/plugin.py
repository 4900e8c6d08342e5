"""pytest plugin: boot guests on real KVM in a few lines of test code.

    @pytest.mark.kvm
    def test_hello(boot_guest):
        result = boot_guest("guests/build/hello.elf", cmdline="x=1")
        assert result.exit_code == 0 and "Hello" in result.console

Snapshots as fixtures (boot once to a ready point, reset per test):
``kvmguest.front.testing.guest_fixture`` and docs/fixtures.md.

When a test fails, each machine it had from these fixtures is saved where it stood
(``$KVMGUEST_FAILED_SNAPSHOTS``, default ``$TMPDIR/kvmguest-failed-UID``) and the report
shows the one command that opens it in gdb (``kvmguest restore SNAPSHOT --gdb ...``).

Where /dev/kvm is unusable, tests marked ``kvm`` (and tests using these fixtures) are
skipped with the reason, except under ``CI=true`` or ``KVMGUEST_REQUIRE_KVM=1``, where
that is an error: CI must never go green by skipping its hardware tests.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import tempfile

import pytest

from kvmguest.front.testing.common import ensure_kvm, remember


def pytest_configure(config):
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm (real hardware "
                                       "virtualization)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("kvm") is not None:
        ensure_kvm()


FAILED_DIR_ENV = "KVMGUEST_FAILED_SNAPSHOTS"


def failed_dir() -> str:
    """Where failed tests' guests are saved: private to this user."""
    d = os.environ.get(FAILED_DIR_ENV) or os.path.join(tempfile.gettempdir(),
                                                       f"kvmguest-failed-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise OSError(f"{d} is not private to this user; not saving guest memory there")
    return d


def gdb_socket_for(path: str) -> str:
    """A gdb socket path beside the saved guest, or, where that is longer than a Unix
    socket path may be (a long test name, pytest-xdist's temporary directories), a short
    one in $XDG_RUNTIME_DIR, the failed-guest directory or the temporary directory."""
    from kvmguest.front.control import MAX_PATH
    sock = path[:-4] + ".gdb"
    if len(os.fsencode(sock)) <= MAX_PATH:
        return sock
    short = f"kvmguest-gdb-{hashlib.sha1(os.fsencode(path)).hexdigest()[:12]}.sock"
    for d in (os.environ.get("XDG_RUNTIME_DIR"), os.path.dirname(path), tempfile.gettempdir()):
        if d and len(os.fsencode(os.path.join(d, short))) <= MAX_PATH:
            return os.path.join(d, short)
    return sock          # `kvmguest restore` then says why it cannot use it, in one line


def leave_snapshot(nodeid: str, machine, n: int = 0) -> str:
    """Save ``machine`` as it stands (it runs on) for a failed test; what to tell the user."""
    from migrate.precopy import live_save
    name = re.sub(r"[^\w.-]+", "_", nodeid)[-120:] + (f"-{n}" if n else "")
    try:
        path = os.path.join(failed_dir(), name + ".kvm")
        live_save(machine, path, then="continue")
    except Exception as err:       # noqa: BLE001 - the test's own failure comes first
        return f"the guest could not be saved for gdb: {err}"
    kernel = machine.kernel.path if machine.kernel is not None else \
        machine.origin.get("kernel", "KERNEL")
    sock = gdb_socket_for(path)
    return (f"the guest is saved where the test failed: {path}\nopen it in gdb:\n"
            f"  kvmguest restore {shlex.quote(path)} --gdb {shlex.quote(sock)} -q & "
            f"gdb {shlex.quote(str(kernel))} -ex {shlex.quote('target remote ' + sock)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    live = [m for m in item.__dict__.get("kvmguest_machines", ()) if not m.closed]
    for n, m in enumerate(live):
        report.sections.append(("kvmguest: the failed test's guest",
                                leave_snapshot(item.nodeid, m, n)))


@pytest.fixture
def kvm_available():
    """Skips (or fails under CI) when KVM is unusable."""
    ensure_kvm()


@pytest.fixture(scope="session")
def kvmguest_pool():
    """The machines that kvmguest.front.testing.guest_fixture hands out in this process
    (closed at the end of the session)."""
    from kvmguest.front.testing.fixtures import Pool
    pool = Pool()
    yield pool
    pool.close()


@pytest.fixture
def boot_guest(kvm_available, request):
    """Boot a PVH ELF and return its GuestResult: ``boot_guest(path, cmdline=, memory=,
    timeout=, vcpus=)``. Machines are closed at teardown."""
    from kvmguest.machine import Machine

    machines = []

    def boot(kernel, cmdline: str = "", memory: int = 64 << 20, timeout: float = 30.0,
             vcpus: int = 1):
        m = Machine(str(kernel), memory=memory, cmdline=cmdline, vcpus=vcpus)
        machines.append(m)
        remember(request, m)
        return m.run(timeout=timeout)

    yield boot
    for m in machines:
        m.close()


@pytest.fixture
def machine_factory(kvm_available, request):
    """Create Machines that are closed at teardown: ``machine_factory(path, **kw)``."""
    from kvmguest.machine import Machine

    machines = []

    def make(kernel=None, **kw):
        m = Machine(str(kernel) if kernel is not None else None, **kw)
        machines.append(m)
        remember(request, m)
        return m

    yield make
    for m in machines:
        m.close()
