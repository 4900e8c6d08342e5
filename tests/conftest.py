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


def assert_file_matches_source(path, machine, lazy: bool) -> int:
    """The snapshot's page areas hold exactly the source RAM at the pause, byte for byte.
    Returns the number of pages compared."""
    import numpy as np

    from migrate import format as fmt
    from migrate.reader import load_memory

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


os.environ.setdefault("PYTHONUNBUFFERED", "1")
