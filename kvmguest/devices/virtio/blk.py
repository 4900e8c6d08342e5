"""virtio-blk (virtio 1.1, 5.2) backed by a file: read, write, flush and the device's id,
carried out in the vCPU thread that notified the queue, so that no request is ever in
flight when the guest is paused (a snapshot's disk and RAM agree). Read-only is the
device's own rule (a write is refused with IOERR), not only a feature the guest sees.
The pages it reads into guest RAM are marked dirty (GuestMemory.fill_from)."""

from __future__ import annotations

import os
import stat
import struct

from ...errors import EXIT_BAD_INPUT, KvmguestError
from ...files import file_kind
from .device import VirtioDevice
from .queue import QueueError

DEVICE_ID = 2
SECTOR = 512
F_RO, F_BLK_SIZE, F_FLUSH = 1 << 5, 1 << 6, 1 << 9
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20
HEADER = struct.Struct("<IIQ")                 # type, reserved, sector


class DiskError(KvmguestError):
    """A disk image that cannot be used (missing, unreadable, busy, not a regular file)."""

    exit_code = EXIT_BAD_INPUT


def open_disk(path: str, readonly: bool) -> tuple[int, os.stat_result]:
    """The image's fd (read-only or read-write) and its stat, or DiskError naming why
    not: checked before the guest boots."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise DiskError(f"disk {path}: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DiskError(f"disk {path} is {file_kind(st.st_mode)}, not a regular file (an "
                        "image)")
    try:
        fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as err:
        raise DiskError(f"disk {path}: cannot open it {'for reading' if readonly else 'to read and write'}: "
                        f"{err.strerror}{'' if readonly else ' (add ,readonly?)'}") from None
    try:
        import fcntl
        fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DiskError(f"disk {path} is in use by another guest (locked)") from None
    return fd, st


class Blk(VirtioDevice):
    """One disk: ``path`` (its image), ``readonly``."""

    device_id, queue_count = DEVICE_ID, 1

    def __init__(self, memory, path: str, readonly: bool = False, index: int = 0,
                 expect: dict | None = None):
        """``expect``: the disk a snapshot recorded (a restore): the image must be that
        one, unchanged (same size; at the same path, also the same inode and mtime)."""
        self.memory, self.path, self.readonly = memory, path, readonly
        self.name = f"virtio-blk{index}"
        self.fd, st = open_disk(path, readonly)
        self.size = st.st_size
        self.identity = {"path": os.path.abspath(path), "size": st.st_size,
                         "inode": st.st_ino, "mtime_ns": st.st_mtime_ns}
        if expect is not None:
            self._check_same(expect)
        self.features = F_FLUSH | F_BLK_SIZE | (F_RO if readonly else 0)
        self.serial = f"kvmguest{index}".encode()[:ID_BYTES]

    def _check_same(self, expect: dict) -> None:
        moved = expect["path"] != self.identity["path"]
        keys = ("size",) if moved else ("size", "inode", "mtime_ns")
        changed = [k for k in keys if expect[k] != self.identity[k]]
        if changed:
            os.close(self.fd)
            self.fd = -1
            raise DiskError(f"disk {self.path} ({self.name}) is not the one the snapshot was "
                            f"taken with: its {' and '.join(changed)} changed (restoring "
                            "would show the guest a disk its memory does not know)")

    @property
    def sectors(self) -> int:
        return self.size // SECTOR

    def config_read(self, offset: int, size: int) -> bytes:
        # capacity (u64, sectors), size_max, seg_max, geometry (4 bytes), blk_size (u32)
        space = struct.pack("<QIIHBBI", self.sectors, 0, 0, 0, 0, 0, SECTOR)
        return space[offset:offset + size].ljust(size, b"\0")

    def process(self, index: int, queue) -> bool:
        used = False
        while (chain := queue.pop()) is not None:
            queue.push(chain.head, self._request(chain))
            used = True
        return used

    def _request(self, chain) -> int:
        """Carry out one request; the bytes written into the chain (data and status)."""
        bufs = chain.buffers
        if len(bufs) < 2 or bufs[0].write or bufs[0].length < HEADER.size \
                or not bufs[-1].write or bufs[-1].length < 1:
            raise QueueError("a block request without its header or status byte")
        kind, _, sector = HEADER.unpack(self.memory.read(bufs[0].addr, HEADER.size))
        data, status_buf = bufs[1:-1], bufs[-1]
        written, status = 0, S_OK
        if kind == T_IN:
            status, written = self._read(sector, data)
        elif kind == T_OUT:
            status = self._write(sector, data)
        elif kind == T_FLUSH:
            status = self._flush()
        elif kind == T_GET_ID:
            if data and data[0].write:
                ident = self.serial.ljust(ID_BYTES, b"\0")[:data[0].length]
                self.memory.write(data[0].addr, ident)
                written = len(ident)
        else:
            status = S_UNSUPP
        self.memory.write(status_buf.addr, bytes((status,)))
        return written + 1

    def _span(self, sector: int, data) -> int | None:
        total = sum(b.length for b in data)
        if total % SECTOR or sector > self.sectors or sector * SECTOR + total > self.size:
            return None
        return total

    def _read(self, sector: int, data) -> tuple[int, int]:
        if any(not b.write for b in data) or self._span(sector, data) is None:
            return S_IOERR, 0
        offset, done = sector * SECTOR, 0
        for b in data:
            try:
                got = self.memory.fill_from(b.addr, self.fd, b.length, offset)
            except OSError:
                return S_IOERR, done
            done += got
            offset += b.length
            if got != b.length:
                return S_IOERR, done
        return S_OK, done

    def _write(self, sector: int, data) -> int:
        if self.readonly:
            return S_IOERR                           # the device refuses, whatever the guest
        if any(b.write for b in data) or self._span(sector, data) is None:
            return S_IOERR
        offset = sector * SECTOR
        for b in data:
            try:
                if os.pwrite(self.fd, self.memory.view(b.addr, b.length), offset) != b.length:
                    return S_IOERR
            except OSError:
                return S_IOERR
            offset += b.length
        return S_OK

    def _flush(self) -> int:
        if self.readonly:
            return S_OK
        try:
            os.fsync(self.fd)
        except OSError:
            return S_IOERR
        return S_OK

    def save_state(self) -> dict:
        st = os.fstat(self.fd)              # as the disk is now, at the pause
        self.identity.update(size=st.st_size, inode=st.st_ino, mtime_ns=st.st_mtime_ns)
        return {"disk": dict(self.identity), "readonly": self.readonly}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
