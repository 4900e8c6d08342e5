"""Snapshots as test fixtures: kvmguest.front.testing.guest_fixture in real pytest runs
(plain and under pytest-xdist), the kvmguest port's READY, and a guest asking to be
migrated to a new process (`run --guest-migrate`)."""

from __future__ import annotations

import os

import pytest

from helpers import cli, guest

CONFTEST = """
from kvmguest.front.testing import guest_fixture, guest_snapshot
app = guest_fixture({kernel!r}, cmdline={cmdline!r})
app_snapshot = guest_snapshot({kernel!r}, cmdline={cmdline!r})
"""

TESTS = """
import pytest

@pytest.mark.parametrize("i", range({n}))
def test_each_test_starts_from_the_ready_point(app, i):
    assert app.serial.wait_for("ready (from the snapshot, restored 1)", 20), app.serial.text()
    app.console.send(b"check\\nwrite 40\\ncheck\\n")
    assert app.serial.wait_for("clean after 0 commands", 20), app.serial.text()
    assert app.serial.wait_for("dirty: 40 pages changed, 1 commands", 20), app.serial.text()
    import os
    if os.environ.get("WORKERS_LOG"):
        with open(os.environ["WORKERS_LOG"], "a") as f:
            f.write(os.environ.get("PYTEST_XDIST_WORKER", "-") + "\\n")

def test_a_guest_that_exits_is_replaced(app):
    app.console.send(b"exit\\n")
    assert app.serial.wait_for("fixture: bye", 20)

def test_the_next_one_still_gets_a_clean_guest(app):
    app.console.send(b"check\\n")
    assert app.serial.wait_for("clean after 0 commands", 20), app.serial.text()

def test_the_same_snapshot_as_a_path_for_a_clone_of_ones_own(app_snapshot, app):
    from migrate.reader import restore
    clone, _ = restore(app_snapshot, lazy=True)
    try:
        clone.start()
        clone.console.send(b"write 7\\ncheck\\n")
        assert clone.serial.wait_for("dirty: 7 pages changed", 20), clone.serial.text()
        app.console.send(b"check\\n")           # the fixture's machine is untouched by it
        assert app.serial.wait_for("clean after 0 commands", 20), app.serial.text()
    finally:
        clone.close()
"""


def _project(pytester, cache, cmdline="pages=300", n=6):
    pytester.makeconftest(CONFTEST.format(kernel=str(guest("fixture")), cmdline=cmdline))
    pytester.makepyfile(test_app=TESTS.format(n=n))
    return {"KVMGUEST_CACHE": str(cache)}


def _run(pytester, env, *args):
    for k, v in env.items():
        pytester._monkeypatch.setenv(k, v)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", *args, timeout=300)


def _snapshots(cache):
    return sorted(p for p in os.listdir(cache)) if os.path.isdir(cache) else []


def test_fixture_boots_once_caches_the_snapshot_and_resets_each_test(pytester, tmp_path):
    cache = tmp_path / "cache"
    env = _project(pytester, cache)
    r = _run(pytester, env)
    r.assert_outcomes(passed=9)
    snaps = _snapshots(cache)
    assert len(snaps) == 1 and snaps[0].startswith("fixture-") and snaps[0].endswith(".snap")
    inode = os.stat(cache / snaps[0]).st_ino
    # Again: the cached snapshot is used as it is (not booted, not rewritten).
    _run(pytester, env).assert_outcomes(passed=9)
    assert _snapshots(cache) == snaps and os.stat(cache / snaps[0]).st_ino == inode
    # Another command line is another snapshot; a damaged one is made again.
    env2 = _project(pytester, cache, cmdline="pages=200")
    _run(pytester, env2).assert_outcomes(passed=9)
    assert len(_snapshots(cache)) == 2
    for name in _snapshots(cache):
        with open(cache / name, "r+b") as f:
            f.write(b"junk")
    _run(pytester, env2).assert_outcomes(passed=9)
    assert len(_snapshots(cache)) == 2


def test_fixture_under_xdist_shares_one_snapshot_and_leaves_nothing_behind(pytester,
                                                                            tmp_path):
    pytest.importorskip("xdist")
    cache = tmp_path / "cache"
    env = _project(pytester, cache, n=10)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)
    env["WORKERS_LOG"] = str(tmp_path / "workers")
    r = _run(pytester, env, "-n", "2")
    r.assert_outcomes(passed=13)
    workers = set((tmp_path / "workers").read_text().split())
    assert workers == {"gw0", "gw1"}                            # both workers had machines
    assert len(_snapshots(cache)) == 1                           # booted once, shared
    assert os.listdir(tmp) == []                                 # no temporary files


def test_fixture_with_a_console_ready_point(pytester, tmp_path):
    pytester.makeconftest(f"""
from kvmguest.front.testing import guest_fixture
echo = guest_fixture({str(guest('echo'))!r}, ready="echo: ready")
""")
    pytester.makepyfile(test_echo="""
import pytest

@pytest.mark.parametrize("word", ["one", "two", "three"])
def test_echo(echo, word):
    assert "echo: one" not in echo.serial.text()          # a fresh console each test
    echo.console.send(word.encode() + b"\\n")
    assert echo.serial.wait_for("echo: " + word, 20), echo.serial.text()
""")
    _run(pytester, {"KVMGUEST_CACHE": str(tmp_path / "c")}).assert_outcomes(passed=3)


def test_a_guest_that_never_gets_ready_fails_the_test_in_one_line(pytester, tmp_path):
    pytester.makeconftest(f"""
from kvmguest.front.testing import guest_fixture
hello = guest_fixture({str(guest('hello'))!r}, timeout=20)
""")
    pytester.makepyfile(test_hello="def test_it(hello):\n    pass\n")
    r = _run(pytester, {"KVMGUEST_CACHE": str(tmp_path / "c")})
    r.assert_outcomes(errors=1)
    r.stdout.fnmatch_lines(["*ended before its ready point*Hello*"])
    assert not any(n.endswith(".snap") for n in _snapshots(tmp_path / "c"))


GUEST_MIGRATES = b"write 5\nmigrate\ncheck\nmigrate\nwrite 3\ncheck\nexit\n"


def test_a_guest_asks_to_be_migrated_and_carries_on_in_a_new_process(tmp_path):
    env = {"TMPDIR": str(tmp_path)}
    p = cli("run", guest("fixture"), "--cmdline", "pages=64", "--guest-migrate",
            "--console-input", input=GUEST_MIGRATES.decode(), env=env, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("fixture:")]
    assert lines == [
        "fixture: 64 pages set up",
        "fixture: ready (no snapshot, restored 0)",          # nothing listens for READY
        "fixture: wrote 5 pages",
        "fixture: migrated (restored 1), 5 pages changed, 1 commands",
        "fixture: dirty: 5 pages changed, 1 commands",
        "fixture: migrated (restored 2), 5 pages changed, 1 commands",
        "fixture: wrote 3 pages",
        "fixture: dirty: 5 pages changed, 2 commands",
        "fixture: bye"], p.stdout
    assert os.listdir(tmp_path) == []              # the temporary snapshots are gone
    # Without --guest-migrate the request is not honoured, and the guest can tell.
    p = cli("run", guest("fixture"), "--cmdline", "pages=64", "--console-input",
            input="migrate\nexit\n", timeout=120)
    assert p.returncode == 0 and "fixture: not migrated (restored 0), 0 pages" in p.stdout


def test_guest_migrate_with_a_timeout_too_short_is_the_usual_timeout(tmp_path):
    p = cli("run", guest("fixture"), "--cmdline", "pages=64", "--guest-migrate", "--timeout",
            "2", "--console-input", input="migrate\n", env={"TMPDIR": str(tmp_path)})
    # The new process has what is left of the 2 s, and times out as a run does.
    assert p.returncode == 124 and "kvmguest: guest did not finish within" in p.stderr
    assert "fixture: migrated (restored 1)" in p.stdout and os.listdir(tmp_path) == []


def test_the_example_in_docs_fixtures_md_works_as_written(pytester, tmp_path):
    import re
    from helpers import ROOT
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "fixtures.md").read_text(),
                        re.S)
    conftest, test_app, _clones, test_migration = blocks     # the clones sketch is run above
    os.symlink(ROOT / "guests", pytester.path / "guests")
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_app=test_app, test_migration=test_migration)
    _run(pytester, {"KVMGUEST_CACHE": str(tmp_path / "c")}).assert_outcomes(passed=2)


# --- the cache is trusted only when nobody else could have written it ---------------------
def _spec(**kw):
    from kvmguest.front.testing.fixtures import GuestSpec
    return GuestSpec(str(guest("fixture")), cmdline="pages=64", **kw)


def test_the_cache_directory_is_made_private_and_a_shared_one_is_refused(tmp_path, monkeypatch,
                                                                          kvm_available):
    from kvmguest.front.testing.fixtures import FixtureError, snapshot_for
    cache = tmp_path / "new" / "cache"
    monkeypatch.setenv("KVMGUEST_CACHE", str(cache))
    path = snapshot_for(_spec())
    assert os.stat(cache).st_mode & 0o777 == 0o700 and os.stat(path).st_mode & 0o777 == 0o600
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)                       # like /tmp
    monkeypatch.setenv("KVMGUEST_CACHE", str(shared))
    with pytest.raises(FixtureError, match=r"writable by group or others \(mode 1777\)"):
        snapshot_for(_spec())
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    monkeypatch.setenv("KVMGUEST_CACHE", str(theirs))
    with pytest.raises(FixtureError, match="belongs to uid 65534, not to you"):
        snapshot_for(_spec())


def test_a_snapshot_planted_in_the_cache_by_someone_else_is_refused(tmp_path, monkeypatch,
                                                                    kvm_available):
    """The key is a hash of public inputs, so another user can plant a valid snapshot
    under the expected name: it is refused, not restored into every test."""
    from kvmguest.front.testing.fixtures import FixtureError, snapshot_for
    monkeypatch.setenv("KVMGUEST_CACHE", str(tmp_path / "c"))
    path = snapshot_for(_spec())
    os.chown(path, 65534, 65534)                   # as if another user had put it there
    with pytest.raises(FixtureError, match="cached snapshot .* belongs to uid 65534"):
        snapshot_for(_spec())
    os.chown(path, os.geteuid(), os.getegid())
    os.chmod(path, 0o666)
    with pytest.raises(FixtureError, match="writable by group or others"):
        snapshot_for(_spec())


def test_a_held_cache_lock_fails_in_bounded_time_naming_its_holder(tmp_path, monkeypatch,
                                                                   kvm_available):
    import subprocess
    import sys
    import time

    from kvmguest.front.testing.fixtures import FixtureError, snapshot_for
    cache = tmp_path / "c"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("KVMGUEST_CACHE", str(cache))
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys, time
fd = os.open({str(cache)!r}, os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setattr("kvmguest.front.testing.fixtures.LOCK_GRACE", 0.0)
        t = time.monotonic()
        with pytest.raises(FixtureError, match=rf"locked by pid {holder.pid} \(.*python"):
            snapshot_for(_spec(timeout=1.0))
        assert time.monotonic() - t < 30
    finally:
        holder.kill()
        holder.wait()
