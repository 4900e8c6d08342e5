import os
import subprocess

import pytest

from helpers import ROOT

pytest_plugins = ["pytester"]
os.environ.setdefault("PYTHONUNBUFFERED", "1")


def pytest_collection_modifyitems(items):
    # Every test that touches KVM is marked, so the plugin skips (or fails under CI).
    for item in items:
        if item.get_closest_marker("nokvm") is None and not item.nodeid.startswith(
                ("tests/test_abi.py", "tests/test_devices.py", "tests/test_format.py")):
            item.add_marker(pytest.mark.kvm)


@pytest.fixture(scope="session")
def kut_tree() -> str:
    """The built kvm-unit-tests folder (scripts/build-kut)."""
    p = subprocess.run([str(ROOT / "scripts" / "build-kut")], capture_output=True, text=True,
                       timeout=600)
    if p.returncode == 2 and "no kvm-unit-tests tarball" in p.stderr:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"kvm-unit-tests is not available: {p.stderr.strip()}")
        pytest.skip(p.stderr.strip())
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()
