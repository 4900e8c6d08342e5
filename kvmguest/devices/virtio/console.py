"""virtio-console (virtio 1.1, 5.3), one port: what the guest writes to hvc0 goes where
the serial console's output goes (the console text a run returns, and stdout), in the
vCPU thread that notified the transmit queue."""

from __future__ import annotations

from .device import VirtioDevice
from .queue import QueueError

DEVICE_ID = 3
RECEIVE, TRANSMIT = 0, 1
MAX_WRITE = 1 << 16                # bytes taken from one buffer at most


class Console(VirtioDevice):
    device_id, queue_count = DEVICE_ID, 2

    def __init__(self, memory, serial, index: int = 0):
        self.memory, self.serial, self.name = memory, serial, f"virtio-console{index}"

    def config_read(self, offset: int, size: int) -> bytes:
        # cols, rows (u16 each), max_nr_ports (u32): one port, no size known
        return bytes(12)[offset:offset + size].ljust(size, b"\0")

    def process(self, index: int, queue) -> bool:
        if index != TRANSMIT:
            return False                 # receive buffers wait for input (none is sent yet)
        used = False
        while (chain := queue.pop()) is not None:
            for b in chain.buffers:
                if b.write:
                    raise QueueError("virtio-console's transmit queue holds a buffer for "
                                     "the device to write")
                self.serial.emit(self.memory.read(b.addr, min(b.length, MAX_WRITE)))
            queue.push(chain.head, 0)
            used = True
        return used
