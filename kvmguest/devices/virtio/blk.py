"""virtio-blk (virtio 1.1, 5.2) backed by a file: read, write, flush and the device's id,
carried out in the vCPU thread that notified the queue, so that no request is ever in
flight when the guest is paused (a snapshot's disk and RAM agree). Read-only is the
device's own rule (a write is refused with IOERR), not only a feature the guest sees.
The pages it reads into guest RAM are marked dirty (GuestMemory.fill_from).

With ``overlay`` the image is only read: the guest's writes land in a copy-on-write
overlay of 4 KiB blocks held in device memory (GuestMemory.add_device_region), which
every snapshot, checkpoint and reset carries with RAM, at fixed offsets; which blocks the
overlay holds is device state. A restored or reset guest sees the disk as it was at that
instant, and the image itself never changes (many guests may share it)."""

from __future__ import annotations

import base64
import os
import stat
import struct
import zlib

from ...errors import EXIT_BAD_INPUT, KvmguestError
from ...files import file_kind
from ...lazy import lazy_numpy
from ...memory import DEVICE_SPACE, PAGE_SIZE, Region, RegionSpec
from .device import VirtioDevice
from .queue import QueueError

DEVICE_ID = 2
SECTOR = 512
F_RO, F_BLK_SIZE, F_FLUSH = 1 << 5, 1 << 6, 1 << 9
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20
HEADER = struct.Struct("<IIQ")                 # type, reserved, sector
BLOCK = PAGE_SIZE                              # an overlay's unit: one page of device memory
OVERLAY_SLOT = 0x7000                          # + the disk's index: its block in a snapshot
OVERLAY_SPAN = 1 << 44                         # device-space room for each disk's overlay

np = lazy_numpy()


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
                 expect: dict | None = None, overlay: bool = False):
        """``expect``: the disk a snapshot recorded (a restore): the image must be that
        one, unchanged (same size; at the same path, also the same inode and mtime).
        ``overlay``: the guest's writes go to a copy-on-write overlay (the image is
        opened read-only); on a restore, the overlay's device memory was loaded with
        RAM and is found by its slot."""
        if readonly and overlay:
            raise DiskError(f"disk {path}: readonly and overlay exclude each other (an "
                            "overlay takes the guest's writes; readonly refuses them)")
        self.memory, self.path, self.readonly = memory, path, readonly
        self.name = f"virtio-blk{index}"
        self.fd, st = open_disk(path, readonly or overlay)
        self.size = st.st_size
        self.identity = {"path": os.path.abspath(path), "size": st.st_size,
                         "inode": st.st_ino, "mtime_ns": st.st_mtime_ns}
        if expect is not None:
            self._check_same(expect)
        self.features = F_FLUSH | F_BLK_SIZE | (F_RO if readonly else 0)
        self.serial = f"kvmguest{index}".encode()[:ID_BYTES]
        self.overlay = Overlay(memory, self, index) if overlay else None

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
                got = (self.overlay.read(b.addr, b.length, offset) if self.overlay else
                       self.memory.fill_from(b.addr, self.fd, b.length, offset))
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
            if self.overlay:
                if not self.overlay.write(self.memory.view(b.addr, b.length), offset):
                    return S_IOERR
                offset += b.length
                continue
            try:
                if os.pwrite(self.fd, self.memory.view(b.addr, b.length), offset) != b.length:
                    return S_IOERR
            except OSError:
                return S_IOERR
            offset += b.length
        return S_OK

    def _flush(self) -> int:
        if self.readonly or self.overlay:           # nothing of the image to make durable
            return S_OK
        try:
            os.fsync(self.fd)
        except OSError:
            return S_IOERR
        return S_OK

    def save_state(self) -> dict:
        st = os.fstat(self.fd)              # as the disk is now, at the pause
        self.identity.update(size=st.st_size, inode=st.st_ino, mtime_ns=st.st_mtime_ns)
        state = {"disk": dict(self.identity), "readonly": self.readonly}
        if self.overlay:
            state["overlay"] = self.overlay.save_state()
        return state

    def restore_state(self, state: dict) -> None:
        if ("overlay" in state) != (self.overlay is not None):
            raise DiskError(f"{self.name}: the state {'has' if 'overlay' in state else 'lacks'} "
                            "an overlay the device does not")
        if self.overlay:
            self.overlay.restore_state(state["overlay"])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Overlay:
    """A disk's copy-on-write overlay: ``region`` (device memory of the image's size,
    rounded up to a block) and ``held``, which of its blocks hold data (the rest read
    from the image). Written in the vCPU thread that notified the queue, as the device
    is; a pause therefore sees blocks and ``held`` agree."""

    def __init__(self, memory, disk: Blk, index: int):
        self.memory, self.disk = memory, disk
        slot = OVERLAY_SLOT + index
        nblocks = -(-disk.size // BLOCK)
        if nblocks == 0:
            raise DiskError(f"disk {disk.path} is empty: nothing to overlay")
        if disk.size > OVERLAY_SPAN:
            raise DiskError(f"disk {disk.path} is larger than an overlay may be "
                            f"({OVERLAY_SPAN >> 40} TiB)")
        region = memory.device_region(slot)
        if region is None:
            region = Region(RegionSpec(slot, DEVICE_SPACE + index * OVERLAY_SPAN,
                                       nblocks * BLOCK, f"{disk.name}-overlay"))
            memory.add_device_region(region)
        elif region.npages != nblocks:
            raise DiskError(f"disk {disk.path}: the snapshot's overlay of {disk.name} holds "
                            f"{region.npages} blocks, the image has {nblocks}")
        self.region = region
        self.held = np.zeros(nblocks, dtype=np.bool_)

    def _runs(self, offset: int, length: int):
        """(start, end, held) byte runs of [offset, offset + length), split where the
        blocks change between held and not."""
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK + 1
        held = self.held[first:last]
        edges = np.flatnonzero(held[1:] != held[:-1]) + 1
        starts = [0, *edges.tolist()]
        ends = [*edges.tolist(), len(held)]
        for s, e in zip(starts, ends):
            yield (max(offset, (first + s) * BLOCK), min(offset + length, (first + e) * BLOCK),
                   bool(held[s]))

    def read(self, gpa: int, length: int, offset: int) -> int:
        """Disk bytes [offset, offset + length) into guest RAM at ``gpa``: held blocks
        from the overlay, the rest from the image; the bytes read."""
        done = 0
        for s, e, held in self._runs(offset, length):
            if held:
                self.memory.write(gpa + s - offset, self.region.map[s:e])
                got = e - s
            else:
                got = self.memory.fill_from(gpa + s - offset, self.disk.fd, e - s, s)
            done += got
            if got != e - s:
                break
        return done

    def write(self, data, offset: int) -> bool:
        """``data`` at disk byte ``offset``: a block not yet held is first copied from
        the image (unless the write covers it whole). False if the image could not be
        read."""
        end = offset + len(data)
        for b in (offset // BLOCK, (end - 1) // BLOCK):
            if not self.held[b] and not (offset <= b * BLOCK and (b + 1) * BLOCK <= end):
                want = min(BLOCK, self.disk.size - b * BLOCK)
                if self.memory.device_fill(self.region, b * BLOCK, self.disk.fd, want,
                                           b * BLOCK) != want:
                    return False
                self.held[b] = True
        self.memory.device_write(self.region, offset, data)
        self.held[offset // BLOCK:(end - 1) // BLOCK + 1] = True
        return True

    def save_state(self) -> dict:
        """``held`` as a compressed bitmap (a few bytes for a fresh or sequential one)."""
        packed = zlib.compress(np.packbits(self.held).tobytes(), 6)
        return {"blocks": len(self.held), "held": base64.b64encode(packed).decode()}

    def restore_state(self, state: dict) -> None:
        problem = check_overlay_state(state, len(self.held))
        if problem:
            raise DiskError(f"{self.disk.name}: {problem}")
        self.held[:] = _held_bits(state)


def _held_bits(state: dict):
    d = zlib.decompressobj()
    want = (state["blocks"] + 7) // 8
    raw = d.decompress(base64.b64decode(state["held"], validate=True), want)
    if d.unconsumed_tail or not d.eof or d.unused_data:
        raise ValueError("the block map is longer than its disk")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:state["blocks"]]
    if len(bits) != state["blocks"]:
        raise ValueError("the block map is shorter than its disk")
    return bits.astype(np.bool_)


def check_overlay_state(state, blocks: int | None = None) -> str | None:
    """What is wrong with an overlay's saved state, or None (checked before any device
    exists, and again against the disk it lands on)."""
    if not isinstance(state, dict) or type(state.get("blocks")) is not int \
            or not isinstance(state.get("held"), str) or not 0 < state["blocks"] <= OVERLAY_SPAN // BLOCK:
        return "the overlay's state is not a block count and a block map"
    if blocks is not None and state["blocks"] != blocks:
        return f"the snapshot's overlay has {state['blocks']} blocks, the disk {blocks}"
    try:
        _held_bits(state)
    except (ValueError, zlib.error) as err:
        return f"the overlay's block map is damaged ({err})"
    return None
