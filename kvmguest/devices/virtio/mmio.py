"""The virtio-mmio transport, version 2 (virtio 1.1, 4.2.2), as Firecracker's
transport/mmio.rs: a 4 KiB window of registers per device, apart from the device itself.
The driver reads the device's features and writes the ones it takes, sets each queue's
size and ring addresses and marks it ready, and notifies a queue by writing its index;
the device answers through the used ring and an interrupt (InterruptStatus bit 0; bit 1:
its configuration changed). Whatever the driver writes is checked: a queue that is not
usable, features the device did not offer, or a broken descriptor chain set the device's
NEEDS_RESET status and raise a configuration interrupt, as the spec asks; the VMM goes on.
"""

from __future__ import annotations

import logging
import struct
import threading

from ...loglimit import LogLimit
from .queue import MAX_SIZE, Queue, QueueError

log = logging.getLogger(__name__)

MAGIC = 0x74726976                 # "virt"
VERSION = 2
VENDOR = 0x4B564D47                # "KVMG"
WINDOW = 0x1000
CONFIG = 0x100                     # the device's configuration space starts here
F_VERSION_1 = 1 << 32
INT_USED, INT_CONFIG = 1, 2
# Device status bits.
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128

# Register offsets (virtio 1.1, table 4.1).
R = dict(magic=0x000, version=0x004, device_id=0x008, vendor=0x00C, dev_features=0x010,
         dev_features_sel=0x014, drv_features=0x020, drv_features_sel=0x024, queue_sel=0x030,
         queue_num_max=0x034, queue_num=0x038, queue_ready=0x044, queue_notify=0x050,
         int_status=0x060, int_ack=0x064, status=0x070, desc_lo=0x080, desc_hi=0x084,
         avail_lo=0x090, avail_hi=0x094, used_lo=0x0A0, used_hi=0x0A4, config_gen=0x0FC)
_QUEUE_ADDR = {R["desc_lo"]: ("desc", 0), R["desc_hi"]: ("desc", 32),
               R["avail_lo"]: ("avail", 0), R["avail_hi"]: ("avail", 32),
               R["used_lo"]: ("used", 0), R["used_hi"]: ("used", 32)}


class MmioTransport:
    """``device`` (a virtio device: device_id, features, queue count, config, process)
    at guest-physical ``base``; ``irq(level)`` drives its interrupt line."""

    def __init__(self, device, memory, base: int, irq=None):
        self.device, self.memory, self.base, self.irq = device, memory, base, irq
        self.pulse = None                      # an irqfd's write, where the VM has one
        device.transport = self
        self.offered = device.features | F_VERSION_1
        self.queues = [Queue(memory) for _ in range(device.queue_count)]
        self.lock = threading.Lock()           # one vCPU at a time in the device
        self._warnings = LogLimit(log, first=3)  # a guest can break its queues at will
        self.reset()

    def reset(self) -> None:
        self.status = self.interrupt_status = self.queue_sel = 0
        self.dev_features_sel = self.drv_features_sel = 0
        self.driver_features = 0
        self.config_generation = 0
        for q in self.queues:
            q.reset()
        self.device.reset()

    @property
    def acked(self) -> int:
        """The features in use (the driver's, once it has set FEATURES_OK)."""
        return self.driver_features if self.status & FEATURES_OK else 0

    # --- the registers ----------------------------------------------------------------------
    def contains(self, gpa: int, length: int) -> bool:
        return self.base <= gpa and gpa + length <= self.base + WINDOW

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= CONFIG:
                return self.device.config_read(offset - CONFIG, size)
            if size != 4:
                return bytes(size)                  # registers are 32-bit
            return struct.pack("<I", self._register(offset) & 0xFFFFFFFF)

    def _register(self, offset: int) -> int:
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if offset == R["magic"]:
            return MAGIC
        if offset == R["version"]:
            return VERSION
        if offset == R["device_id"]:
            return self.device.device_id
        if offset == R["vendor"]:
            return VENDOR
        if offset == R["dev_features"]:
            return self.offered >> (32 * self.dev_features_sel) if self.dev_features_sel < 2 \
                else 0
        if offset == R["queue_num_max"]:
            return MAX_SIZE if q else 0
        if offset == R["queue_ready"]:
            return int(q.ready) if q else 0
        if offset == R["int_status"]:
            return self.interrupt_status
        if offset == R["status"]:
            return self.status
        if offset == R["config_gen"]:
            return self.config_generation
        return 0

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            if offset >= CONFIG:
                self.device.config_write(offset - CONFIG, data)
                return
            if len(data) != 4:
                return
            value = struct.unpack("<I", data)[0]
            self._set_register(offset, value)

    def _set_register(self, offset: int, value: int) -> None:
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if offset == R["dev_features_sel"]:
            self.dev_features_sel = value
        elif offset == R["drv_features_sel"]:
            self.drv_features_sel = value
        elif offset == R["drv_features"]:
            if self.drv_features_sel < 2 and not self.status & FEATURES_OK:
                shift = 32 * self.drv_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) \
                    | value << shift
        elif offset == R["queue_sel"]:
            self.queue_sel = value
        elif offset == R["queue_num"] and q and not q.ready:
            q.size = value
        elif offset == R["queue_ready"] and q:
            self._set_ready(q, bool(value & 1))
        elif offset in _QUEUE_ADDR and q and not q.ready:
            name, shift = _QUEUE_ADDR[offset]
            setattr(q, name, (getattr(q, name) & ~(0xFFFFFFFF << shift)) | value << shift)
        elif offset == R["queue_notify"]:
            self._notify(value)
        elif offset == R["int_ack"]:
            self.interrupt_status &= ~value
            if not self.interrupt_status and self.irq:
                self.irq(0)
        elif offset == R["status"]:
            self._set_status(value)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            if self.driver_features & ~self.offered or not self.driver_features & F_VERSION_1:
                value &= ~FEATURES_OK              # the driver reads it back and gives up
        self.status = value

    def _set_ready(self, q: Queue, ready: bool) -> None:
        if ready and not q.ready:
            problem = q.check()
            if problem:
                self.broken(problem)
                return
        q.ready = ready

    def ready_for_device(self) -> bool:
        """The driver is running the device (DRIVER_OK) and it does not need a reset."""
        return bool(self.status & DRIVER_OK) and not self.status & NEEDS_RESET

    def serve(self, index: int) -> None:
        """A device's own thread has something for queue ``index`` (a received frame,
        console input): served now, as a notify is, if the driver runs the device."""
        with self.lock:
            self._notify(index)

    def _notify(self, index: int) -> None:
        if index >= len(self.queues) or not self.ready_for_device():
            return
        try:
            used = self.device.process(index, self.queues[index])
        except QueueError as err:
            self.broken(str(err))
            return
        if used:
            self.raise_used(index)

    def raise_used(self, index: int) -> None:
        """Queue ``index`` has new used buffers: interrupt, unless the driver said not to."""
        if self.queues[index].wants_interrupt():
            self.interrupt(INT_USED)

    def broken(self, why: str) -> None:
        self._warnings(logging.WARNING, "virtio %s: %s; the device needs a reset",
                       self.device.name, why)
        self.status |= NEEDS_RESET
        self.interrupt(INT_CONFIG)

    def interrupt(self, kind: int) -> None:
        """Raise the device's interrupt (an edge, as the line is configured)."""
        self.interrupt_status |= kind
        if self.pulse:
            self.pulse()
        elif self.irq:
            self.irq(1)
            self.irq(0)

    # --- state ------------------------------------------------------------------------------
    def save_state(self) -> dict:
        with self.lock:
            return {"status": self.status, "driver_features": self.driver_features,
                    "offered": self.offered, "interrupt_status": self.interrupt_status,
                    "queue_sel": self.queue_sel, "dev_features_sel": self.dev_features_sel,
                    "drv_features_sel": self.drv_features_sel,
                    "config_generation": self.config_generation,
                    "queues": [q.save_state() for q in self.queues],
                    "device": self.device.save_state()}

    def check_state(self, state: dict) -> str | None:
        """What would make ``state`` unusable here (Firecracker's checks on restore): the
        same features offered, acked within offered, the same number of queues, each
        ready queue's size and rings usable in this RAM."""
        if state["offered"] != self.offered:
            return (f"{self.device.name} offered features {state['offered']:#x}, this one "
                    f"offers {self.offered:#x}")
        if state["driver_features"] & ~state["offered"]:
            return f"{self.device.name}: the driver's features were never offered"
        if len(state["queues"]) != len(self.queues):
            return f"{self.device.name} has {len(state['queues'])} queues, want {len(self.queues)}"
        for i, qs in enumerate(state["queues"]):
            probe = Queue(self.memory)
            probe.restore_state(qs)
            if probe.ready and probe.check():
                return f"{self.device.name} queue {i}: {probe.check()}"
        return None

    def restore_state(self, state: dict) -> None:
        with self.lock:
            for name in ("status", "driver_features", "interrupt_status", "queue_sel",
                         "dev_features_sel", "drv_features_sel", "config_generation"):
                setattr(self, name, state[name])
            for q, qs in zip(self.queues, state["queues"]):
                q.restore_state(qs)
            self.device.restore_state(state["device"])
