"""Hostile paths, modules and kernels given on the command line: each is refused in one
line before a guest boots, and nothing is read or held beyond what is needed."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, cli, guest, one_line_error
from kvmguest.arch.x86 import multiboot


@pytest.fixture(scope="module")
def smptest(kut_tree) -> Path:
    return Path(kut_tree) / "x86" / "smptest.flat"


def test_a_multiboot_kernel_whose_path_is_not_utf8_boots(tmp_path, smptest):
    """The path starts the command line a multiboot kernel sees; it was encoded as text
    (an internal error), now as the bytes it is."""
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/k\xff\xfe.flat"))
    shutil.copy(smptest, odd)
    p = subprocess.run([sys.executable, "-m", "kvmguest.cli", "run", os.fsencode(odd),
                        "--vcpus", "2", "--timeout", "60"], cwd=ROOT, capture_output=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert b"SUMMARY: " in p.stdout and b"internal error" not in p.stderr


def _peak_rss_mib(*args) -> tuple[subprocess.CompletedProcess, float]:
    p = subprocess.Popen([sys.executable, "-m", "kvmguest.cli", *map(str, args)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.stdout.read(), p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.stdout.close()
    p.stderr.close()
    return (subprocess.CompletedProcess(p.args, os.waitstatus_to_exitcode(status), out, err),
            usage.ru_maxrss / 1024)


def test_a_module_is_checked_against_ram_before_it_is_read_and_read_once(tmp_path, smptest):
    """400 MiB (sparse) with 64 MiB of RAM: refused before a byte is read (it took 428 MB);
    with 1 GiB it lands in guest RAM without a second copy in the VMM (it took 840 MB)."""
    big = tmp_path / "big.mod"
    with open(big, "wb") as f:
        f.truncate(400 << 20)
    # The same process refused for another reason before boot: what it costs anyway.
    p, base = _peak_rss_mib("run", smptest, "--memory", "64M", "--cpu", "Opteron_G1")
    one_line_error(p, 2, "'Opteron_G1' is not modelled")
    p, rss = _peak_rss_mib("run", smptest, "--initrd", big, "--memory", "64M")
    one_line_error(p, 2, "give the guest more memory")
    assert rss < base + 40, (rss, base)
    p, rss = _peak_rss_mib("run", smptest, "--vcpus", "2", "--initrd", big, "--memory", "1G",
                           "--timeout", "60")
    assert p.returncode == 0 and "SUMMARY" in p.stdout, p.stderr[-2000:]
    assert rss < base + 400 + 100, \
        f"peak {rss:.0f} MiB for a 400 MiB module (baseline {base:.0f}): held twice?"


def test_special_and_empty_modules_are_refused(tmp_path, smptest):
    one_line_error(cli("run", smptest, "--initrd", "/proc/self/mem"), 2,
                   "/proc/self/mem is empty (or a special file")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    one_line_error(cli("run", smptest, "--initrd", empty), 2, "is empty")


def _image(tmp_path, load_addr: int, load_end: int, entry: int) -> Path:
    """A multiboot image that is not ELF (flag 16: the header gives the addresses)."""
    flags = 0x10000 | 0x2
    header_addr = load_addr
    raw = bytearray(8192)
    struct.pack_into("<IIIIIIII", raw, 0, multiboot.HEADER_MAGIC, flags,
                     -(multiboot.HEADER_MAGIC + flags) & 0xFFFFFFFF, header_addr, load_addr,
                     load_end, 0, entry)
    path = tmp_path / f"mb-{load_addr:x}-{load_end:x}.bin"
    path.write_bytes(bytes(raw))
    return path


def test_multiboot_addresses_in_the_bios_area_or_backwards_are_refused(tmp_path):
    one_line_error(cli("run", _image(tmp_path, 0xE0000, 0, 0xE0040)), 2,
                   "overlaps the legacy BIOS area [0xa0000, 0x100000)")
    one_line_error(cli("run", _image(tmp_path, 0x200000, 0x100000, 0x200040)), 2,
                   "load_end_addr 0x100000 is below load_addr 0x200000")
    one_line_error(cli("run", _image(tmp_path, 0x200000, 0x900000, 0x200040)), 2,
                   "load_end_addr 0x900000 runs past the file")


def test_a_checkpoint_path_that_cannot_take_files_is_refused_before_boot():
    for target, fragment in (("/proc/version", "cannot create a checkpoint in /proc"),
                             ("", "the checkpoint path is empty")):
        p = cli("run", guest("dirty"), "--checkpoint", target, "--every", "200ms",
                "--timeout", "30")
        one_line_error(p, 2, fragment)
        assert p.stdout == ""                     # the guest never booted
    one_line_error(cli("run", guest("dirty"), "--save", "/proc/version", "--save-after", "1"),
                   2, "cannot create a snapshot in /proc")
