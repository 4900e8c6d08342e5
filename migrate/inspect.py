"""`kvmguest inspect`: a snapshot's layout, pages, state summary, and validity.

Every format is described (mapped-ram, the streaming baseline, checkpoint files, and
QEMU's migration files: their RAM blocks, mapped-ram or not); a file that cannot
be read at all is said to be unreadable, with why, not called invalid."""

from __future__ import annotations

import os

from kvmguest.errors import EXIT_BAD_INPUT, EXIT_FAILED

from .format import SnapshotError
from .snapshot import open_snapshot, reader_for


def describe(path: str) -> dict:
    """What ``path`` is: ``valid`` with its layout, or a ``verdict`` (INVALID, UNREADABLE)
    and the ``error``; ``exit_code`` for the CLI."""
    info: dict = {"path": path, "valid": False}
    try:
        fd = open_snapshot(path)
    except SnapshotError as err:
        info.update(verdict="UNREADABLE", error=str(err), exit_code=EXIT_BAD_INPUT)
        return info
    try:
        st = os.fstat(fd)
        info["file_size"], info["allocated"] = st.st_size, st.st_blocks * 512
        try:
            reader_for(path, fd).describe(info)
        except OSError as err:
            info.update(verdict="UNREADABLE", error=f"cannot read: {err.strerror}",
                        exit_code=EXIT_BAD_INPUT)
        except SnapshotError as err:
            info.update(verdict="INVALID", error=str(err), exit_code=EXIT_FAILED)
    finally:
        os.close(fd)
    return info
