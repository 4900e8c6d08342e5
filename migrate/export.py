"""`kvmguest export-ram`: a RAM block of a snapshot (ours, or QEMU's) as a plain file.

The file is the block's bytes from offset 0: data where the snapshot has the page,
zeros (holes: the file is sparse) where it has none — for QEMU's files the same bytes
as QEMU's own ``scripts/analyze-migration.py -x`` writes for that block. Without
``--block`` every block is written under OUT (a directory), each file named after its
block as ``analyze-migration.py -x`` names them. Each file goes to a temporary name and
is renamed into place when complete: a failed export leaves what was there before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from kvmguest.errors import UsageError

from . import format as fmt
from .format import SnapshotError
from .pageio import fsync_dir, open_excl, temp_path_for
from .qemu import read_qemu
from .reader import open_snapshot, read_magic, validated
from .writer import check_save_target, io_error

CHUNK = 1 << 20


@dataclass
class Source:
    """One block to export: its size, which pages the file has, where each one is."""
    name: str
    size: int
    page_size: int
    present: np.ndarray
    offsets: object                 # (page indices) -> file offsets


def sources(path: str, fd: int) -> tuple[str, list[Source]]:
    """The kind of file and its blocks, after validating it fully."""
    magic = read_magic(fd, path)
    if magic[:4] == fmt.QEMU_MAGIC:
        q = read_qemu(fd)
        kind = "QEMU " + ("mapped-ram" if q.mapped_ram else "stream") + " file"
        return kind, [Source(b.name, b.size, b.page_size, b.present, b.offsets)
                      for b in q.blocks]
    if magic in (fmt.STREAM_MAGIC, fmt.CHECKPOINT_MAGIC):
        what = "streaming-format snapshot" if magic == fmt.STREAM_MAGIC else "checkpoint file"
        raise SnapshotError(f"{path} is a {what}: export-ram reads mapped-ram snapshots "
                            "(kvmguest's and QEMU's); restore it and save it to get one")
    snap, _ = validated(path, fd)

    def at(block):
        return lambda idx: block.pages_offset + idx.astype(np.int64) * block.page_size
    return "kvmguest snapshot", [Source(b.name, b.size, b.page_size, p, at(b))
                                 for b, p in zip(snap.layout.blocks, snap.present)]


def _segments(idx: np.ndarray, offs: np.ndarray, page_size: int):
    """(first page, file offset, pages) runs that are contiguous in RAM and in the file."""
    if not len(idx):
        return
    breaks = np.flatnonzero((np.diff(idx) != 1) | (np.diff(offs) != page_size)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(idx)]))
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield int(idx[s]), int(offs[s]), e - s


def write_block(fd: int, src: Source, out: str) -> int:
    """Write ``src`` to ``out`` (temp file, fsync, rename); the pages of data written."""
    tmp = temp_path_for(out)
    ofd = open_excl(tmp, False)
    try:
        os.ftruncate(ofd, src.size)
        idx = np.flatnonzero(src.present)
        per = max(1, CHUNK // src.page_size)
        for first, off, n in _segments(idx, src.offsets(idx), src.page_size):
            for k in range(0, n, per):
                length = min(per, n - k) * src.page_size
                data = os.pread(fd, length, off + k * src.page_size)
                if len(data) != length:
                    raise SnapshotError(f"short read of block {src.name!r} at offset "
                                        f"{off + k * src.page_size}: truncated?")
                os.pwrite(ofd, data, (first + k) * src.page_size)
        os.fsync(ofd)
        os.close(ofd)
        ofd = -1
        os.rename(tmp, out)
        fsync_dir(out)
    except BaseException:
        if ofd >= 0:
            os.close(ofd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return len(idx)


def block_path(out_dir: str, name: str) -> str:
    """Where block ``name`` goes under ``out_dir`` (as analyze-migration.py -x places it),
    refusing a name that would leave the directory."""
    parts = [p for p in name.split("/") if p]
    if not parts or any(p in (".", "..") or "\0" in p for p in parts):
        raise SnapshotError(f"RAM block name {name!r} is not a safe file name: damaged?")
    return os.path.join(out_dir, *parts)


def export_ram(path: str, out: str, block: str | None = None) -> list[tuple[Source, str, int]]:
    """Export one block (``block``) to the file ``out``, or every block into the directory
    ``out``; (block, file written, pages of data) for each."""
    fd = open_snapshot(path)
    try:
        return _export(path, fd, out, block)
    except OSError as err:
        raise io_error(err, out, "exporting RAM to") from None
    finally:
        os.close(fd)


def _export(path: str, fd: int, out: str, block: str | None) -> list[tuple[Source, str, int]]:
    kind, blocks = sources(path, fd)
    if block is not None:
        chosen = [s for s in blocks if s.name == block]
        if not chosen:
            raise UsageError(f"{path} ({kind}) has no RAM block {block!r}; its blocks: "
                             + ", ".join(repr(s.name) for s in blocks))
        target = check_save_target(out, what="RAM export")
        return [(chosen[0], target, write_block(fd, chosen[0], target))]
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{out} exists and is not a directory: without --block, "
                         "export-ram writes every block into a directory")
    done = []
    for s in blocks:
        target = block_path(os.path.abspath(out), s.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        done.append((s, target, write_block(fd, s, check_save_target(
            target, what="RAM export"))))
    return done
