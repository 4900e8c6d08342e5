"""`kvmguest export-ram`: a RAM block of a snapshot (ours, or QEMU's) as a plain file.

The file is the block's bytes from offset 0: data where the snapshot has a page that is
not all zeros, holes where it has none or a zero page (the file is sparse, however the
snapshot marks its pages) — for QEMU's files the same bytes as QEMU's own
``scripts/analyze-migration.py -x`` writes for that block. Holes of the snapshot itself
are never read. Without ``--block`` every block is written under OUT (a directory),
each file named after its block as ``analyze-migration.py -x`` names them.

Nothing is left behind by a failed export. A single file goes to a temporary name and
is renamed into place when complete. A directory export checks every block's name first
(no control characters, no ``..``, no block that is also another's folder), creates the
tree beneath OUT through directory fds with O_NOFOLLOW (a symbolic link inside OUT is
refused, never followed), writes every file to a temporary name and renames them all
into place only when all are complete; on failure it removes what it created.
"""

from __future__ import annotations

import errno
import os

import numpy as np

from kvmguest.errors import UsageError

from .errors import check_save_target, io_error
from .format import SnapshotError
from .formats.base import Source
from .pageio import data_extents, fsync_dir, open_excl, runs_of_mask, temp_path_for
from .snapshot import open_snapshot, reader_for

CHUNK = 1 << 20
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def sources(path: str, fd: int) -> tuple[str, list[Source]]:
    """The kind of file and its blocks, after validating it fully."""
    return reader_for(path, fd).export_sources()


def _copy(fd: int, src: Source, ofd: int) -> int:
    """The block's non-zero pages from ``fd`` into ``ofd`` at their RAM offsets; how many."""
    ps = src.page_size
    step = max(ps, CHUNK - CHUNK % ps)                    # whole pages at a time
    written = 0
    for first, off, n in src.segments():
        end = off + n * ps
        for s, e in data_extents(fd, off, end):
            s -= (s - off) % ps                            # from a page's start
            for pos in range(s, e, step):
                length = min(step, end - pos)
                data = os.pread(fd, length, pos)
                if len(data) != length:
                    raise SnapshotError(f"short read of block {src.name!r} at offset {pos}: "
                                        "truncated?")
                pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, ps)
                page = first + (pos - off) // ps
                for a, b in runs_of_mask(pages.any(axis=1)).tolist():
                    os.pwrite(ofd, data[a * ps:b * ps], (page + a) * ps)
                    written += b - a
    return written


def write_block(fd: int, src: Source, out: str) -> int:
    """Write ``src`` to the file ``out`` (temp file, fsync, rename); pages of data written."""
    tmp = temp_path_for(out)
    ofd = open_excl(tmp, False)
    try:
        os.ftruncate(ofd, src.size)
        pages = _copy(fd, src, ofd)
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
    return pages


def block_parts(name: str) -> list[str]:
    """The path components block ``name`` is written under (as analyze-migration.py -x
    places it), refusing a name that would leave the directory or that is not a plain
    file name (control characters)."""
    parts = [p for p in name.split("/") if p]
    if not parts or any(p in (".", "..") or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in p)
                        for p in parts):
        raise SnapshotError(f"RAM block name {name!r} is not a safe file name: damaged?")
    return parts


def _check_tree(blocks: list[Source]) -> list[list[str]]:
    """Every block's components; refused when one block's file is another's folder."""
    paths = [block_parts(s.name) for s in blocks]
    files = {tuple(p) for p in paths}
    folders = {tuple(p[:i]) for p in paths for i in range(1, len(p))}
    clash = sorted(files & folders) or [p for p in files if len([q for q in paths
                                                                 if tuple(q) == p]) > 1]
    if clash:
        raise SnapshotError(f"RAM block {'/'.join(clash[0])!r} would be both a file and a "
                            "folder (or is named twice) in the export: damaged?")
    return paths


class _Tree:
    """Files and folders created beneath a directory fd, removed again on failure."""

    def __init__(self, root_fd: int):
        self.root = root_fd
        self.fds: dict[tuple, int] = {(): root_fd}
        self.made_dirs: list[tuple[int, str]] = []        # (parent fd, name)
        self.temps: list[tuple[int, str, str]] = []       # (dir fd, temp name, final name)

    def folder(self, parts: list[str]) -> int:
        """The fd of folder ``parts`` beneath the root, made as needed; never a link."""
        key: tuple = ()
        for p in parts:
            parent = self.fds[key]
            key += (p,)
            if key in self.fds:
                continue
            try:
                os.mkdir(p, 0o755, dir_fd=parent)
                self.made_dirs.append((parent, p))
            except FileExistsError:
                pass
            try:
                self.fds[key] = os.open(p, _OPEN_DIR, dir_fd=parent)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UsageError(f"{'/'.join(key)} in the export folder is not a folder "
                                     "(a symbolic link or a file): refusing to write "
                                     "through it") from None
                raise
        return self.fds[key]

    def create(self, dfd: int, name: str) -> int:
        tmp = os.path.basename(temp_path_for(name))
        ofd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=dfd)
        self.temps.append((dfd, tmp, name))
        return ofd

    def commit(self) -> None:
        """Every temporary file renamed over its name (a link there is replaced, never
        followed), then the folders synced."""
        for dfd, tmp, name in self.temps:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        self.temps = []
        self.made_dirs = []
        for dfd in set(self.fds.values()):
            os.fsync(dfd)

    def close(self) -> None:
        for dfd, tmp, _ in reversed(self.temps):
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
        for parent, name in reversed(self.made_dirs):
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError:
                pass
        for key, dfd in self.fds.items():
            if key:
                os.close(dfd)


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
    paths = _check_tree(blocks)
    if not out or "\0" in out:
        raise UsageError("the export folder path is empty or holds a NUL byte")
    root = os.path.abspath(out)
    if os.path.lexists(root) and not os.path.isdir(root):
        raise UsageError(f"{out} exists and is not a directory: without --block, "
                         "export-ram writes every block into a directory")
    made_root = False
    if not os.path.lexists(root):
        os.mkdir(root, 0o755)
        made_root = True
    tree = _Tree(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    done = []
    try:
        for s, parts in zip(blocks, paths):
            dfd = tree.folder(parts[:-1])
            ofd = tree.create(dfd, parts[-1])
            try:
                os.ftruncate(ofd, s.size)
                pages = _copy(fd, s, ofd)
                os.fsync(ofd)
            finally:
                os.close(ofd)
            done.append((s, os.path.join(root, *parts), pages))
        tree.commit()
        made_root = False
    finally:
        tree.close()
        os.close(tree.root)
        if made_root:
            try:
                os.rmdir(root)
            except OSError:
                pass
    return done
