"""Hostile and corrupt snapshots, generated with hypothesis: every mutation of a valid
snapshot either still validates or ends in SnapshotError with a one-line message, never
another exception, a hang, or memory beyond a small multiple of the file's size.

`make fuzz` runs many more examples (KVMGUEST_FUZZ_EXAMPLES)."""

import json
import os
import re
import struct
import time
import tracemalloc
import zlib

import numpy as np

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import cli, guest, one_line_error
from kvmguest.memory import GuestMemory, Region, RegionSpec
from migrate import format as fmt
from migrate.format import SnapshotError
from migrate.formats.mapped import validate
from migrate.writer import MappedWriter

MiB = 1 << 20
EXAMPLES = int(os.environ.get("KVMGUEST_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 300,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

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


# Cases found while building the validator, kept as a corpus: each with the reason it must
# be refused for (a case refused by another check would prove nothing).
CORPUS = [
    (("block", 1, "size", (1 << 64) - 4096, True), "page area length"),  # size wraps offsets
    (("block", 0, "bitmap_length", 1 << 40, True), "bitmap length 1099511627776"),
    (("header", "nblocks", 0, True), "block count 0 out of range"),
    (("header", "state_length", 1 << 63, True), "state at 5242880+9223372036854775808 runs past"),
    (("header", "file_size", 0, True), "but the header says 0"),
    (("block", 1, "pages_present", 1 << 63, True), "9223372036854775808 pages present of 512"),
    (("state-field", "xsave", "zz"), "non-hexadecimal"),
    (("state-field", "msrs", [[1, -1]]), "bad MSR entry [1, -1]"),
    (("state-field", "vcpus", []), "state must hold 1 to"),
    (("state-json", [1, 2]), "state section is not kvmguest state"),
    (("overlap", "pages"), "overlaps page area of 'ram-low'"),
    (("bitmap-bits", 1, 3), "bits set but 171 pages recorded"),
    (("swap-blocks",), "not in ascending guest-physical order"),      # blocks out of gpa order
]


@pytest.mark.parametrize("case,reason", CORPUS, ids=[str(c[0][:3]) for c in CORPUS])
def test_corpus_case_is_refused_for_its_reason(tmp_path, base, case, reason):
    data, snap = base
    path = tmp_path / "case.snap"
    path.write_bytes(mutate(data, snap, case))
    with pytest.raises(SnapshotError, match=re.escape(reason)):
        validate(str(path))


def test_unmutated_base_validates(base, tmp_path):
    path = tmp_path / "ok.snap"
    path.write_bytes(base[0])
    assert validate(str(path)).pages_present > 0


@FUZZ
@given(m=mutations)
@example(m=("truncate", 0.5))
def test_any_mutation_is_valid_or_a_snapshot_error(tmp_path, base, m):
    check(tmp_path, base, m)


# --- the streaming format: the same guarantees -------------------------------------------
from migrate.formats import stream as stm  # noqa: E402


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
    (("swap-blocks",), "blocks overlap or are not in ascending"),    # blocks out of gpa order
    (("block-field", 1, "gpa", 0), "blocks overlap or are not in ascending"),
    (("block-field", 1, "slot", 0), "two stream blocks claim the same memory slot"),
    (("block-field", 1, "size", 16 << 40), "exceeds KVM's limit"),    # beyond a slot's limit
    (("nblocks", 3), "has 2 blocks, header says 3"),
    (("truncate", 0.01), "truncated"),                                # the header alone
    (("state-json", []), "stream state is not kvmguest state"),       # not an object
    (("state-json", {"format": "kvmguest-state"}), "version None is not supported"),
    (("append", b"\0"), "1 bytes after its end record"),              # data after the end
    (("record", 0.0, 1, 7), "block 7 is out of range"),              # a block not there
]


@pytest.mark.parametrize("case,reason", STREAM_CORPUS,
                         ids=[str(c[0][:3]) for c in STREAM_CORPUS])
def test_stream_corpus_case_is_refused_for_its_reason(tmp_path, stream_base, case, reason):
    path = tmp_path / "case.stream"
    path.write_bytes(mutate_stream(stream_base, case))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(SnapshotError, match=re.escape(reason)):
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


@FUZZ
@given(m=stream_mutations)
def test_any_stream_mutation_is_valid_or_a_snapshot_error(tmp_path, stream_base, m):
    check_stream(tmp_path, mutate_stream(stream_base, m))


# --- continuous checkpoint files (KVMGCKPT): the same guarantees ---------------------------
from migrate import checkpoint as ck  # noqa: E402
from migrate.formats import checkpoint as ckfmt  # noqa: E402


@pytest.fixture(scope="module")
def ckpt_base(tmp_path_factory):
    """A valid checkpoint file of a running dirty guest, its latest checkpoint with a
    journal (the second one): its bytes (small: 8 MiB of RAM, a sparse file)."""
    from kvmguest import Machine
    from helpers import guest_pass, wait_until
    path = tmp_path_factory.mktemp("fuzz") / "base.ckpt"
    m = Machine(str(guest("dirty")), memory=8 * MiB, cmdline="pages=64 base=4194304 passes=0")
    try:
        m.start()
        chain = ck.Checkpointer(m, str(path))
        try:
            for _ in range(2):
                n = guest_pass(m, 4 << 20)
                wait_until(lambda: guest_pass(m, 4 << 20) > n + 1, 60, "two more passes")
                chain.take()
        finally:
            chain.close()
    finally:
        m.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert ck.validated_checkpoint(str(path), fd).record.journal_pages > 0
    finally:
        os.close(fd)
    return Bytes(path.read_bytes())


class Bytes(bytes):
    """A base file's bytes, shown by length in a failure report (not 8 MB of repr)."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


def _ckpt_super(data: bytes) -> dict:
    n = ck.SUPER.unpack(data)["layout_length"]
    return json.loads(data[ck.SUPER.size:ck.SUPER.size + n])


def _ckpt_reseal_super(out: bytearray, layout) -> None:
    body = json.dumps(layout).encode()
    head = ck.SUPER.pack(magic=ck.MAGIC, version=ck.VERSION, layout_length=len(body)) + body
    head += struct.pack("<I", zlib.crc32(head))
    assert len(head) <= ck.SLOT_OFFSETS[0], "superblock too long for the test"
    out[:ck.SLOT_OFFSETS[0]] = head.ljust(ck.SLOT_OFFSETS[0], b"\0")


def _ckpt_latest(data: bytes):
    recs = [ck.CheckpointRecord.parse(data[o:o + 512]) for o in ck.SLOT_OFFSETS]
    return ckfmt.latest(recs)


RECORD_FIELDS = ["generation", "kind", "state_slot", "state_len", "state_crc",
                 "journal_pages", "journal_crc", "time_ns", "pages_written"]
ckpt_mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.sampled_from(["super", "record", "state", "journal"]),
              st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("layout"), st.sampled_from(["journal_offset", "journal_size",
                                                  "state_offsets", "state_size", "blocks"]),
              json_values | st.sampled_from(INTERESTING)),
    st.tuples(st.just("block"), st.sampled_from(["name", "gpa", "size", "slot",
                                                 "pages_offset"]),
              json_values | st.sampled_from(INTERESTING + [-4096, -1, 0.5, True])),
    st.tuples(st.just("record"), st.sampled_from(RECORD_FIELDS),
              st.sampled_from(INTERESTING) | st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("state-json"), json_values),
    st.tuples(st.just("state-raw"), st.sampled_from([b"", b"[" * 100000, b"not json",
                                                     b'{"checkpoints": []}'])),
    st.tuples(st.just("state-field"), st.sampled_from(["vcpus", "devices", "vm", "guest"]),
              json_values),
    st.tuples(st.just("device-field"), st.sampled_from(
        ["debug_exit.result", "serial.regs", "serial.input", "cmos.ram", "cmos.offset",
         "testdev.iomem", "fw_cfg.offset", "acpi_pm.count", "guest_port.restores"]),
        json_values | st.sampled_from(INTERESTING)),
)


def _set_record(out: bytearray, slot: int, rec) -> None:
    out[ck.SLOT_OFFSETS[slot]:ck.SLOT_OFFSETS[slot] + 512] = rec.pack()


def _replace_ckpt_state(out: bytearray, body: bytes) -> None:
    slot, rec = _ckpt_latest(bytes(out))
    layout = _ckpt_super(bytes(out))
    at = layout["state_offsets"][rec.state_slot]
    out[at:at + len(body)] = body[:layout["state_size"]]
    rec.state_len, rec.state_crc = len(body), zlib.crc32(body)
    _set_record(out, slot, rec)


def mutate_ckpt(data: bytes, m) -> bytes:
    out = bytearray(data)
    kind = m[0]
    slot, rec = _ckpt_latest(data)
    layout = _ckpt_super(data)
    if kind == "truncate":
        return bytes(out[:int(m[1] * len(out))])
    if kind == "flip":
        _, section, where, bit = m
        state_at = layout["state_offsets"][rec.state_slot]
        lo, hi = {"super": (0, 512), "record": (ck.SLOT_OFFSETS[slot],
                                                ck.SLOT_OFFSETS[slot] + 64),
                  "state": (state_at, state_at + rec.state_len),
                  "journal": (layout["journal_offset"],
                              layout["journal_offset"] + rec.journal_pages * 4104)}[section]
        out[lo + int(where * (hi - lo))] ^= 1 << bit
        return bytes(out)
    if kind == "layout":
        layout[m[1]] = m[2]
        _ckpt_reseal_super(out, layout)
        return bytes(out)
    if kind == "block":
        layout["blocks"][0][m[1]] = m[2]
        _ckpt_reseal_super(out, layout)
        return bytes(out)
    if kind == "record":
        value = m[2] & ((1 << (8 * (4 if m[1] in ("kind", "state_slot", "state_len",
                                                     "state_crc", "journal_crc") else 8))) - 1)
        setattr(rec, m[1], value)
        _set_record(out, slot, rec)
        return bytes(out)
    at = layout["state_offsets"][rec.state_slot]
    doc = json.loads(data[at:at + rec.state_len])
    if kind == "state-json":
        body = json.dumps(m[1]).encode()
    elif kind == "state-raw":
        body = m[1]
    elif kind == "state-field":
        doc["state"][m[1]] = m[2]
        body = json.dumps(doc).encode()
    elif kind == "device-field":
        device, field = m[1].split(".")
        doc["state"]["devices"][device][field] = m[2]
        body = json.dumps(doc).encode()
    else:
        raise AssertionError(kind)
    _replace_ckpt_state(out, body)
    return bytes(out)


def write_sparse(path, data: bytes) -> None:
    """``data`` at ``path`` with its all-zero MiBs left as holes, as the files are."""
    with open(path, "wb") as f:
        f.truncate(len(data))
        for start in range(0, len(data), MiB):
            chunk = data[start:start + MiB]
            if chunk.count(0) != len(chunk):
                f.seek(start)
                f.write(chunk)


def check_ckpt(tmp_path, data: bytes) -> str | None:
    """The file is valid (and then loads) or a one-line SnapshotError (returned);
    memory and time bounded by what it holds."""
    path = tmp_path / "case.ckpt"
    write_sparse(path, data)
    fd = os.open(path, os.O_RDONLY)
    t = time.monotonic()
    try:
        tracemalloc.start()
        try:
            c = ck.validated_checkpoint(str(path), fd)
        except SnapshotError as err:
            assert str(err) and "\n" not in str(err), repr(str(err))
            return str(err)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < 16 * MiB, f"peak {peak} validating a checkpoint file"
        memory, _ = ck.load_checkpoint(c, fd)          # valid: it must load as inspect says
        memory.close()
    finally:
        os.close(fd)
        assert time.monotonic() - t < 10.0
    return None


# The hostile checkpoint files of the second review (issue 17, item 7), each refused for
# the reason it names.
CKPT_CORPUS = [
    (("record", "journal_pages", 1 << 40), "claims a journal of"),
    (("record", "journal_pages", (1 << 64) - 1), "claims a journal of"),
    (("record", "journal_pages", 300000), "claims a journal of"),
    (("record", "state_len", 1 << 31), "its slot holds"),
    (("layout", "blocks", [1]), "block 0 is not an object"),
    (("layout", "blocks", "abc"), "must list 1 to"),
    (("layout", "blocks", []), "must list 1 to"),
    (("block", "gpa", -4096), "not a whole number"),
    (("block", "gpa", True), "not a whole number"),
    (("block", "size", 0.5), "not a whole number"),
    (("block", "size", 4097), "not whole pages"),
    (("block", "slot", -1), "not a whole number"),
    (("block", "pages_offset", -(1 << 20)), "not a whole number"),
    (("block", "pages_offset", 1 << 50), "not the layout kvmguest writes"),
    (("block", "pages_offset", 0), "not the layout kvmguest writes"),
    (("layout", "state_offsets", []), "not the layout kvmguest writes"),
    (("layout", "state_offsets", ["a", "b"]), "not the layout kvmguest writes"),
    (("layout", "state_offsets", [-1, 0]), "not the layout kvmguest writes"),
    (("layout", "journal_offset", 0), "not the layout kvmguest writes"),
    (("state-json", [1, 2]), "is not kvmguest state"),
    (("state-raw", b'{"checkpoints": []}'), "is not kvmguest state"),
    (("state-raw", b"not json"), "does not decode"),
    (("state-raw", b""), "state of checkpoint 2 is 0 bytes"),
    (("state-raw", b"[" * 100000), "nested too deeply"),
    (("device-field", "debug_exit.result", "x"), "debug_exit's field result"),
    (("device-field", "serial.regs", {"ier": 1}), "serial's field regs"),
    (("device-field", "cmos.ram", "zz"), "cmos's field ram"),
    (("device-field", "cmos.offset", "now"), "cmos's field offset"),
    (("device-field", "fw_cfg.offset", -1), "fw_cfg's field offset"),
    (("state-field", "devices", {"nope": {}}), "has no serial device state"),
    (("device-field", "serial.nope", 1), "serial's state has an unknown field 'nope'"),
]


def test_unmutated_checkpoint_validates_and_loads(ckpt_base, tmp_path):
    assert check_ckpt(tmp_path, ckpt_base) is None


@pytest.mark.parametrize("case,reason", CKPT_CORPUS, ids=[str(c[0][:2]) + str(i) for i, c in
                                                           enumerate(CKPT_CORPUS)])
def test_checkpoint_corpus_case_is_refused_for_its_reason(tmp_path, ckpt_base, case, reason):
    error = check_ckpt(tmp_path, mutate_ckpt(ckpt_base, case))
    assert error is not None and reason in error, error


def test_inspect_calls_valid_only_what_restore_takes(ckpt_base, tmp_path):
    """A file inspect would have called valid that restore refused after allocating (or
    started on all-zero RAM): one line INVALID now, and restore refuses it up front."""
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(mutate_ckpt(ckpt_base, ("block", "pages_offset", 1 << 50)))
    p = cli("inspect", bad)
    assert p.returncode == 1 and "INVALID" in p.stdout and "Traceback" not in p.stderr
    one_line_error(cli("restore", bad), 2, "not the layout kvmguest writes")


@FUZZ
@given(m=ckpt_mutations)
def test_any_checkpoint_mutation_is_valid_or_a_snapshot_error(tmp_path, ckpt_base, m):
    check_ckpt(tmp_path, mutate_ckpt(ckpt_base, m))


# --- QEMU's migration files: read, never trusted --------------------------------------------
from migrate.formats.qemu import read_qemu  # noqa: E402
from qemu_files import qemu_file  # noqa: E402


@pytest.fixture(scope="module")
def qemu_bases(tmp_path_factory):
    """A small hand-made QEMU stream file and a mapped-ram one: their bytes."""
    work = tmp_path_factory.mktemp("fuzz-qemu")
    qemu_file(work / "s.qemu", [("pc.ram", 1 << 20), ("pc.bios", 1 << 16)],
              pages=[("pc.ram", 1, b"one"), ("pc.ram", 2, None), ("pc.bios", 3, b"bios")])
    qemu_file(work / "m.qemu", [("pc.ram", 1 << 20), ("pc.bios", 1 << 16)],
              mapped_bitmaps=[b"\x0f" + bytes(31), b"\x01" + bytes(7)])
    return {"stream": Bytes((work / "s.qemu").read_bytes()),
            "mapped": Bytes((work / "m.qemu").read_bytes())}


qemu_mutations = st.tuples(
    st.sampled_from(["stream", "mapped"]),
    st.one_of(
        st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
        st.tuples(st.just("flip"), st.floats(0, 0.002), st.integers(0, 7)),
        st.tuples(st.just("u64"), st.integers(8, 400),
                  st.sampled_from(INTERESTING) | st.integers(0, (1 << 64) - 1)),
        st.tuples(st.just("u32"), st.integers(8, 400),
                  st.sampled_from(INTERESTING) | st.integers(0, (1 << 32) - 1)),
    ))


def check_qemu(tmp_path, data: bytes) -> None:
    path = tmp_path / "case.qemu"
    write_sparse(path, data)
    fd = os.open(path, os.O_RDONLY)
    t = time.monotonic()
    tracemalloc.start()
    try:
        q = read_qemu(fd)
        for b in q.blocks:                        # what export walks
            assert sum(n for _, _, n in b.segments(fd)) == b.pages_present
    except SnapshotError as err:
        assert str(err) and "\n" not in str(err), repr(str(err))
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        os.close(fd)
    assert peak < 16 * MiB + 4 * len(data.rstrip(b"\0")), f"peak {peak}"
    assert time.monotonic() - t < 10.0


@FUZZ
@given(m=qemu_mutations)
def test_any_qemu_file_mutation_is_read_or_a_snapshot_error(tmp_path, qemu_bases, m):
    which, (kind, *args) = m
    out = bytearray(qemu_bases[which])
    if kind == "truncate":
        out = out[:int(args[0] * len(out))]
    elif kind == "flip":
        out[int(args[0] * len(out))] ^= 1 << args[1]
    else:
        code = ">Q" if kind == "u64" else ">I"
        if args[0] + struct.calcsize(code) <= len(out):
            struct.pack_into(code, out, args[0], args[1] % (1 << (8 * struct.calcsize(code))))
    check_qemu(tmp_path, bytes(out))
