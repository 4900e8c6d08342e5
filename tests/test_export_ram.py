"""`kvmguest export-ram`, and QEMU's migration files: `kvmguest inspect` recognises them
and `export-ram` writes their RAM blocks byte for byte as QEMU's own
scripts/analyze-migration.py -x does; our own snapshots export the same way.

QEMU (>= 9, for mapped-ram) runs the `dirty` guest until it has stamped its pages and
halts with interrupts off; the same halted VM is then saved four ways: the plain stream,
mapped-ram, mapped-ram + multifd, mapped-ram + multifd + direct-io. Its RAM does not
change between the saves, so every file must give the same blocks. QEMU's script (from
the Debian source of the installed QEMU, scripts/qemu-analyze-migration) does not read
mapped-ram files in QEMU 10.0, so it extracts the stream save, and our export of each
mapped-ram file is compared with that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from bench.qemu import QemuGuest, qemu_version, wait_text
from helpers import MiB, PAGE, RAM, ROOT, cli, dirty_cmdline, guest, one_line_error, wait_console
from migrate.export import export_ram
from migrate.format import SnapshotError
from migrate.inspect import describe
from migrate.pageio import data_extents
from migrate.precopy import live_save

QEMU = shutil.which("qemu-system-x86_64")
SEED = 0x5EED5EED5EED5EED
SAVES = {
    "stream": ({}, {}),
    "mapped-ram": ({"mapped-ram": True}, {}),
    "mapped-ram+multifd": ({"mapped-ram": True, "multifd": True}, {"multifd-channels": 2}),
    "mapped-ram+multifd+direct-io": ({"mapped-ram": True, "multifd": True},
                                     {"multifd-channels": 2, "direct-io": True}),
}
MAPPED = [k for k in SAVES if k != "stream"]


def _missing(why: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (.ci/run installs QEMU >= 9 with scripts/setup-qemu)", pytrace=False)
    pytest.skip(f"{why} (scripts/setup-qemu installs it, as root)")


@pytest.fixture(scope="module")
def qemu_files(tmp_path_factory):
    if QEMU is None or qemu_version(QEMU)[0] < 9:
        _missing("QEMU >= 9 (mapped-ram) is not installed")
    work = tmp_path_factory.mktemp("qemu-files")
    g = QemuGuest(QEMU, str(work), 64 * MiB, "pages=256 passes=1 hold")
    try:
        wait_text(g.console, "dirty: holding", timeout=60)
        ranges = [(int(a, 16), int(b, 16)) for a, b in
                  re.findall(r"dirty: range 0x([0-9a-f]+)-0x([0-9a-f]+)", g.console())]
        files = {}
        for name, (caps, params) in SAVES.items():
            g.qmp.cmd("stop")
            g.qmp.cmd("migrate-set-capabilities", capabilities=[
                {"capability": c, "state": caps.get(c, False)} for c in ("mapped-ram",
                                                                         "multifd")])
            g.qmp.cmd("migrate-set-parameters", **{"direct-io": False, **params})
            files[name] = work / f"{name}.qemu"
            g.qmp.cmd("migrate", uri=f"file:{files[name]}")
            g.qmp.wait_migration(timeout=60)
            g.qmp.cmd("cont")
    finally:
        g.close()
    return work, files, ranges


@pytest.fixture(scope="module")
def analyzed(qemu_files):
    """QEMU's analyze-migration.py -x of the stream save: {block name: its file}."""
    work, files, _ = qemu_files
    p = subprocess.run([str(ROOT / "scripts" / "qemu-analyze-migration")], capture_output=True,
                       text=True, timeout=600)
    if p.returncode != 0:
        _missing(f"QEMU's analyze-migration.py could not be had: {p.stderr.strip()}")
    out = work / "analyzed"
    out.mkdir()
    x = subprocess.run(["python3", p.stdout.strip(), "-x", "-f", str(files["stream"])],
                       cwd=out, capture_output=True, text=True, timeout=300)
    assert x.returncode == 0, x.stderr[-2000:]
    names = [ln for ln in x.stdout.splitlines() if ln not in ("desc.json", "state.json")]
    assert "pc.ram" in names and "pc.bios" in names, x.stdout
    return {n: out / n.lstrip("/") for n in names}


def test_inspect_recognises_each_qemu_save(qemu_files):
    _, files, _ = qemu_files
    seen = {}
    for name, path in files.items():
        p = cli("inspect", "--json", path)
        assert p.returncode == 0, p.stdout + p.stderr
        info = json.loads(p.stdout)
        assert info["valid"] and info["machine"].startswith("pc-")
        assert info["format"] == ("qemu stream" if name == "stream" else "qemu mapped-ram")
        assert ("mapped-ram" in info["capabilities"]) == (name != "stream")
        blocks = {b["name"]: b for b in info["blocks"]}
        assert blocks["pc.ram"]["size"] == 64 * MiB
        assert blocks["pc.ram"]["pages_present"] >= 256         # the guest's stamped pages
        if name != "stream":
            for b in info["blocks"]:
                assert b["pages_offset"] % MiB == 0 and b["bitmap_offset"] < b["pages_offset"]
        seen[name] = {n: (b["size"], b["pages_present"]) for n, b in blocks.items()}
        text = cli("inspect", path)
        assert text.returncode == 0 and "valid, complete QEMU migration file" in text.stdout
        assert "pc.ram" in text.stdout
    assert all(s == seen["stream"] for s in seen.values()), seen   # the same halted VM


@pytest.mark.parametrize("save", list(SAVES))
def test_export_ram_gives_the_bytes_qemus_own_script_gives(qemu_files, analyzed, save,
                                                           tmp_path):
    _, files, _ = qemu_files
    out = tmp_path / "blocks"
    p = cli("export-ram", files[save], "-o", out)
    assert p.returncode == 0, p.stderr
    written = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert written == sorted(n.lstrip("/") for n in analyzed)
    for name, theirs in analyzed.items():
        ours = out / name.lstrip("/")
        assert ours.read_bytes() == theirs.read_bytes(), name
    ram = out / "pc.ram"
    assert ram.stat().st_blocks * 512 < 8 * MiB       # sparse: 64 MiB, a few hundred pages


def test_exported_ram_holds_what_the_guest_wrote(qemu_files, tmp_path):
    _, files, ranges = qemu_files
    out = tmp_path / "pc.ram"
    p = cli("export-ram", files["mapped-ram+multifd"], "--block", "pc.ram", "-o", out)
    assert p.returncode == 0, p.stderr
    assert "pc.ram: 67108864 bytes" in p.stdout
    ram = np.fromfile(out, dtype=np.uint64).reshape(-1, PAGE // 8)
    n = 0
    for start, end in ranges:
        for a in range(start, end, PAGE):
            page = ram[a // PAGE]
            assert (int(page[0]), int(page[1]), int(page[511])) == (a, 1, a ^ 1 ^ SEED), hex(a)
            n += 1
    assert n == 256


def _sparse_head(src, dst, length: int) -> None:
    """dst = the first ``length`` bytes of src, its holes kept (mapped-ram files are
    mostly holes: copying them whole, many times, would be most of this test's time)."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        for start, end in data_extents(f.fileno(), 0, length):
            g.seek(start)
            g.write(os.pread(f.fileno(), end - start, start))
        g.truncate(length)


def test_damaged_or_truncated_qemu_files_are_refused_in_one_line(qemu_files, tmp_path):
    _, files, _ = qemu_files
    for name in ("stream", "mapped-ram"):
        size = files[name].stat().st_size
        for cut in [4, 9, 40, 0x70, 0x90, size // 2, size - 5000, size - 100, size - 1]:
            bad = tmp_path / f"{name}-{cut}.qemu"
            _sparse_head(files[name], bad, cut)
            info = describe(str(bad))
            assert not info["valid"] and info["verdict"] == "INVALID", (name, cut, info)
            with pytest.raises(SnapshotError):
                export_ram(str(bad), str(tmp_path / "out"))
            assert not (tmp_path / "out" / "pc.ram").exists()
            bad.unlink()
    data = bytearray(files["stream"].read_bytes())
    rng = np.random.default_rng(7)
    bad = tmp_path / "flipped.qemu"
    for i in range(40):                 # flipped bits in the stream's head: valid or refused
        raw = bytearray(data)
        at = int(rng.integers(8, 0x100))
        raw[at] ^= 1 << int(rng.integers(0, 8))
        bad.write_bytes(bytes(raw))
        info = describe(str(bad))
        assert info["valid"] or info["verdict"] == "INVALID", (at, info)
    # Through the command line: one line each, and nothing written.
    _sparse_head(files["mapped-ram"], bad, files["mapped-ram"].stat().st_size // 2)
    p = cli("inspect", bad)
    assert p.returncode == 1 and "INVALID" in p.stdout and "Traceback" not in p.stderr
    one_line_error(cli("export-ram", bad, "-o", tmp_path / "cli-out"), 2, "QEMU file")
    assert not (tmp_path / "cli-out" / "pc.ram").exists()
    one_line_error(cli("restore", files["mapped-ram"]), 2, "QEMU migration file")


def test_export_ram_refusals(qemu_files, tmp_path):
    _, files, _ = qemu_files
    one_line_error(cli("export-ram", files["mapped-ram"], "--block", "nope", "-o",
                       tmp_path / "x"), 2, "no RAM block 'nope'", "'pc.ram'")
    f = tmp_path / "file"
    f.write_text("keep me")
    one_line_error(cli("export-ram", files["mapped-ram"], "-o", f), 2, "not a directory")
    one_line_error(cli("export-ram", files["mapped-ram"], "--block", "pc.ram", "-o",
                       tmp_path), 2, "directory")
    assert f.read_text() == "keep me"
    one_line_error(cli("export-ram", tmp_path / "missing", "-o", tmp_path / "y"), 2)


def test_export_ram_of_a_kvmguest_snapshot_is_the_guests_memory(machine_factory, tmp_path):
    """Our own snapshots export the same way: two slots, each block its guest memory."""
    m = machine_factory(str(guest("dirty")), memory=RAM,
                        cmdline=dirty_cmdline(pages=300, passes=1) + " hold")
    m.start()
    wait_console(m, "dirty: holding")
    path = tmp_path / "g.snap"
    live_save(m, str(path), then="stop")
    out = tmp_path / "blocks"
    p = cli("export-ram", path, "-o", out)
    assert p.returncode == 0, p.stderr
    assert len(m.memory.regions) == 2 and len(p.stdout.splitlines()) == 2
    for region, line in zip(m.memory.regions, p.stdout.splitlines()):
        name = line.split(":")[0]
        # Each data extent is the guest's memory there; the rest (holes) reads as zeros,
        # as the guest's untouched memory does (reading all 3 GiB of it would be slow).
        assert (out / name).stat().st_size == region.size
        mem = region.pages().reshape(-1)
        covered = 0
        with open(out / name, "rb") as f:
            for start, end in data_extents(f.fileno(), 0, region.size):
                assert os.pread(f.fileno(), end - start, start) == mem[start:end].tobytes()
                covered += end - start
        assert covered >= (200 if region.slot else 100) * PAGE, (name, covered)  # its stamps
    one = tmp_path / "one"
    p = cli("export-ram", path, "--block", name, "-o", one)
    assert p.returncode == 0 and one.read_bytes() == (out / name).read_bytes()
