"""Hostile files and paths: whatever a file declares, `inspect`, `export-ram` and
`restore` use memory and disk in proportion to what it holds, answer in one line, and
write nothing outside where they were told (docs/guarantees.md, "Against hostile input")."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

from helpers import MiB, ROOT, cli, one_line_error
from qemu_files import qemu_file

GiB, TiB = 1 << 30, 1 << 40


def baseline_mib(tmp_path, *command) -> float:
    """Peak RSS of the same command on a small QEMU file (1 MiB of RAM): what the
    process costs when the file declares nothing large."""
    small = tmp_path / "small.qemu"
    qemu_file(small, [("pc.ram", MiB)], pages=[("pc.ram", 7, b"seven")])
    args = [a if a != "FILE" else small for a in command]
    if "-o" in args:
        args[args.index("-o") + 1] = tmp_path / "small-out"
    return run_alone(*args)[1]


SLACK = 40          # MiB over the small file's baseline: noise, never the declared size


def test_a_qemu_stream_declaring_a_huge_block_costs_memory_for_its_records_only(tmp_path):
    """A 1 TiB block (and 64 GiB of 512-byte pages) with three page records: inspect and
    export take no more memory than for a small file (each took 1.2-2.4 GB before)."""
    inspect_base = baseline_mib(tmp_path, "inspect", "FILE")
    export_base = baseline_mib(tmp_path, "export-ram", "FILE", "-o", "OUT")
    for size, bits in ((TiB, 12), (64 * GiB, 9)):
        path = tmp_path / f"huge-{bits}.qemu"
        qemu_file(path, [("pc.ram", size)], page_bits=bits,
                  pages=[("pc.ram", 7, b"seven"), ("pc.ram", 9, None), ("pc.ram", 7, b"7")])
        assert path.stat().st_size < 10_000
        p, rss = run_alone("inspect", path)
        assert p.returncode == 0 and "1/" in p.stdout, p.stdout + p.stderr
        assert rss < inspect_base + SLACK, \
            f"inspect of a {size >> 30} GiB declaration peaked at {rss:.0f} MiB " \
            f"(a small file: {inspect_base:.0f} MiB)"
        p, rss = run_alone("export-ram", path, "-o", tmp_path / f"out-{bits}")
        assert p.returncode == 0 and "1 pages of data" in p.stdout, p.stderr
        assert rss < export_base + SLACK, \
            f"export of a {size >> 30} GiB declaration peaked at {rss:.0f} MiB " \
            f"(a small file: {export_base:.0f} MiB)"
        ram = tmp_path / f"out-{bits}" / "pc.ram"
        assert ram.stat().st_size == size and ram.stat().st_blocks * 512 <= 64 * 1024
        with open(ram, "rb") as f:
            f.seek(7 << bits)
            assert f.read(2) == b"7\0"           # the last record of page 7 wins


def run_alone(*args) -> tuple[subprocess.CompletedProcess, float]:
    """`kvmguest ARGS` and its own peak RSS in MiB, from wait4 on that child alone."""
    p = subprocess.Popen([sys.executable, "-m", "kvmguest", *map(str, args)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.stdout.read(), p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stdout.close()
    p.stderr.close()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), usage.ru_maxrss / 1024


def test_a_mapped_ram_file_marking_every_page_present_exports_sparse(tmp_path):
    """A 40 KB (on disk) mapped-ram file whose bitmap marks all of 1 GiB present, its
    page area a hole: the export is sparse, not 1 GiB of allocated zeros; and a 1 TiB
    sparse one is read a bitmap chunk at a time."""
    path = tmp_path / "all-present.qemu"
    qemu_file(path, [("pc.ram", GiB)], mapped_bitmaps=[b"\xff" * (GiB // 4096 // 8)])
    assert path.stat().st_blocks * 512 < 100 * 1024
    p = cli("export-ram", path, "-o", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    ram = tmp_path / "out" / "pc.ram"
    assert ram.stat().st_size == GiB and ram.stat().st_blocks == 0
    huge = tmp_path / "huge.qemu"
    qemu_file(huge, [("pc.ram", TiB)], mapped_bitmaps=[b"\x05"])
    p, rss = run_alone("inspect", huge)
    assert p.returncode == 0 and "2/268435456 pages present" in p.stdout, p.stdout + p.stderr
    base = baseline_mib(tmp_path, "inspect", "FILE")
    assert rss < base + SLACK, (rss, base)


def _two_blocks(path, second: str, first: str = "pc.ram") -> None:
    qemu_file(path, [(first, 1 << 20), (second, 1 << 20)],
              pages=[(first, 0, b"first"), (second, 0, b"second")])


def test_export_ram_never_writes_through_a_link_inside_the_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside, out / "sub")
    path = tmp_path / "f.qemu"
    _two_blocks(path, "sub/victim")
    one_line_error(cli("export-ram", path, "-o", out), 2, "sub", "symbolic link")
    assert victim.read_text() == "keep me"
    assert sorted(os.listdir(out)) == ["sub"] and sorted(os.listdir(outside)) == ["victim"]


def test_export_ram_refuses_block_names_that_are_not_file_names(tmp_path):
    for i, name in enumerate(["bad\x1b[2Jname", "new\nline", "a/../../x", "tab\there"]):
        path = tmp_path / f"f{i}.qemu"
        _two_blocks(path, name)
        p = cli("export-ram", path, "-o", tmp_path / "out")
        one_line_error(p, 2, "not a safe file name")
        assert "\x1b" not in p.stderr
        assert not (tmp_path / "out").exists()


def test_a_failed_export_leaves_nothing_at_out(tmp_path):
    """A block that is also another's folder is refused before anything is written; a
    write that fails midway (files may not grow past 1 MiB) removes all it made."""
    path = tmp_path / "clash.qemu"
    _two_blocks(path, "a/b", first="a")
    one_line_error(cli("export-ram", path, "-o", tmp_path / "out"), 2, "both a file and a folder")
    assert not (tmp_path / "out").exists()
    big = tmp_path / "big.qemu"
    qemu_file(big, [("small", 1 << 16), ("dir/large", 4 << 20)],
              pages=[("small", 0, b"x"), ("dir/large", 600, b"y")])

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, MiB))
    for out in (tmp_path / "new", tmp_path / "existing"):
        if out.name == "existing":
            out.mkdir()
            (out / "keep").write_text("mine")
        p = subprocess.run([sys.executable, "-m", "kvmguest", "export-ram", big, "-o", out],
                           cwd=ROOT, capture_output=True, text=True, preexec_fn=small_files)
        one_line_error(p, 1, "exporting RAM to")
        assert not out.exists() if out.name == "new" else os.listdir(out) == ["keep"]
