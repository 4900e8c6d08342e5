"""Restore: validate the whole snapshot, rebuild a VM with its memory layout, load the
pages (preadv, several threads; or lazily by mmap MAP_PRIVATE of the page areas), apply
the vCPU and device state. The snapshot is opened read-only and never written."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from kvmguest.machine import Machine, open_kvm
from kvmguest.memory import PAGE_SIZE as PAGE
from kvmguest.state import StateError

from .format import SnapshotError
from .lease import SnapshotLease
from .pageio import check_threads
from .snapshot import open_snapshot, reader_for

log = logging.getLogger(__name__)


@dataclass
class RestoreReport:
    path: str
    lazy: bool
    pages_loaded: int
    bytes_loaded: int
    seconds: float

    def summary(self) -> str:
        how = "mapped lazily" if self.lazy else f"{self.bytes_loaded / 2**20:.1f} MiB read"
        return f"restored {self.path}: {how} in {self.seconds * 1e3:.1f} ms"


def restore(path: str, *, lazy: bool = False, threads: int = 2, stream=None,
            console_capacity: int = 1 << 20, progress=None,
            disks: dict[str, str] | None = None) -> tuple[Machine, RestoreReport]:
    """A paused-at-start Machine rebuilt from ``path``; call ``start()`` to resume the guest.
    ``disks`` (virtio-blkN -> path): where the snapshot's disks are now, if moved.

    KVM is checked first (a host without it is told so before a byte is read), then the
    whole file is validated, then memory is allocated and the VM created."""
    t = time.perf_counter()
    check_threads(threads)
    lease = None
    kvm = open_kvm()
    try:
        fd = open_snapshot(path)
        try:
            got = reader_for(path, fd).load(lazy, threads, progress)
            memory, saved, loaded, lazy = got.memory, got.saved, got.pages, got.lazy
            if lazy:
                lease = SnapshotLease(path, memory, got.snapshot)
                memory.on_close(lease.close)
        finally:
            os.close(fd)
        try:
            machine = Machine.from_state(saved, memory, kvm=kvm, own_kvm=True,
                                         stream=stream, console_capacity=console_capacity,
                                         disks=disks)
        except (StateError, ValueError) as err:
            memory.close()
            raise SnapshotError(f"state cannot be applied: {err}") from None
        except BaseException:
            memory.close()
            raise
    except BaseException:
        kvm.close()
        raise
    if lease is not None:
        lease.attach(machine)
    return machine, RestoreReport(os.path.abspath(path), lazy, loaded, loaded * PAGE,
                                  time.perf_counter() - t)
