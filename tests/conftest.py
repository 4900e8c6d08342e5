import os
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT

pytest_plugins = ["pytester"]
# A whole Linux boot takes ~15 minutes here: `make linux` runs it (KVMGUEST_LINUX_BOOT=1).
collect_ignore = [] if os.environ.get("KVMGUEST_LINUX_BOOT") else ["test_linux_boot.py"]
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


@pytest.fixture(scope="session")
def vmlinuz() -> Path:
    p = subprocess.run([str(ROOT / "scripts" / "fetch-linux")], capture_output=True, text=True,
                       timeout=600)
    if p.returncode != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Debian's kernel could not be fetched: {p.stderr.strip()}",
                        pytrace=False)
        pytest.skip(f"Debian's kernel could not be fetched: {p.stderr.strip()}")
    return Path(p.stdout.strip())
