"""Any snapshot kvmguest reads, opened once and known by its first bytes: a mapped-ram
snapshot (ours), our streaming baseline, a continuous-checkpoint file, or QEMU's
migration file. :func:`reader_for` sniffs it once and gives that format's reader
(migrate/formats/), which restore (reader.py), inspect and export-ram use alike."""

from __future__ import annotations

import os

from migrate import format as fmt
from migrate.format import SnapshotError
from migrate.formats.base import CHECKPOINT, MAPPED, QEMU, STREAM, SnapshotReader, open_snapshot
from migrate.formats.checkpoint import CheckpointReader
from migrate.formats.mapped import MappedReader
from migrate.formats.qemu import QemuReader
from migrate.formats.stream import StreamReader

__all__ = ["open_snapshot", "reader_for", "sniff"]


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


READERS = {r.kind: r for r in (MappedReader, StreamReader, CheckpointReader, QemuReader)}


def reader_for(path: str, fd: int) -> SnapshotReader:
    """The reader for the file open at ``fd``, by its magic (sniffed once)."""
    return READERS[sniff(fd, path)](path, fd)
