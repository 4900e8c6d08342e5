import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests" / "build"

pytest_plugins = ["pytester"]


def guest(name: str) -> Path:
    path = GUESTS / f"{name}.elf"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make` (it builds the guests)", pytrace=False)
    return path


@pytest.fixture
def guest_path():
    return guest


def pytest_collection_modifyitems(items):
    # Every test that touches KVM is marked, so the plugin skips (or fails under CI).
    for item in items:
        if item.get_closest_marker("nokvm") is None and not item.nodeid.startswith(
                ("tests/test_abi.py", "tests/test_devices.py", "tests/test_format.py")):
            item.add_marker(pytest.mark.kvm)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


os.environ.setdefault("PYTHONUNBUFFERED", "1")
