"""How a save fails, said once for every writer (snapshot, stream, checkpoint, export):
the error types, the check of a save's target path, I/O errors named plainly, and
cancellation."""

from __future__ import annotations

import errno
import os
import stat
import threading

from kvmguest.errors import EXIT_BAD_INPUT, KvmguestError
from kvmguest.files import file_kind

from .pageio import fsync_dir, open_excl, temp_path_for


class SaveError(KvmguestError):
    """A save failed; the message says why. The previous snapshot at the path is intact."""


class SavePathError(SaveError):
    """The save's target path cannot hold a snapshot (bad input: nothing was written)."""

    exit_code = EXIT_BAD_INPUT


class SaveCancelled(SaveError):
    """The save was cancelled (a signal, or the client that asked for it went away)."""


def install(tmp: str, path: str) -> None:
    """A finished temporary file put in place: the target still nothing but a file (or
    nothing), renamed over, the rename made durable."""
    check_save_target(path, probe=False)
    os.rename(tmp, path)
    fsync_dir(path)


def check_save_target(path: str, what: str = "snapshot", probe: bool = True) -> str:
    """The absolute path a snapshot (or ``what``) may be saved to, or SavePathError saying
    why not.

    A save replaces a regular file or a symbolic link (the link itself, never its
    target), or creates a new file; anything else at the path (a device, a FIFO, a
    socket, a directory) is refused, so a save never destroys what is not a snapshot."""
    if not isinstance(path, str) or not path:
        raise SavePathError(f"the {what} path is empty")
    if "\0" in path:
        raise SavePathError(f"the {what} path contains a NUL byte")
    target = os.path.abspath(path)
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise SavePathError(f"directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SavePathError(f"cannot create files in {directory}: permission denied")
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise SavePathError(f"cannot check {target}: {err.strerror}") from err
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise SavePathError(f"{target} is {file_kind(st.st_mode)}; a {what} replaces only "
                            "a regular file, refusing to touch it")
    if probe:
        _probe_directory(target, what)
    return target


def _probe_directory(target: str, what: str) -> None:
    """Create and remove a file beside ``target``, as the save will: the one proof that
    the save can happen there (/proc passes every permission check and refuses files)."""
    probe = temp_path_for(target)
    try:
        os.close(open_excl(probe, False))
        os.unlink(probe)
    except OSError as err:
        raise SavePathError(f"cannot create a {what} in {os.path.dirname(target)}: "
                            f"{err.strerror}") from None


def io_error(err: OSError, path: str, what: str) -> SaveError:
    """A SaveError naming what failed (disk full and quota said plainly)."""
    if err.errno == errno.ENOSPC:
        return SaveError(f"no space left on device while {what} {path}")
    if err.errno == errno.EDQUOT:
        return SaveError(f"disk quota exceeded while {what} {path}")
    return SaveError(f"{what} {path} failed: {err.strerror}")


def check_cancel(cancel: threading.Event | None, path: str) -> None:
    if cancel is not None and cancel.is_set():
        raise SaveCancelled(f"save cancelled; nothing was written to {path}")
