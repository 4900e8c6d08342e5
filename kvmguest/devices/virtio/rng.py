"""virtio-rng (virtio 1.1, 5.4): every buffer the driver gives is filled from the host's
getrandom(), in the vCPU thread that notified the queue."""

from __future__ import annotations

import os

from .device import VirtioDevice
from .queue import QueueError

DEVICE_ID = 4
MAX_REQUEST = 1 << 16              # bytes filled per buffer at most


class Rng(VirtioDevice):
    device_id = DEVICE_ID

    def __init__(self, memory, index: int = 0):
        self.memory, self.name = memory, f"virtio-rng{index}"
        self.given = 0                  # bytes handed to the guest

    def process(self, index: int, queue) -> bool:
        used = False
        while (chain := queue.pop()) is not None:
            written = 0
            for b in chain.buffers:
                if not b.write:
                    raise QueueError("virtio-rng was given a buffer it cannot write")
                n = min(b.length, MAX_REQUEST)
                self.memory.write(b.addr, os.getrandom(n))
                written += n
            self.given += written
            queue.push(chain.head, written)
            used = True
        return used
