"""virtio-net (virtio 1.1, 5.1) on a host tap device: frames the guest sends are written
to the tap in the vCPU thread that notified the transmit queue; frames the tap receives
are put in the guest's receive buffers by a thread of the device's own, which never
writes guest RAM while the guest is paused (``gate``: the machine's pause holds it), so a
snapshot or checkpoint never misses what it wrote. Each frame is preceded in guest
memory by the 12-byte virtio_net_hdr_v1 (no offloads: all zeros but num_buffers)."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import select
import struct
import threading

from ...errors import EXIT_BAD_INPUT, KvmguestError
from .device import VirtioDevice
from .queue import QueueError

log = logging.getLogger(__name__)

DEVICE_ID = 1
RECEIVE, TRANSMIT = 0, 1
F_MAC = 1 << 5
HEADER = 12                        # virtio_net_hdr_v1
MAX_FRAME = 65550                  # an Ethernet frame with its header, at most
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
MAX_BACKLOG = 256                  # frames held while the guest has no receive buffer


class NetError(KvmguestError):
    exit_code = EXIT_BAD_INPUT


def parse_mac(text: str) -> bytes:
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", text):
        raise NetError(f"{text!r} is not a MAC address (like 52:54:00:12:34:56)")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise NetError(f"{text} is a multicast address, not a device's")
    return mac


def open_tap(name: str) -> int:
    """The tap device ``name`` (made beforehand: `ip tuntap add NAME mode tap`)."""
    if not name or len(name.encode()) > 15 or "/" in name:
        raise NetError(f"{name!r} is not an interface name (1 to 15 characters)")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise NetError(f"cannot open /dev/net/tun: {err.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as err:
        os.close(fd)
        hint = " (make it first: ip tuntap add NAME mode tap; or run as root)" \
            if err.errno in (1, 16) else ""
        raise NetError(f"cannot attach to tap {name}: {err.strerror}{hint}") from None
    os.set_blocking(fd, False)
    return fd


class Net(VirtioDevice):
    """One network device on tap ``ifname`` with MAC ``mac`` (bytes)."""

    device_id, queue_count = DEVICE_ID, 2

    def __init__(self, memory, ifname: str, mac: bytes, index: int = 0):
        self.memory, self.ifname, self.mac = memory, ifname, mac
        self.name = f"virtio-net{index}"
        self.features = F_MAC
        self.fd = open_tap(ifname)
        self.transport = None              # set by the transport: its lock and interrupt
        self.gate = threading.Lock()       # held while a received frame is written
        self.backlog: list[bytes] = []
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._receive_loop, name=self.name,
                                        daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.backlog.clear()

    def config_read(self, offset: int, size: int) -> bytes:
        space = self.mac + struct.pack("<HH", 1, 1)        # mac, status (link up), pairs
        return space[offset:offset + size].ljust(size, b"\0")

    # --- the guest sends ----------------------------------------------------------------------
    def process(self, index: int, queue) -> bool:
        if index == RECEIVE:                 # new receive buffers: frames waiting may go in
            return self._deliver(queue)
        used = False
        while (chain := queue.pop()) is not None:
            if any(b.write for b in chain.buffers):
                raise QueueError("virtio-net's transmit queue holds a buffer for the device "
                                 "to write")
            packet = b"".join(self.memory.read(b.addr, b.length) for b in chain.buffers)
            frame = packet[HEADER:]
            if 14 <= len(frame) <= MAX_FRAME:
                try:
                    os.write(self.fd, frame)
                except OSError as err:       # the host side is down: as a cable unplugged
                    log.debug("%s: a frame was not sent: %s", self.name, err.strerror)
            queue.push(chain.head, 0)
            used = True
        return used

    # --- the host sends ---------------------------------------------------------------------
    def _receive_loop(self) -> None:
        while True:
            ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                frame = os.read(self.fd, MAX_FRAME)
            except BlockingIOError:
                continue
            except OSError:
                return
            with self.gate:                  # never while the guest is paused
                if len(self.backlog) < MAX_BACKLOG:
                    self.backlog.append(frame)
                self.transport.serve(RECEIVE)      # process(RECEIVE): _deliver

    def _deliver(self, queue) -> bool:
        """Frames waiting, into the receive buffers the guest has given (called with the
        transport's lock held)."""
        used = False
        while self.backlog and queue.ready:
            chain = queue.pop()
            if chain is None:
                return used
            frame = self.backlog.pop(0)
            data = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1) + frame
            written = 0
            for b in chain.buffers:
                if not b.write:
                    raise QueueError("virtio-net's receive queue holds a buffer the device "
                                     "cannot write")
                piece = data[written:written + b.length]
                if piece:
                    self.memory.write(b.addr, piece)
                written += len(piece)
            queue.push(chain.head, written)
            used = True
        return used

    # --- the machine's pause ----------------------------------------------------------------
    def hold(self) -> None:
        """The guest is paused: no frame is written into it until release()."""
        self.gate.acquire()

    def release(self) -> None:
        self.gate.release()

    def save_state(self) -> dict:
        return {"ifname": self.ifname, "mac": self.mac.hex()}

    def close(self) -> None:
        if self.fd >= 0:
            os.write(self._stop_w, b"!")
            self._thread.join(2.0)
            for fd in (self.fd, self._stop_r, self._stop_w):
                os.close(fd)
            self.fd = -1
