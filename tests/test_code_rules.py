"""Rules that keep the code easy to change (review items 20-22), checked on the source."""

import ast
import re

import pytest

from helpers import ROOT

pytestmark = pytest.mark.nokvm
PACKAGES = ("kvmguest", "migrate", "bench")


def sources(*dirs):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def test_each_fact_is_defined_once():
    page_defs, stream_magic = [], []
    for path in sources("kvmguest", "migrate"):
        text = path.read_text()
        page_defs += [path.name for _ in re.finditer(r"^PAGE(_SIZE)?\s*=\s*4096", text, re.M)]
        stream_magic += [path.name for _ in re.finditer(r'b"KVMGSTRM"', text)]
    assert page_defs == ["abi.py"]
    assert stream_magic == ["format.py"]


def test_no_private_name_is_imported_or_reached_across_modules():
    offenders = []
    for path in sources(*PACKAGES, "tests"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                offenders += [f"{path.name}: from {node.module} import {a.name}"
                              for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and node.value.id not in ("self", "cls")
                    and path.parent.name != "tests"):
                offenders.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert offenders == []


def test_migrate_never_imports_the_kvm_abi():
    for path in sources("migrate"):
        assert "kvmguest.abi" not in path.read_text() and "from kvmguest import abi" \
            not in path.read_text(), path


def test_dirty_log_ioctls_are_called_only_by_the_dirty_log_backend():
    for path in sources(*PACKAGES):
        if path.name in ("kvm.py", "bitmap_log.py", "ring_log.py"):
            continue
        text = path.read_text()
        assert not re.search(r"\.(get_dirty_log|clear_dirty_log|reset_dirty_rings)\(",
                             text), path


def test_pytest_runs_with_strict_markers():
    assert "--strict-markers" in (ROOT / "pyproject.toml").read_text()


def test_tests_do_not_sleep_to_synchronise():
    """Handshakes (console lines, guest memory, pipes) instead of sleeps: the only sleeps
    left are a window in which nothing may happen, and the polling helper itself."""
    allowed = {"test_pause.py": 1, "helpers.py": 1, "test_smp.py": 1}   # smp: harvest period
    for path in sources("tests"):
        count = len(re.findall(r"time\.sleep\(", path.read_text()))
        if path.name == "test_code_rules.py":
            continue
        assert count <= allowed.get(path.name, 0), (path.name, count)
