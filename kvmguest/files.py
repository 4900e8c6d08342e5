"""Opening the files a user names (kernels, snapshots): regular files only.

A FIFO, a device such as /dev/zero or a directory is refused at once with one line,
instead of blocking the open or being read forever.
"""

from __future__ import annotations

import os
import stat

_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFLNK: "a symbolic link"}


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO', ... for an st_mode."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(path: str, what: str, error: type[Exception]) -> int:
    """Open ``path`` read-only if it is a regular file; ``error`` (one line) otherwise.

    O_NONBLOCK keeps a FIFO from blocking the open; the kind is checked on the open fd,
    so the file checked is the file read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror}") from err
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{what} {path} is {file_kind(st.st_mode)}, not a regular file")
    os.set_blocking(fd, True)
    return fd
