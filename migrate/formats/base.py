"""What every snapshot format shares: opening a file (regular files only), the reader
interface (load, describe, export_sources), a loaded snapshot, the checks every format
makes the same way (its RAM layout against this host's policy and memory, its machine
state), and the record export-ram writes from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from kvmguest.files import open_regular
from kvmguest.memory import PAGE_SIZE, GuestMemoryError, RegionSpec, check_layout
from kvmguest.state import MachineState, StateError

from migrate.format import SnapshotError

MAPPED, STREAM, CHECKPOINT, QEMU = "mapped", "stream", "checkpoint", "qemu"


def open_snapshot(path: str) -> int:
    """A read-only fd of ``path`` if it is a regular file (a FIFO, a device or a
    directory is refused at once, never read)."""
    return open_regular(path, "snapshot", SnapshotError)


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


@dataclass
class Source:
    """One block to export: its size, and its runs of pages with data in the file."""
    name: str
    size: int
    page_size: int
    pages_present: int
    segments: Callable[[], Iterator[tuple[int, int, int]]]   # (first page, offset, pages)


def meminfo(field: str) -> int:
    """A /proc/meminfo figure in bytes (0 when absent)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def check_host_capacity(pages_present: int, lazy: bool) -> None:
    """Refuse, before allocating anything, an eager restore whose present pages do not
    fit in the memory available now. A lazy restore maps the file and allocates only
    what the guest writes afterwards, exactly like the guest it was saved from."""
    need, avail = pages_present * PAGE_SIZE, meminfo("MemAvailable")
    if not lazy and avail and need > avail:
        raise SnapshotError(f"restoring needs {need / 2**30:.1f} GiB of RAM for the guest's "
                            f"pages; the host has {avail / 2**30:.1f} GiB available "
                            "(try --lazy)")
