"""virtio-console (virtio 1.1, 5.3), one port: what the guest writes to hvc0 goes where
the serial console's output goes (the console text a run returns, and stdout), in the
vCPU thread that notified the transmit queue; what the serial console is given as input
(standard input with --console-input, ``machine.console.send``) is given to hvc0 too,
through the receive buffers the guest offers. Input comes from a host thread: the
``gate`` keeps it out of a paused guest (the machine's pause holds it), and bytes not yet
delivered are device state."""

from __future__ import annotations

import collections
import threading

from .device import VirtioDevice
from .queue import QueueError

DEVICE_ID = 3
RECEIVE, TRANSMIT = 0, 1
MAX_WRITE = 1 << 16                # bytes taken from one buffer at most
MAX_INPUT = 1 << 20                # input waiting for receive buffers, at most (as the UART)


class Console(VirtioDevice):
    device_id, queue_count = DEVICE_ID, 2

    def __init__(self, memory, serial, index: int = 0):
        self.memory, self.serial, self.name = memory, serial, f"virtio-console{index}"
        self.pending: collections.deque[int] = collections.deque()
        self.dropped = 0
        self.gate = threading.Lock()       # held while the guest is paused
        serial.input_listeners.append(self.feed)

    def config_read(self, offset: int, size: int) -> bytes:
        # cols, rows (u16 each), max_nr_ports (u32): one port, no size known
        return bytes(12)[offset:offset + size].ljust(size, b"\0")

    def process(self, index: int, queue) -> bool:
        if index == RECEIVE:             # new receive buffers: input waiting may go in
            return self._deliver(queue)
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

    # --- input ------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Input for hvc0 (from any thread): queued, and delivered now where the guest
        has offered buffers (input given before the driver came up waits for it, as the
        UART's does; a device reset keeps it)."""
        with self.gate:                  # never while the guest is paused
            room = MAX_INPUT - len(self.pending)
            self.pending.extend(data[:max(room, 0)])
            self.dropped += max(len(data) - max(room, 0), 0)
            if self.transport is not None:
                self.transport.serve(RECEIVE)      # process(RECEIVE): _deliver

    def _deliver(self, queue) -> bool:
        """Input waiting, into the receive buffers the guest has given (with the
        transport's lock held)."""
        used = False
        while self.pending and queue.ready:
            chain = queue.pop()
            if chain is None:
                return used
            written = 0
            for b in chain.buffers:
                if not b.write:
                    raise QueueError("virtio-console's receive queue holds a buffer the "
                                     "device cannot write")
                n = min(b.length, len(self.pending))
                if n:
                    self.memory.write(b.addr, bytes(self.pending.popleft() for _ in range(n)))
                written += n
            queue.push(chain.head, written)
            used = True
        return used

    # --- the machine's pause ----------------------------------------------------------------
    def hold(self) -> None:
        self.gate.acquire()

    def release(self) -> None:
        self.gate.release()

    def save_state(self) -> dict:
        return {"input": bytes(self.pending).hex()} if self.pending else {}

    def restore_state(self, state: dict) -> None:
        self.pending = collections.deque(bytes.fromhex(state.get("input", "")))

    def close(self) -> None:
        try:
            self.serial.input_listeners.remove(self.feed)
        except ValueError:
            pass
