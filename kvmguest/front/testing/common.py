"""What the pytest plugin and the snapshot fixtures share: whether KVM is required and
usable (skip, or under CI fail), and which machines a test had (saved when it fails)."""

from __future__ import annotations

import os

import pytest

from kvmguest.kvm import KvmUnavailable


def kvm_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or \
        os.environ.get("KVMGUEST_REQUIRE_KVM", "") not in ("", "0")


def kvm_problem() -> str | None:
    """None when KVM is usable, else why not."""
    try:
        from kvmguest.machine import open_kvm
        open_kvm().close()
    except KvmUnavailable as err:
        return str(err)
    return None


def ensure_kvm():
    """Skip (or, under CI, fail) the calling test when KVM is unusable."""
    problem = kvm_problem()
    if problem is None:
        return
    if kvm_required():
        pytest.fail(f"KVM is required here (CI=true or KVMGUEST_REQUIRE_KVM) but unusable: "
                    f"{problem}", pytrace=False)
    pytest.skip(f"KVM unusable: {problem}")


def remember(request, machine) -> None:
    """Note ``machine`` as the running test's, to be saved if the test fails."""
    request.node.__dict__.setdefault("kvmguest_machines", []).append(machine)
