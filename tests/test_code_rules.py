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


def _literals(tree):
    """Every str/bytes constant of a module but its docstrings."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, (str, bytes)) and id(n) not in docs]


def _assigned(tree):
    """(name, value node) of every assignment, tuple targets unpacked."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign):
            for t in n.targets:
                if isinstance(t, ast.Tuple) and isinstance(n.value, ast.Tuple):
                    yield from ((e.id, v) for e, v in zip(t.elts, n.value.elts)
                                if isinstance(e, ast.Name))
                elif isinstance(t, ast.Name):
                    yield t.id, n.value


FACT = re.compile(rb"^(KVMGUEST_[A-Z_]+|kvmguest-state|KVMG[A-Z]{4}|QEVM|CKPTRECD)$")


def test_each_fact_is_defined_once():
    """A page size, a magic, an environment variable, the state's format name: each
    written once (the others import it), however it is written (a tuple assignment too)."""
    page_defs, facts = [], {}
    for path in sources(*PACKAGES):
        tree = ast.parse(path.read_text())
        page_defs += [f"{path.name}: {name}" for name, value in _assigned(tree)
                      if re.fullmatch(r"PAGE(_SIZE)?", name)
                      and isinstance(value, ast.Constant) and value.value == 4096]
        for node in _literals(tree):
            raw = node.value.encode() if isinstance(node.value, str) else node.value
            if FACT.match(raw):
                facts.setdefault(raw, []).append(f"{path.name}:{node.lineno}")
    assert page_defs == ["abi.py: PAGE_SIZE"], page_defs
    twice = {k.decode(): v for k, v in facts.items() if len(v) > 1}
    assert twice == {}, twice
    assert b"kvmguest-state" in facts and b"KVMGUEST_FAULT_POINT" in facts   # it can see them


def test_control_register_bits_have_names():
    """CR0/CR4/EFER bits are named once (kvmguest.arch.x86.regs), not written as numbers where
    a register is tested: `sregs.cr0 & (1 << 31)` says nothing to its reader."""
    offenders = []
    for path in sources(*PACKAGES):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.BitAnd, ast.BitOr)):
                sides = (n.left, n.right)
                if any(isinstance(x, ast.Attribute) and x.attr in ("cr0", "cr4", "efer")
                       for x in sides) and any(
                        isinstance(x, ast.Constant) or (isinstance(x, ast.BinOp) and
                                                        isinstance(x.op, ast.LShift))
                        for x in sides):
                    offenders.append(f"{path.name}:{n.lineno}")
    assert offenders == []


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
                    and (node.value.id, node.attr) != ("os", "_exit")   # documented API
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
    # smp: the harvest period; checkpoint: a random delay after the awaited event, so the
    # kill lands anywhere in a checkpoint; fixtures: the child holding the cache's lock.
    allowed = {"test_pause.py": 1, "helpers.py": 1, "test_smp.py": 1, "test_checkpoint.py": 1,
               "test_fixtures.py": 1}
    for path in sources("tests"):
        count = len(re.findall(r"time\.sleep\(", path.read_text()))
        if path.name == "test_code_rules.py":
            continue
        assert count <= allowed.get(path.name, 0), (path.name, count)


# --- the floors: front-ends, the snapshot library, the VMM core ----------------------------
def _modules() -> dict[str, object]:
    mods = {}
    for path in sources("kvmguest", "migrate"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports, imports inside functions counted: ``from X import
    a`` is an edge to X.a when that is a module, else to X."""
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        package = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package
                    for _ in range(node.level - 1):
                        up = up.rpartition(".")[0]
                    base = f"{up}.{base}" if base else up
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for t in targets:
                k = known(t)
                if k and k != m:
                    graph[m].add(k)
    return graph


def floor(module: str) -> int:
    """2: a front-end; 1: the snapshot library; 0: the VMM core."""
    if module.startswith("kvmguest.front") or module == "kvmguest.__main__":
        return 2
    return 1 if module.startswith("migrate") else 0


def test_no_module_imports_a_floor_above_its_own():
    up = [f"{m} -> {t}" for m, ts in import_graph().items() for t in ts if floor(t) > floor(m)]
    assert not up, "upward imports (the core imports neither migrate nor a front-end; " \
        "migrate imports no front-end):\n" + "\n".join(sorted(up))


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):                       # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles (imports inside functions counted):\n" + \
        "\n".join(" <-> ".join(c) for c in cycles)
