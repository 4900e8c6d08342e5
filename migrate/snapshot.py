"""Any snapshot kvmguest reads, opened once and known by its first bytes: a mapped-ram
snapshot (ours), our streaming baseline, a continuous-checkpoint file, or QEMU's
migration file. :func:`reader_for` sniffs it once and gives that format's reader, which
restore (reader.py), inspect and export-ram use alike: ``load`` (validated whole, then
memory filled), ``describe`` and ``export_sources``; what a format cannot do is one line
naming it. What every format checks the same way (its RAM layout against this host's
policy, its machine state) is here too. Each format's code stays in its own module,
imported when its reader is used."""

from __future__ import annotations

import os
from dataclasses import dataclass

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


@dataclass
class Loaded:
    """A snapshot loaded for a restore: its checked state and the memory holding it."""
    saved: MachineState
    memory: object                 # kvmguest.memory.GuestMemory
    pages: int                     # pages read (or mapped) from the file
    lazy: bool = False             # the memory maps the file (MAP_PRIVATE)
    snapshot: object = None        # the mapped-ram Snapshot, for a lazy restore's lease


class SnapshotReader:
    """One open snapshot file of a known format (``fd`` stays the caller's)."""

    kind = ""
    what = ""                      # the format, as messages name it

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd

    def load(self, lazy: bool, threads: int, progress) -> Loaded:
        raise SnapshotError(f"{self.path} is {self.what}: kvmguest cannot restore it")

    def describe(self, info: dict) -> None:
        """Fill ``info`` (kvmguest inspect's record) after validating the file."""
        raise NotImplementedError

    def export_sources(self):
        """(what the file is, its RAM blocks as export.Source) for export-ram."""
        raise SnapshotError(f"{self.path} is {self.what}: export-ram reads mapped-ram "
                            "snapshots (kvmguest's and QEMU's); restore it and save it to "
                            "get one")


class MappedReader(SnapshotReader):
    kind, what = MAPPED, "a kvmguest snapshot"

    def load(self, lazy, threads, progress) -> Loaded:
        from .reader import load_mapped
        return load_mapped(self.path, self.fd, lazy, threads, progress)

    def describe(self, info):
        from .inspect import describe_mapped
        describe_mapped(info, self.path, self.fd)

    def export_sources(self):
        from .export import mapped_sources
        return mapped_sources(self.path, self.fd)


class StreamReader(SnapshotReader):
    kind, what = STREAM, "a streaming-format snapshot"

    def load(self, lazy, threads, progress) -> Loaded:
        from .reader import check_host_capacity
        from .stream import load_stream, validate_stream
        info = validate_stream(self.path, self.fd)
        check_host_capacity(info.pages, lazy=False)
        memory, loaded = load_stream(info, self.fd)
        return Loaded(info.decoded, memory, loaded)

    def describe(self, info):
        from .inspect import describe_stream
        describe_stream(info, self.path, self.fd)


class CheckpointReader(SnapshotReader):
    kind, what = CHECKPOINT, "a checkpoint file"

    def load(self, lazy, threads, progress) -> Loaded:
        from .checkpoint import load_checkpoint, validated_checkpoint
        ck = validated_checkpoint(self.path, self.fd)
        memory, loaded = load_checkpoint(ck, self.fd)
        return Loaded(ck.decoded, memory, loaded)

    def describe(self, info):
        from .inspect import describe_checkpoint
        describe_checkpoint(info, self.path, self.fd)


class QemuReader(SnapshotReader):
    kind, what = QEMU, "a QEMU migration file"

    def load(self, lazy, threads, progress) -> Loaded:
        # The mapped-ram reader refuses it in the words every reader of ours uses.
        return MappedReader(self.path, self.fd).load(lazy, threads, progress)

    def describe(self, info):
        from .inspect import describe_qemu
        describe_qemu(info, self.path, self.fd)

    def export_sources(self):
        from .export import qemu_sources
        return qemu_sources(self.fd)


READERS = {r.kind: r for r in (MappedReader, StreamReader, CheckpointReader, QemuReader)}


def reader_for(path: str, fd: int) -> SnapshotReader:
    """The reader for the file open at ``fd``, by its magic (sniffed once)."""
    return READERS[sniff(fd, path)](path, fd)
