"""Keep a lazily restored guest safe from changes to its snapshot file.

A lazy restore maps the snapshot's page areas ``MAP_PRIVATE``: pages the guest has not
written yet still come from the file, so truncating the file would make those pages
raise SIGBUS (killing the process) and writing into it would change the running guest.
We hold a read lease (``F_SETLEASE F_RDLCK``) on the file: before anyone else may open
it for writing or truncate it, the kernel tells us (SIGIO) and makes them wait. We then
pause the guest, give every page of the mapping a private copy (pages with data are
copied; holes become anonymous zero pages), release the lease and resume: the guest
carries on, independent of the file, and the other process proceeds.

Where no lease can be taken (another process already has the file open for writing,
or the filesystem refuses leases), the restore logs a warning: the file must then not be
changed while the guest runs (docs/guarantees.md, "Against hostile input").
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import signal
import threading

import numpy as np

from kvmguest.memory import PAGE_SIZE as PAGE

from .pageio import runs_of_mask

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
MAP_FIXED = 0x10
_active: list["SnapshotLease"] = []
_lock = threading.Lock()
_installed = False


CHUNK = 16384              # pages copied at a time while detaching (64 MiB)


def _map_anonymous(region, start: int, end: int) -> None:
    """Replace pages [start, end) of the region's mapping with anonymous zero pages, at the
    same address (KVM's slot keeps pointing there; its MMU notifier sees the change)."""
    addr = region.host_addr + start * PAGE
    got = _libc.mmap(addr, (end - start) * PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED, -1, 0)
    if got != addr:
        raise OSError(ctypes.get_errno(), "mmap MAP_FIXED failed")


def _on_sigio(signum, frame) -> None:
    with _lock:
        leases = list(_active)
    for lease in leases:
        lease.check()


class SnapshotLease:
    """A read lease on a lazily mapped snapshot, and the detach it triggers."""

    def __init__(self, path: str, memory, snap):
        self.memory, self.snap = memory, snap      # snap.present is made only on a detach
        self.pause = self.resume = None        # set once the machine exists
        self.detached = False
        self.fd = -1
        global _installed
        if threading.current_thread() is not threading.main_thread():
            log.warning("lazy restore outside the main thread: %s is not protected; do not "
                        "change it while the guest runs", path)
            return
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not _installed:
                signal.signal(signal.SIGIO, _on_sigio)
                _installed = True
            fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as err:
            os.close(fd)
            log.warning("cannot take a lease on %s (%s): do not change or truncate it while "
                        "the lazily restored guest runs", path, err.strerror)
            return
        self.fd = fd
        with _lock:
            _active.append(self)

    def attach(self, machine) -> None:
        self.pause, self.resume = machine.pause_all, machine.resume_all

    def check(self) -> None:
        """Called on SIGIO: detach if our lease is being broken."""
        if self.fd < 0:
            return
        try:
            state = fcntl.fcntl(self.fd, fcntl.F_GETLEASE)
        except OSError:
            state = fcntl.F_UNLCK
        if state != fcntl.F_RDLCK or self._breaking():
            self.detach()

    def _breaking(self) -> bool:
        # While a break is pending, F_GETLEASE reports the type the lease is being
        # downgraded to (F_UNLCK for a writer); some kernels keep reporting F_RDLCK, so
        # /proc/locks is the second opinion.
        try:
            ino = os.fstat(self.fd).st_ino
            with open("/proc/locks") as f:
                return any("BREAKING" in line and f":{ino} " in line for line in f)
        except OSError:
            return True

    def detach(self) -> None:
        """Make every guest page private, then let the other process have the file."""
        if self.detached:
            return
        paused = False
        if self.pause is not None:
            try:
                self.pause()
                paused = True
            except Exception as err:  # noqa: BLE001 - a finished guest needs no pause
                log.debug("detach: pause: %s", err)
        try:
            with self.memory.protect_lock:      # no flush window while pages are copied
                self._make_private()
            self.detached = True
            log.info("the snapshot is about to change: the guest's memory no longer "
                     "depends on it")
        finally:
            self.close()
            if paused:
                self.resume()

    def _make_private(self) -> None:
        """Each page with data copied out and back into anonymous memory; the rest become
        anonymous zero pages."""
        for region, bits in zip(self.memory.saved_regions, self.snap.present):
            private = region.private_pages()
            if private is None:                  # cannot tell: keep every page
                private = np.ones(region.npages, dtype=np.bool_)
            # The whole region becomes anonymous memory. Truncation unmaps even the
            # private copies a MAP_PRIVATE file mapping holds, so writing to pages
            # is not enough: pages with data (in the file, or written by the guest)
            # are copied out, the range is remapped anonymous, and copied back.
            data = bits | private
            for s, e in runs_of_mask(~data).tolist():
                _map_anonymous(region, s, e)
            for s, e in runs_of_mask(data).tolist():
                for c in range(s, e, CHUNK):
                    ce = min(e, c + CHUNK)
                    saved = region.array[c * PAGE:ce * PAGE].copy()
                    _map_anonymous(region, c, ce)
                    region.array[c * PAGE:ce * PAGE] = saved

    def close(self) -> None:
        with _lock:
            if self in _active:
                _active.remove(self)
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            except OSError:
                pass
            os.close(fd)
