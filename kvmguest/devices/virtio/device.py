"""What a virtio device behind the transport provides (mmio.MmioTransport calls it), with
the defaults of a device that has no configuration space to speak of and no state of its
own beyond its queues."""

from __future__ import annotations


class VirtioDevice:
    """``device_id`` and ``queue_count`` name the device; ``features`` its own feature bits
    (the transport adds VERSION_1); ``process(index, queue)`` serves a notified queue and
    says whether it used buffers (the transport interrupts)."""

    device_id = 0
    queue_count = 1
    features = 0
    name = "virtio"
    transport = None                     # set by the transport

    def process(self, index: int, queue) -> bool:
        raise NotImplementedError

    def reset(self) -> None:
        pass

    def config_read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def config_write(self, offset: int, data: bytes) -> None:
        pass                             # nothing writable

    def save_state(self) -> dict:
        return {}

    def restore_state(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass
