import os

import pytest

pytest_plugins = ["pytester"]
os.environ.setdefault("PYTHONUNBUFFERED", "1")


def pytest_collection_modifyitems(items):
    # Every test that touches KVM is marked, so the plugin skips (or fails under CI).
    for item in items:
        if item.get_closest_marker("nokvm") is None and not item.nodeid.startswith(
                ("tests/test_abi.py", "tests/test_devices.py", "tests/test_format.py")):
            item.add_marker(pytest.mark.kvm)
