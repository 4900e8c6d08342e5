"""pytest plugin: boot guests on real KVM in a few lines of test code.

    @pytest.mark.kvm
    def test_hello(boot_guest):
        result = boot_guest("guests/build/hello.elf", cmdline="x=1")
        assert result.exit_code == 0 and "Hello" in result.console

Snapshots as fixtures (boot once to a ready point, reset per test):
``kvmguest.testing.guest_fixture`` and docs/fixtures.md.

Where /dev/kvm is unusable, tests marked ``kvm`` (and tests using these fixtures) are
skipped with the reason, except under ``CI=true`` or ``KVMGUEST_REQUIRE_KVM=1``, where
that is an error: CI must never go green by skipping its hardware tests.
"""

from __future__ import annotations

import os

import pytest

from ..kvm import KvmUnavailable


def kvm_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or \
        os.environ.get("KVMGUEST_REQUIRE_KVM", "") not in ("", "0")


def kvm_problem() -> str | None:
    """None when KVM is usable, else why not."""
    try:
        from ..machine import open_kvm
        open_kvm().close()
    except KvmUnavailable as err:
        return str(err)
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm (real hardware "
                                       "virtualization)")


def ensure_kvm():
    """Skip (or, under CI, fail) the calling test when KVM is unusable."""
    problem = kvm_problem()
    if problem is None:
        return
    if kvm_required():
        pytest.fail(f"KVM is required here (CI=true or KVMGUEST_REQUIRE_KVM) but unusable: "
                    f"{problem}", pytrace=False)
    pytest.skip(f"KVM unusable: {problem}")


def pytest_runtest_setup(item):
    if item.get_closest_marker("kvm") is not None:
        ensure_kvm()


@pytest.fixture
def kvm_available():
    """Skips (or fails under CI) when KVM is unusable."""
    ensure_kvm()


@pytest.fixture(scope="session")
def kvmguest_pool():
    """The machines that kvmguest.testing.guest_fixture hands out in this process
    (closed at the end of the session)."""
    from .fixtures import Pool
    pool = Pool()
    yield pool
    pool.close()


@pytest.fixture
def boot_guest(kvm_available):
    """Boot a PVH ELF and return its GuestResult: ``boot_guest(path, cmdline=, memory=,
    timeout=, vcpus=)``. Machines are closed at teardown."""
    from ..machine import Machine

    machines = []

    def boot(kernel, cmdline: str = "", memory: int = 64 << 20, timeout: float = 30.0,
             vcpus: int = 1):
        m = Machine(str(kernel), memory=memory, cmdline=cmdline, vcpus=vcpus)
        machines.append(m)
        return m.run(timeout=timeout)

    yield boot
    for m in machines:
        m.close()


@pytest.fixture
def machine_factory(kvm_available):
    """Create Machines that are closed at teardown: ``machine_factory(path, **kw)``."""
    from ..machine import Machine

    machines = []

    def make(kernel=None, **kw):
        m = Machine(str(kernel) if kernel is not None else None, **kw)
        machines.append(m)
        return m

    yield make
    for m in machines:
        m.close()
