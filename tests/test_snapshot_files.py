"""Snapshot files as input: whatever run accepts, restore accepts (and nothing beyond),
damaged stream files and misordered blocks are one-line errors, and a lazily restored
guest survives its file being truncated or overwritten."""

from __future__ import annotations

import os
import signal

import pytest

from helpers import (GiB, MiB, RAM, Running, assert_alive_and_clean, cli, dirty_cmdline,
                     guest, one_line_error, restore_runs_on, rss_bytes, run_dirty,
                     patched_copy)
from migrate import format as fmt
from migrate.format import SnapshotError
from migrate.reader import restore
from migrate.writer import MappedWriter


# --- whatever run accepts, restore accepts ---------------------------------------------
@pytest.mark.slow
def test_a_guest_with_more_ram_than_the_host_saves_and_restores_eager_and_lazy(tmp_path):
    path = tmp_path / "big.snap"
    p = cli(*run_dirty("--save", path, "--save-after", "0.3", "-q", memory="64G"))
    assert p.returncode == 0, p.stderr
    for lazy in ([], ["--lazy"]):
        restore_runs_on(path, *lazy)


def test_a_snapshot_beyond_what_run_accepts_is_refused_before_allocating(tmp_path,
                                                                        monkeypatch):
    class Spec:                                 # the writer only needs the block list here
        def __init__(self, slot, gpa, size, name):
            self.slot, self.gpa, self.size, self.name = slot, gpa, size, name
            self.npages = size // 4096

    class Plan:
        regions = [Spec(0, 0, 3 * GiB, "ram-low"), Spec(1, 4 * GiB, 6 * GiB, "ram-high")]
        saved_regions = regions               # no device memory

    path = tmp_path / "huge.snap"
    w = MappedWriter(str(path), Plan)
    w.finish({"format": "kvmguest-state", "version": 1})
    # A host whose guest-physical space is 8 GiB: this 9 GiB guest (ending at 10 GiB)
    # could not boot here, so it is not restored here either.
    import kvmguest.memory
    monkeypatch.setattr(kvmguest.memory, "host_phys_bits", lambda: 33)
    rss = rss_bytes()
    for lazy in (False, True):
        with pytest.raises(SnapshotError, match="cannot be restored on this host: .*address "
                                                "space"):
            restore(str(path), lazy=lazy)
    assert rss_bytes() - rss < 16 * MiB
    p = cli("run", guest("hello"), "--memory", "16T")            # run says the same
    one_line_error(p, 2, "per memory slot")


# --- stream files and block order (also in test_fuzz.py) -------------------------------
@pytest.mark.parametrize("damage", ["header-only", "state-list", "truncated-state"])
def test_damaged_stream_snapshots_are_one_line_errors(tmp_path, damage):
    path = tmp_path / "s.stream"
    p = cli(*run_dirty("--save", path, "--save-after", "0.3", "--format", "stream", "-q"))
    assert p.returncode == 0, p.stderr
    data = path.read_bytes()
    if damage == "header-only":
        data = data[:64]
    elif damage == "truncated-state":
        data = data[:-100]
    else:
        import struct
        import zlib
        at = data.rindex(b'{"devices"') - 28      # the state record's header
        body = b"[]"
        data = data[:at] + struct.pack("<IIQ", 3, 0, 0) + struct.pack(
            "<QI", len(body), zlib.crc32(body)) + body + struct.pack("<IIQ", 4, 0, 0)
    path.write_bytes(data)
    for command in (("restore", path), ("inspect", path)):
        r = cli(*command)
        assert "Traceback" not in r.stderr and r.returncode in (1, 2), r.stderr
        if command[0] == "restore":
            one_line_error(r, 2)
            assert r.stdout == ""


def test_blocks_out_of_guest_physical_order_are_refused(snapshot, tmp_path):
    import struct

    def swap(data):
        t, e = fmt.HEADER_SIZE, fmt.BLOCK_ENTRY_SIZE
        data[t:t + 2 * e] = data[t + e:t + 2 * e] + data[t:t + e]
        struct.pack_into("<I", data, fmt.HEADER.offsets["table_crc"],
                         fmt.crc(bytes(data[t:t + 2 * e])))
        h = fmt.HEADER.offsets["header_crc"]
        struct.pack_into("<I", data, h, fmt.crc(bytes(data[:h])))

    path = tmp_path / "swapped.snap"
    patched_copy(snapshot, path, swap)
    one_line_error(cli("restore", path), 2, "ascending guest-physical order")


# --- lazy restore and a snapshot that changes under it ----------------------------------
@pytest.mark.parametrize("change", ["truncate", "overwrite"])
def test_lazy_restore_survives_the_snapshot_being_truncated_or_overwritten(tmp_path, change):
    path = tmp_path / "g.snap"
    p = cli("run", guest("dirty"), "--memory", f"{RAM >> 20}M", "--cmdline",
            dirty_cmdline(pages=900), "--save", path, "--save-after", "0.3", "-q")
    assert p.returncode == 0, p.stderr
    r = Running("restore", path, "--lazy").until("dirty: pass")
    if change == "truncate":
        os.truncate(path, 4096)                    # waits for the guest to let go
    else:
        with open(path, "r+b") as f:           # the open waits for the guest to let go
            f.seek(fmt.read_snapshot(str(path)).layout.blocks[0].pages_offset)
            f.write(b"\xee" * (8 << 20))
    rc, out, err = r.passes(2).stop()              # it verified on after the change
    assert rc == 128 + signal.SIGTERM, err         # ended by the test, not by SIGBUS
    assert_alive_and_clean(out)
    assert "Traceback" not in err
