"""Hostile and corrupt snapshots, generated with hypothesis: every mutation of a valid
snapshot either still validates or ends in SnapshotError with a one-line message, never
another exception, a hang, or memory beyond a small multiple of the file's size.

`make fuzz` runs many more examples (KVMGUEST_FUZZ_EXAMPLES)."""

import json
import os
import struct
import time
import tracemalloc
import zlib

import numpy as np

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import guest
from kvmguest.memory import GuestMemory, Region, RegionSpec
from migrate import format as fmt
from migrate.format import SnapshotError
from migrate.reader import validate
from migrate.writer import MappedWriter

MiB = 1 << 20
EXAMPLES = int(os.environ.get("KVMGUEST_FUZZ_EXAMPLES", "300"))

def _fields(record) -> dict:
    """name: (offset, struct format) of every integer field but the checksums, from the
    format's own field table (migrate.format.HEADER / BLOCK)."""
    return {f.name: (record.offsets[f.name], record.code(f.name)) for f in record.fields
            if f.code in ("I", "Q") and not f.name.endswith("crc")}


HEADER_FIELDS = _fields(fmt.HEADER)
BLOCK_FIELDS = _fields(fmt.BLOCK)
TABLE = fmt.HEADER_SIZE
ENTRY = fmt.BLOCK_ENTRY_SIZE
INTERESTING = [0, 1, 7, 4095, 4096, 4097, MiB, 2 * MiB, 3 * MiB, 1 << 31, (1 << 32) - 1,
               1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid two-block snapshot with a real vCPU state: (bytes, parsed snapshot)."""
    from kvmguest import Machine
    from kvmguest.state import save_machine
    m = Machine(str(guest("hello")))
    try:
        state = save_machine(m)              # never run: a valid start state
    finally:
        m.close()
    mem = GuestMemory([Region(RegionSpec(0, 0, 2 * MiB, "ram-low")),
                       Region(RegionSpec(1, 4 << 30, 2 * MiB, "ram-high"))])
    for r in mem.regions:
        r.array[::4096 * 3] = 0x5A           # every third page non-zero
    path = tmp_path_factory.mktemp("fuzz") / "base.snap"
    w = MappedWriter(str(path), mem)
    w.write_pass(None)
    w.finish(state)
    mem.close()
    return path.read_bytes(), fmt.read_snapshot(str(path))


def reseal(data: bytearray, snap) -> None:
    """Recompute every checksum over the original section positions, so that mutated
    fields reach the checks behind the checksums."""
    h, b_ = fmt.HEADER.offsets, fmt.BLOCK.offsets
    for i, b in enumerate(snap.layout.blocks):
        bm = bytes(data[b.bitmap_offset:b.bitmap_offset + b.bitmap_length])
        struct.pack_into("<I", data, TABLE + i * ENTRY + b_["bitmap_crc"], fmt.crc(bm))
    table = bytes(data[TABLE:TABLE + ENTRY * len(snap.layout.blocks)])
    struct.pack_into("<I", data, h["table_crc"], fmt.crc(table))
    so, sl = snap.layout.state_offset, snap.state_length
    struct.pack_into("<I", data, h["state_crc"], fmt.crc(bytes(data[so:so + sl])))
    struct.pack_into("<I", data, h["header_crc"], fmt.crc(bytes(data[:h["header_crc"]])))


def replace_state(data: bytearray, snap, state_bytes: bytes) -> bytearray:
    so = snap.layout.state_offset
    out = bytearray(data[:so]) + state_bytes
    out += b"\0" * (fmt.align(len(out), 4096) - len(out))
    h = fmt.HEADER.offsets
    struct.pack_into("<Q", out, h["state_length"], len(state_bytes))
    struct.pack_into("<Q", out, h["file_size"], len(out))
    struct.pack_into("<I", out, h["state_crc"], fmt.crc(state_bytes))
    struct.pack_into("<I", out, h["header_crc"], fmt.crc(bytes(out[:h["header_crc"]])))
    return out


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                     children, max_size=4),
    max_leaves=12)

mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.sampled_from(["header", "table", "bitmap", "state", "any"]),
              st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("header"), st.sampled_from(sorted(HEADER_FIELDS)),
              st.sampled_from(INTERESTING) | st.integers(0, (1 << 64) - 1), st.booleans()),
    st.tuples(st.just("block"), st.integers(0, 1), st.sampled_from(sorted(BLOCK_FIELDS)),
              st.sampled_from(INTERESTING) | st.integers(0, (1 << 64) - 1), st.booleans()),
    st.tuples(st.just("state-json"), json_values),
    st.tuples(st.just("state-field"), st.sampled_from(
        ["cpuid", "mp_state", "regs", "sregs", "xsave", "xcrs", "debugregs", "msrs",
         "vcpu_events", "vcpus", "devices", "format", "version"]), json_values),
    st.tuples(st.just("bitmap-bits"), st.integers(0, 1), st.integers(0, 4095)),
    st.tuples(st.just("overlap"), st.sampled_from(["pages", "bitmap", "state", "table"])),
    st.tuples(st.just("swap-blocks")),
)


def mutate(data: bytes, snap, m) -> bytes:
    out = bytearray(data)
    kind = m[0]
    if kind == "truncate":
        return bytes(out[:int(m[1] * len(out))])
    if kind == "flip":
        _, section, where, bit = m
        b0 = snap.layout.blocks[0]
        lo, hi = {"header": (0, fmt.HEADER.size), "table": (TABLE, TABLE + 2 * ENTRY),
                  "bitmap": (b0.bitmap_offset, b0.bitmap_offset + b0.bitmap_length),
                  "state": (snap.layout.state_offset,
                            snap.layout.state_offset + snap.state_length),
                  "any": (0, len(out))}[section]
        out[lo + int(where * (hi - lo))] ^= 1 << bit
        return bytes(out)
    if kind == "header":
        _, name, value, seal = m
        off, f = HEADER_FIELDS[name]
        struct.pack_into(f, out, off, value & ((1 << (8 * struct.calcsize(f))) - 1))
        if seal:
            reseal(out, snap)
        return bytes(out)
    if kind == "block":
        _, i, name, value, seal = m
        off, f = BLOCK_FIELDS[name]
        struct.pack_into(f, out, TABLE + i * ENTRY + off,
                         value & ((1 << (8 * struct.calcsize(f))) - 1))
        if seal:
            reseal(out, snap)
        return bytes(out)
    state = json.loads(json.dumps(snap.state))
    if kind == "state-json":
        return bytes(replace_state(out, snap, json.dumps(m[1]).encode()))
    if kind == "state-field":
        _, name, value = m
        target = state if name in ("vcpus", "devices", "format", "version") else state["vcpus"][0]
        target[name] = value
        return bytes(replace_state(out, snap, json.dumps(state).encode()))
    if kind == "bitmap-bits":
        _, i, bit = m
        b = snap.layout.blocks[i]
        byte = b.bitmap_offset + (b.npages + bit) // 8
        if byte < b.bitmap_offset + b.bitmap_length:
            out[byte] |= 1 << ((b.npages + bit) % 8)
        else:
            out[b.bitmap_offset] ^= 1
        reseal(out, snap)
        return bytes(out)
    if kind == "overlap":
        b0, b1 = snap.layout.blocks
        field = {"pages": ("pages_offset", b0.pages_offset),
                 "bitmap": ("bitmap_offset", b0.bitmap_offset),
                 "state": ("pages_offset", fmt.align(snap.layout.state_offset, MiB) - MiB),
                 "table": ("bitmap_offset", 4096)}[m[1]]
        off, f = BLOCK_FIELDS[field[0]]
        struct.pack_into(f, out, TABLE + ENTRY + off, field[1])
        reseal(out, snap)
        return bytes(out)
    if kind == "swap-blocks":           # the table out of gpa order: must be refused
        a, b = bytes(out[TABLE:TABLE + ENTRY]), bytes(out[TABLE + ENTRY:TABLE + 2 * ENTRY])
        out[TABLE:TABLE + 2 * ENTRY] = b + a
        reseal(out, snap)
        return bytes(out)
    raise AssertionError(kind)


def check(tmp_path, base, m):
    data, snap = base
    path = tmp_path / "case.snap"
    bad = mutate(data, snap, m)
    path.write_bytes(bad)
    tracemalloc.start()
    t = time.monotonic()
    try:
        validate(str(path))
    except SnapshotError as err:
        message = str(err)
        assert message and "\n" not in message, repr(message)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - t < 5.0
    assert peak < 4 * len(bad) + 4 * MiB, f"peak {peak} for a {len(bad)}-byte file"


# Cases found while building the validator, kept as a corpus.
CORPUS = [
    ("block", 1, "size", (1 << 64) - 4096, True),        # size wraps offsets
    ("block", 0, "bitmap_length", 1 << 40, True),        # huge bitmap read
    ("header", "nblocks", 0, True),
    ("header", "state_length", 1 << 63, True),
    ("header", "file_size", 0, True),
    ("block", 1, "pages_present", 1 << 63, True),
    ("state-field", "xsave", "zz"),
    ("state-field", "msrs", [[1, -1]]),
    ("state-field", "vcpus", []),
    ("state-json", [1, 2]),
    ("overlap", "pages"),
    ("bitmap-bits", 1, 3),
    ("swap-blocks",),                                     # blocks out of gpa order
]


@pytest.mark.parametrize("case", CORPUS, ids=[str(c[:3]) for c in CORPUS])
def test_corpus_case_is_refused(tmp_path, base, case):
    data, snap = base
    path = tmp_path / "case.snap"
    path.write_bytes(mutate(data, snap, case))
    with pytest.raises(SnapshotError):
        validate(str(path))


def test_unmutated_base_validates(base, tmp_path):
    path = tmp_path / "ok.snap"
    path.write_bytes(base[0])
    assert validate(str(path)).pages_present > 0


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 300,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(m=mutations)
@example(m=("truncate", 0.5))
def test_any_mutation_is_valid_or_a_snapshot_error(tmp_path, base, m):
    check(tmp_path, base, m)


# --- the streaming format: the same guarantees -------------------------------------------
from migrate import stream as stm  # noqa: E402


@pytest.fixture(scope="module")
def stream_base(base, tmp_path_factory):
    """A valid two-block stream file (two passes, so pages repeat): its bytes."""
    mem = GuestMemory([Region(RegionSpec(0, 0, 2 * MiB, "ram-low")),
                       Region(RegionSpec(1, 4 << 30, 2 * MiB, "ram-high"))])
    for r in mem.regions:
        r.array[::4096 * 3] = 0x5A
    path = tmp_path_factory.mktemp("fuzz") / "base.stream"
    w = stm.StreamWriter(str(path), mem)
    w.write_pass(None)
    mem.regions[0].array[3 * 4096] = 0                  # becomes a zero record
    w.write_pass({0: np.array([3, 4]), 1: np.array([0])})
    w.finish(base[1].state)
    mem.close()
    return path.read_bytes()


def stream_records(data: bytes) -> list[tuple[int, int]]:
    """(offset, kind) of each record of a valid stream file."""
    pos = stm.HEAD.size
    pos += 4 + struct.unpack_from("<I", data, pos)[0]
    out = []
    while True:
        kind, _, _ = stm.RECORD.unpack_from(data, pos)
        out.append((pos, kind))
        pos += stm.RECORD.size
        if kind == stm.KIND_PAGE:
            pos += 4096
        elif kind == stm.KIND_STATE:
            pos += 12 + struct.unpack_from("<Q", data, pos)[0]
        elif kind == stm.KIND_END:
            return out


def rebuild(data: bytes, blocks: bytes, nblocks: int) -> bytes:
    """The same records behind another block list."""
    pos = stm.HEAD.size
    rest = data[pos + 4 + struct.unpack_from("<I", data, pos)[0]:]
    return (stm.HEAD.pack(stm.MAGIC, stm.VERSION, nblocks, b"\0" * 48)
            + struct.pack("<I", len(blocks)) + blocks + rest)


stream_mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("record"), st.floats(0, 1, exclude_max=True), st.integers(0, 2),
              st.sampled_from(INTERESTING) | st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("nblocks"), st.integers(0, (1 << 32) - 1)),
    st.tuples(st.just("blocks-json"), json_values),
    st.tuples(st.just("block-field"), st.integers(0, 1),
              st.sampled_from(["slot", "gpa", "size", "name"]), json_values
              | st.sampled_from(INTERESTING)),
    st.tuples(st.just("swap-blocks")),
    st.tuples(st.just("state-json"), json_values),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
)


def mutate_stream(data: bytes, m) -> bytes:
    out = bytearray(data)
    kind = m[0]
    if kind == "truncate":
        return bytes(out[:int(m[1] * len(out))])
    if kind == "flip":
        out[int(m[1] * len(out))] ^= 1 << m[2]
        return bytes(out)
    if kind == "record":
        recs = stream_records(data)
        off, _ = recs[int(m[1] * len(recs))]
        code, at = [("<I", 0), ("<I", 4), ("<Q", 8)][m[2]]
        struct.pack_into(code, out, off + at, m[3] & ((1 << (8 * struct.calcsize(code))) - 1))
        return bytes(out)
    if kind == "nblocks":
        struct.pack_into("<I", out, 12, m[1])
        return bytes(out)
    pos = stm.HEAD.size
    blocks = json.loads(data[pos + 4:pos + 4 + struct.unpack_from("<I", data, pos)[0]])
    if kind == "blocks-json":
        return rebuild(data, json.dumps(m[1]).encode(), 2)
    if kind == "block-field":
        blocks[m[1]][m[2]] = m[3]
        return rebuild(data, json.dumps(blocks).encode(), 2)
    if kind == "swap-blocks":
        return rebuild(data, json.dumps(blocks[::-1]).encode(), 2)
    if kind == "state-json":
        off = [o for o, k in stream_records(data) if k == stm.KIND_STATE][0]
        body = json.dumps(m[1]).encode()
        return bytes(out[:off]) + stm.RECORD.pack(stm.KIND_STATE, 0, 0) + struct.pack(
            "<QI", len(body), zlib.crc32(body)) + body + stm.RECORD.pack(stm.KIND_END, 0, 0)
    if kind == "append":
        return bytes(out) + m[1]
    raise AssertionError(kind)


def check_stream(tmp_path, data: bytes) -> None:
    from helpers import rss_bytes
    path = tmp_path / "case.stream"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    t = time.monotonic()
    try:
        tracemalloc.start()
        try:
            info = stm.validate_stream(str(path), fd)
        except SnapshotError as err:
            assert str(err) and "\n" not in str(err), repr(str(err))
            return
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < 4 * len(data) + 4 * MiB, f"peak {peak} for a {len(data)}-byte file"
        rss = rss_bytes()
        memory, _ = stm.load_stream(info, fd)      # valid: replaying it stays bounded too
        try:
            assert rss_bytes() - rss < 4 * len(data) + 16 * MiB
        finally:
            memory.close()
    finally:
        os.close(fd)
    assert time.monotonic() - t < 5.0


def test_unmutated_stream_validates_and_loads(stream_base, tmp_path):
    path = tmp_path / "ok.stream"
    path.write_bytes(stream_base)
    fd = os.open(path, os.O_RDONLY)
    try:
        info = stm.validate_stream(str(path), fd)
        memory, pages = stm.load_stream(info, fd)
    finally:
        os.close(fd)
    try:
        low = memory.region_of_slot(0)
        assert pages == info.pages > 0
        assert low.array[3 * 4096] == 0 and low.array[0] == 0x5A   # last record won
    finally:
        memory.close()


STREAM_CORPUS = [
    ("swap-blocks",),                              # blocks out of gpa order
    ("block-field", 1, "gpa", 0),                  # overlapping blocks
    ("block-field", 1, "slot", 0),                 # two blocks in one slot
    ("block-field", 0, "size", 16 << 40),          # beyond KVM's slot limit
    ("nblocks", 3),
    ("truncate", 0.01),                            # the header alone
    ("state-json", []),                            # state that is not an object
    ("state-json", {"format": "kvmguest-state"}),
    ("append", b"\0"),                             # data after the end record
    ("record", 0.0, 1, 7),                         # a record for a block that is not there
]


@pytest.mark.parametrize("case", STREAM_CORPUS, ids=[str(c[:3]) for c in STREAM_CORPUS])
def test_stream_corpus_case_is_refused(tmp_path, stream_base, case):
    path = tmp_path / "case.stream"
    path.write_bytes(mutate_stream(stream_base, case))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(SnapshotError):
            stm.validate_stream(str(path), fd)
    finally:
        os.close(fd)


def test_zero_records_for_a_huge_block_do_not_allocate_its_memory(tmp_path, base):
    """8 MiB of zero-page records for a 16 GiB guest (a valid file): replaying it touches
    no page, so restore's memory is bounded by the file, not by the RAM it claims."""
    from helpers import rss_bytes
    blocks = json.dumps([{"name": "ram-low", "gpa": 0, "size": 3 << 30, "slot": 0},
                         {"name": "ram-high", "gpa": 4 << 30, "size": 13 << 30, "slot": 1}])
    recs = b"".join(stm.RECORD.pack(stm.KIND_ZERO, 1, i * 6) for i in range(8 * MiB // 16))
    state = json.dumps(base[1].state).encode()
    data = (stm.HEAD.pack(stm.MAGIC, stm.VERSION, 2, b"\0" * 48)
            + struct.pack("<I", len(blocks)) + blocks.encode() + recs
            + stm.RECORD.pack(stm.KIND_STATE, 0, 0) + struct.pack("<QI", len(state),
                                                                 zlib.crc32(state))
            + state + stm.RECORD.pack(stm.KIND_END, 0, 0))
    path = tmp_path / "zeros.stream"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        info = stm.validate_stream(str(path), fd)
        assert info.zero_records == len(recs) // 16
        rss = rss_bytes()
        memory, pages = stm.load_stream(info, fd)
        try:
            assert pages == 0 and rss_bytes() - rss < 64 * MiB
        finally:
            memory.close()
    finally:
        os.close(fd)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 300,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(m=stream_mutations)
def test_any_stream_mutation_is_valid_or_a_snapshot_error(tmp_path, stream_base, m):
    check_stream(tmp_path, mutate_stream(stream_base, m))
