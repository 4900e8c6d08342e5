"""Any snapshot kvmguest reads, opened once and known by its first bytes: a mapped-ram
snapshot (ours), our streaming baseline, a continuous-checkpoint file, or QEMU's
migration file. restore (reader.py), inspect and export-ram each ask :func:`sniff` which
it is, then hand it to that format's own reader; what every format's reader checks the
same way (its RAM layout against this host's policy, its machine state) is here too."""

from __future__ import annotations

import os

from kvmguest.files import open_regular
from kvmguest.memory import GuestMemoryError, RegionSpec, check_layout
from kvmguest.state import MachineState, StateError

from . import format as fmt
from .format import SnapshotError

MAPPED, STREAM, CHECKPOINT, QEMU = "mapped", "stream", "checkpoint", "qemu"


def open_snapshot(path: str) -> int:
    """A read-only fd of ``path`` if it is a regular file (a FIFO, a device or a
    directory is refused at once, never read)."""
    return open_regular(path, "snapshot", SnapshotError)


def sniff(fd: int, path: str) -> str:
    """Which format the file is, by its magic (anything else is read as mapped-ram,
    whose reader says precisely what is wrong with it)."""
    try:
        magic = os.pread(fd, len(fmt.STREAM_MAGIC), 0)
    except OSError as err:
        raise SnapshotError(f"cannot read {path}: {err.strerror}") from None
    if magic == fmt.STREAM_MAGIC:
        return STREAM
    if magic == fmt.CHECKPOINT_MAGIC:
        return CHECKPOINT
    if magic[:4] == fmt.QEMU_MAGIC:
        return QEMU
    return MAPPED


def region_specs(blocks) -> list[RegionSpec]:
    """The RAM layout a snapshot records, checked against the same policy as ``run``
    (kvmguest.memory.check_layout): what boots on this host restores on it."""
    specs = [RegionSpec(b.slot, b.gpa, b.size, b.name) for b in blocks]
    try:
        check_layout(specs)
    except GuestMemoryError as err:
        raise SnapshotError(f"snapshot cannot be restored on this host: {err}") from None
    return specs


def decode_state(state: dict) -> MachineState:
    """A snapshot's state, decoded and checked (SnapshotError if it is not usable)."""
    try:
        return MachineState.from_json(state)
    except StateError as err:
        raise SnapshotError(f"state: {err}") from None
