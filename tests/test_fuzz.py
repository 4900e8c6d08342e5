"""Hostile and corrupt snapshots, generated with hypothesis: every mutation of a valid
snapshot either still validates or ends in SnapshotError with a one-line message, never
another exception, a hang, or memory beyond a small multiple of the file's size.

`make fuzz` runs many more examples (KVMGUEST_FUZZ_EXAMPLES)."""

import json
import os
import struct
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import guest
from kvmguest.memory import GuestMemory, Region, RegionSpec
from migrate import format as fmt
from migrate.format import SnapshotError
from migrate.reader import validate
from migrate.writer import MappedWriter

MiB = 1 << 20
EXAMPLES = int(os.environ.get("KVMGUEST_FUZZ_EXAMPLES", "300"))

HEADER_FIELDS = {   # name: (offset, struct format)
    "version": (8, "<I"), "flags": (12, "<I"), "page_size": (16, "<I"), "nblocks": (20, "<I"),
    "table_offset": (24, "<Q"), "table_length": (32, "<Q"), "state_offset": (40, "<Q"),
    "state_length": (48, "<Q"), "file_size": (56, "<Q"),
}
BLOCK_FIELDS = {
    "gpa": (32, "<Q"), "size": (40, "<Q"), "page_size": (48, "<I"), "slot": (52, "<I"),
    "bitmap_offset": (56, "<Q"), "bitmap_length": (64, "<Q"), "pages_offset": (72, "<Q"),
    "pages_length": (80, "<Q"), "pages_present": (88, "<Q"), "flags": (100, "<I"),
}
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
    for i, b in enumerate(snap.layout.blocks):
        bm = bytes(data[b.bitmap_offset:b.bitmap_offset + b.bitmap_length])
        struct.pack_into("<I", data, 4096 + i * 128 + 96, fmt.crc(bm))
    table = bytes(data[4096:4096 + 128 * len(snap.layout.blocks)])
    struct.pack_into("<I", data, 64, fmt.crc(table))
    so, sl = snap.layout.state_offset, snap.state_length
    struct.pack_into("<I", data, 68, fmt.crc(bytes(data[so:so + sl])))
    struct.pack_into("<I", data, 124, fmt.crc(bytes(data[:124])))


def replace_state(data: bytearray, snap, state_bytes: bytes) -> bytearray:
    so = snap.layout.state_offset
    out = bytearray(data[:so]) + state_bytes
    out += b"\0" * (fmt.align(len(out), 4096) - len(out))
    struct.pack_into("<Q", out, 48, len(state_bytes))
    struct.pack_into("<Q", out, 56, len(out))
    struct.pack_into("<I", out, 68, fmt.crc(state_bytes))
    struct.pack_into("<I", out, 124, fmt.crc(bytes(out[:124])))
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
)


def mutate(data: bytes, snap, m) -> bytes:
    out = bytearray(data)
    kind = m[0]
    if kind == "truncate":
        return bytes(out[:int(m[1] * len(out))])
    if kind == "flip":
        _, section, where, bit = m
        b0 = snap.layout.blocks[0]
        lo, hi = {"header": (0, 128), "table": (4096, 4096 + 256),
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
        struct.pack_into(f, out, 4096 + i * 128 + off,
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
        struct.pack_into(f, out, 4096 + 128 + off, field[1])
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
