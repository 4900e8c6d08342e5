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
from kvmguest.arch.x86 import linux, multiboot
from kvmguest.arch.x86.kernel import BootError


@pytest.fixture(scope="module")
def smptest(kut_tree) -> Path:
    return Path(kut_tree) / "x86" / "smptest.flat"


def test_a_multiboot_kernel_whose_path_is_not_utf8_boots(tmp_path, smptest):
    """The path starts the command line a multiboot kernel sees; it was encoded as text
    (an internal error), now as the bytes it is."""
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/k\xff\xfe.flat"))
    shutil.copy(smptest, odd)
    p = subprocess.run([sys.executable, "-m", "kvmguest", "run", os.fsencode(odd),
                        "--vcpus", "2", "--timeout", "60"], cwd=ROOT, capture_output=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert b"SUMMARY: " in p.stdout and b"internal error" not in p.stderr


def _peak_rss_mib(*args) -> tuple[subprocess.CompletedProcess, float]:
    p = subprocess.Popen([sys.executable, "-m", "kvmguest", *map(str, args)], cwd=ROOT,
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


def _pvh_elf(path: Path, loads: list[tuple[int, int, int]], size: int) -> Path:
    """An ELF64 with a PVH note and ``loads`` (paddr, file offset, bytes) as PT_LOAD
    segments over a sparse file of ``size`` bytes: headers only, the rest zeros."""
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x100000)
    phdrs = [(4, 0, 0xF00, 0, 0, len(note), len(note))]           # PT_NOTE
    phdrs += [(1, 7, off, paddr, paddr, n, n) for paddr, off, n in loads]
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1,
                       0x100000, 64, 0, 0, 64, 56, len(phdrs), 0, 0, 0)
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(ehdr + b"".join(struct.pack("<IIQQQQQQ", *p, 0x1000) for p in phdrs))
        f.seek(0xF00)
        f.write(note)
    return path


def test_elf_segments_are_checked_before_a_byte_of_them_is_read(tmp_path):
    """40 PT_LOAD headers over one 64 MiB area of the file took 2.77 GB before a refusal;
    now the headers are checked first (overlaps, RAM) and nothing more is read."""
    area = 64 << 20
    p, base = _peak_rss_mib("run", guest("hello"), "--cpu", "Opteron_G1")
    one_line_error(p, 2, "'Opteron_G1' is not modelled")
    spread = _pvh_elf(tmp_path / "spread.elf",
                      [(0x100000 + i * area, 0x1000, area) for i in range(40)], 0x1000 + area)
    p, rss = _peak_rss_mib("run", spread, "--memory", "512M")
    one_line_error(p, 2, "is outside guest RAM (512 MiB)")
    assert rss < base + 20, (rss, base)
    stacked = _pvh_elf(tmp_path / "stacked.elf", [(0x100000, 0x1000, area)] * 40, 0x1000 + area)
    p, rss = _peak_rss_mib("run", stacked, "--memory", "512M")
    one_line_error(p, 2, "overlap")
    assert rss < base + 20, (rss, base)


def _bzimage(path: Path, kind: str, content: bytes, claimed: int) -> Path:
    """A bzImage whose payload is ``content`` compressed as ``kind``, its trailer
    claiming ``claimed`` bytes."""
    import bz2
    import gzip
    import lzma
    packed = {"gzip": lambda d: gzip.compress(d, 1),
              "xz": lambda d: lzma.compress(d, lzma.FORMAT_XZ, preset=0),
              "lzma": lambda d: lzma.compress(d, lzma.FORMAT_ALONE, preset=0),
              "bzip2": lambda d: bz2.compress(d, 1)}[kind](content)
    setup = bytearray(5 * 512)                 # setup_sects 4
    setup[linux.SETUP_HEADER] = 4
    struct.pack_into("<H", setup, linux.BOOT_FLAG_AT, linux.BOOT_FLAG)
    setup[linux.HDRS_AT:linux.HDRS_AT + 4] = linux.HDRS
    struct.pack_into("<H", setup, linux.VERSION_AT, 0x20F)
    payload = packed + struct.pack("<I", claimed)
    struct.pack_into("<II", setup, linux.PAYLOAD_AT, 16, len(payload))   # after 16 bytes of
    path.write_bytes(bytes(setup) + bytes(16) + payload)                 # "decompressor"
    return path


@pytest.mark.parametrize("kind", ["gzip", "xz", "lzma", "bzip2"])
def test_a_decompression_bomb_costs_its_claimed_size_plus_a_chunk_at_most(tmp_path, kind):
    """A payload that inflates past what its trailer says is cut off there: peak memory is
    the claimed size plus one chunk (it was twice the 512 MiB cap)."""
    import tracemalloc
    bomb = _bzimage(tmp_path / "bomb", kind, bytes(64 << 20), 8 << 20)
    raw = bomb.read_bytes()
    tracemalloc.start()
    try:
        with pytest.raises(BootError, match="decompresses past 8388608 bytes, where its "
                                            "trailer says 8388608"):
            linux.vmlinux_from_bzimage(str(bomb), raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (8 << 20) + (4 << 20), peak      # the whole bomb inflates to 64 MiB


def test_a_payload_claiming_more_than_the_cap_is_refused_before_decompressing(tmp_path):
    p, base = _peak_rss_mib("run", guest("hello"), "--cpu", "Opteron_G1")
    one_line_error(p, 2, "'Opteron_G1' is not modelled")
    bomb = _bzimage(tmp_path / "claims", "gzip", bytes(1 << 20), 600 << 20)
    p, rss = _peak_rss_mib("run", bomb)
    one_line_error(p, 2, "says it decompresses to 600 MiB (limit 512 MiB)")
    assert rss < base + 20, (rss, base)
