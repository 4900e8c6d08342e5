import os
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT

pytest_plugins = ["pytester"]
os.environ.setdefault("PYTHONUNBUFFERED", "1")


LINUX_BOOT = "tests/test_linux_boot.py"


def pytest_collection_modifyitems(items):
    # Every test that touches KVM is marked, so the plugin skips (or fails under CI).
    for item in items:
        if item.get_closest_marker("nokvm") is None and not item.nodeid.startswith(
                ("tests/test_abi.py", "tests/test_devices.py", "tests/test_format.py")):
            item.add_marker(pytest.mark.kvm)
    # The Linux boot runs in the background while the rest does; its tests come last.
    items.sort(key=lambda item: item.nodeid.startswith(LINUX_BOOT))


def pytest_collection_finish(session):
    if not session.config.option.collectonly and any(
            item.nodeid.startswith(LINUX_BOOT) for item in session.items):
        import linux_boot
        linux_boot.start_in_background()


def pytest_sessionfinish(session):
    import linux_boot
    linux_boot.close()


@pytest.fixture(scope="session")
def kut_tree() -> str:
    """The built kvm-unit-tests folder (scripts/build-kut)."""
    p = subprocess.run([str(ROOT / "scripts" / "build-kut")], capture_output=True, text=True,
                       timeout=600)
    if p.returncode != 0:       # the tarball is in the project (third_party/)
        pytest.fail(f"kvm-unit-tests could not be built: {p.stderr.strip()}", pytrace=False)
    return p.stdout.strip()


@pytest.fixture(scope="session")
def minimal_kernel() -> Path:
    """The kernel for test guests (scripts/build-linux: built once per machine, ~20
    minutes the first time, cached outside the tree)."""
    p = subprocess.run([str(ROOT / "scripts" / "build-linux")], capture_output=True,
                       text=True, timeout=3600)
    if p.returncode != 0:
        pytest.fail(f"scripts/build-linux failed: {p.stderr.strip()[-2000:]}", pytrace=False)
    return Path(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def vmlinuz() -> Path:
    """Debian's kernel (scripts/fetch-linux): a test without it fails under CI."""
    from linux_boot import fetch_linux
    path, why = fetch_linux()
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Debian's kernel could not be fetched: {why}", pytrace=False)
        pytest.skip(f"Debian's kernel could not be fetched: {why}")
    return path


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A small, valid snapshot of a running dirty guest (passes=0: it never ends)."""
    path = tmp_path_factory.mktemp("snap") / "g.snap"
    from helpers import RAM, cli, run_dirty
    p = cli(*run_dirty("--save", path, "--save-after", "0.3", "-q", memory=f"{RAM >> 20}M"))
    assert p.returncode == 0, p.stderr
    from migrate import format as fmt
    assert len(fmt.read_snapshot(str(path)).layout.blocks) == 2
    return path


@pytest.fixture
def shared_dir():
    """A directory other users can reach (pytest's own are private to root)."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="kvmguest-test-", dir="/tmp")
    os.chmod(d, 0o777)
    yield __import__("pathlib").Path(d)
    shutil.rmtree(d, ignore_errors=True)
