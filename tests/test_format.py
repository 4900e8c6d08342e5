"""The snapshot format without KVM: layout rules, round trip, and refusal of damaged files."""

import os
import re
import struct
import subprocess

import numpy as np
import pytest

from kvmguest.memory import GuestMemory, Region, RegionSpec
from kvmguest.arch.x86.layout import plan_regions
from migrate import format as fmt
from migrate.formats import checkpoint as ckfmt
from migrate.format import SnapshotError, read_snapshot
from migrate.errors import SaveError
from migrate.writer import MappedWriter

MiB = 1 << 20
STATE = {"format": "kvmguest-state", "version": 1, "note": "synthetic"}


def two_slots(low=8 * MiB, high=8 * MiB) -> GuestMemory:
    return GuestMemory([Region(RegionSpec(0, 0, low, "ram-low")),
                        Region(RegionSpec(1, 4 << 30, high, "ram-high"))])


def make_snapshot(tmp_path, name="s.snap", fill=True):
    mem = two_slots()
    low, high = mem.regions
    if fill:
        low.array[5 * 4096:7 * 4096] = 0xAB          # pages 5, 6
        low.array[-4096:] = 0x11                     # last page of slot 0
        high.array[0:4096] = 0x22                    # first page of slot 1
    path = tmp_path / name
    w = MappedWriter(str(path), mem)
    w.write_pass(None)
    w.finish(STATE)
    return path, mem


def test_layout_puts_page_areas_on_1mib_and_sections_on_4kib():
    layout = fmt.plan([("ram-low", 0, 3 << 30, 0), ("ram-high", 4 << 30, 5 * MiB, 1)])
    for b in layout.blocks:
        assert b.pages_offset % MiB == 0
        assert b.bitmap_offset % 4096 == 0
        assert b.page_offset(3) == b.pages_offset + 3 * 4096
    a, b = layout.blocks
    assert b.pages_offset >= a.pages_offset + a.size
    assert layout.state_offset % 4096 == 0 and layout.state_offset >= b.pages_offset + b.size


def test_round_trip_keeps_pages_bitmap_and_state(tmp_path):
    path, mem = make_snapshot(tmp_path)
    snap = read_snapshot(str(path))
    assert snap.state == STATE
    low, high = snap.present
    assert np.flatnonzero(low).tolist() == [5, 6, mem.regions[0].npages - 1]
    assert [b.gpa for b in snap.layout.blocks] == [0, 4 << 30]
    assert np.flatnonzero(high).tolist() == [0]
    data = path.read_bytes()
    b0 = snap.layout.blocks[0]
    assert data[b0.page_offset(5):b0.page_offset(7)] == b"\xab" * 8192
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_file_size_is_ram_plus_bounded_metadata_and_zero_pages_are_holes(tmp_path):
    path, mem = make_snapshot(tmp_path)
    st = os.stat(path)
    snap = read_snapshot(str(path))
    assert mem.size < st.st_size <= fmt.documented_bound(mem.size, 2, snap.state_length)
    assert st.st_blocks * 512 < 4 * MiB        # 4 data pages + metadata, the rest holes


def corrupt(path, offset, xor=0x01):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ xor]))


def test_each_damaged_section_is_named(tmp_path):
    path, _ = make_snapshot(tmp_path)
    snap = read_snapshot(str(path))
    b0 = snap.layout.blocks[0]
    cases = {
        0: "bad magic",
        12: "incomplete",                          # COMPLETE flag cleared
        20: "header checksum",
        4096 + 3: "block table checksum",
        b0.bitmap_offset: "bitmap of 'ram-low': checksum",
        snap.layout.state_offset + 2: "state checksum",
    }
    for offset, message in cases.items():
        p = tmp_path / f"c{offset}.snap"
        p.write_bytes(path.read_bytes())
        corrupt(p, offset)
        with pytest.raises(SnapshotError, match=message):
            read_snapshot(str(p))


@pytest.mark.parametrize("cut", [0, 100, 4096, 4200, 2 << 20, -1])
def test_truncated_file_is_refused(tmp_path, cut):
    path, _ = make_snapshot(tmp_path)
    size = os.path.getsize(path)
    os.truncate(path, cut if cut >= 0 else size - 1)
    with pytest.raises(SnapshotError, match="truncated|shorter than|runs past"):
        read_snapshot(str(path))


def test_save_in_progress_is_marked_and_not_restorable(tmp_path):
    mem = GuestMemory.anonymous(plan_regions(8 * MiB))
    w = MappedWriter(str(tmp_path / "x.snap"), mem)
    w.write_pass(None)
    with pytest.raises(SnapshotError, match="incomplete"):
        read_snapshot(w.tmp)
    w.abort()
    assert not os.path.exists(w.tmp) and not (tmp_path / "x.snap").exists()


def test_bits_past_the_last_page_are_refused(tmp_path):
    # 8 MiB + 4 KiB: 2049 pages, so the bitmap's last byte has 7 unused bits.
    mem = GuestMemory.anonymous(plan_regions(8 * MiB + 4096))
    mem.regions[0].array[:4096] = 7
    path = tmp_path / "odd.snap"
    w = MappedWriter(str(path), mem)
    w.write_pass(None)
    w.finish(STATE)
    snap = read_snapshot(str(path))
    b = snap.layout.blocks[0]
    data = bytearray(path.read_bytes())
    data[b.bitmap_offset + 2049 // 8] |= 0x80
    # Re-seal the bitmap CRC, table CRC and header CRC so only the semantic check fires.
    bm = bytes(data[b.bitmap_offset:b.bitmap_offset + b.bitmap_length])
    struct.pack_into("<I", data, 4096 + 96, fmt.crc(bm))
    table = bytes(data[4096:4096 + 128])
    struct.pack_into("<I", data, 64, fmt.crc(table))
    struct.pack_into("<I", data, 124, fmt.crc(bytes(data[:124])))
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="bits set past its last page"):
        read_snapshot(str(path))


def test_previous_snapshot_survives_an_aborted_save(tmp_path):
    path, mem = make_snapshot(tmp_path)
    before = path.read_bytes()
    w = MappedWriter(str(path), mem)
    w.write_pass(None)
    w.abort()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.snap"]


@pytest.fixture
def ramfs(tmp_path):
    """A ramfs mount: a filesystem that refuses O_DIRECT (tmpfs accepts it since 6.6)."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI runs as root and must run this test")
        pytest.skip("mounting ramfs needs root")
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_direct_io_on_a_filesystem_without_it_is_a_clear_error(ramfs):
    mem = GuestMemory.anonymous(plan_regions(8 * MiB))
    with pytest.raises(SaveError, match="does not support O_DIRECT"):
        MappedWriter(str(ramfs / "x.snap"), mem, direct=True)
    assert list(ramfs.iterdir()) == []


def test_untouched_anonymous_pages_are_known_zero_without_reading_them():
    mem = GuestMemory.anonymous(plan_regions(64 * MiB))
    r = mem.regions[0]
    r.array[10 * 4096] = 1
    maybe = r.maybe_nonzero()
    # The touched page, at most its 2 MiB huge page, and nothing else.
    assert maybe[10] and maybe.sum() <= 512 and not maybe[-1]


def _doc_table(heading: str) -> list[tuple[int, str, str]]:
    """(offset, type, field) rows of the table under ``heading`` in docs/FORMAT.md."""
    from helpers import ROOT
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    section = re.split(r"\n#{2,} ", text.split(heading, 1)[1], maxsplit=1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            rows.append((int(cells[0]), cells[1], cells[2]))
    return rows


@pytest.mark.parametrize("heading,record", [
    ("## Header", fmt.HEADER), ("## Block table entry", fmt.BLOCK),
    ("### Checkpoint superblock", ckfmt.SUPER), ("### Checkpoint record", ckfmt.RECORD)])
def test_format_doc_tables_match_the_field_tables(heading, record):
    want = [(record.offsets[f.name], f.doc_type, f.name) for f in record.fields]
    assert _doc_table(heading) == want
