"""virtio devices on the virtio-mmio transport: block, console and entropy. Each device
gets a 4 KiB window from layout.VIRTIO_MMIO_BASE and an ISA interrupt line of its own (an
edge, as Firecracker's); a Linux guest is told where they are on its command line
(``virtio_mmio.device=4K@ADDR:IRQ``). Requests are carried out in the vCPU thread that
notifies a queue: none is in flight while the guest is paused."""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field

from ...arch.x86 import layout
from ..fields import boolean, uint
from .blk import Blk, DiskError, check_overlay_state
from .console import Console
from .net import Net, NetError, parse_mac
from .mmio import MAGIC, VERSION, WINDOW, MmioTransport
from .rng import Rng

log = logging.getLogger(__name__)
IRQS = (5, 6, 7, 10, 11, 12, 14, 15)      # ISA lines no other device of ours uses
EMPTY_WINDOW = struct.pack("<III", MAGIC, VERSION, 0)      # magic, version, device ID 0
KINDS = {"blk": Blk, "console": Console, "net": Net, "rng": Rng}
MAX_DEVICES = len(IRQS)

__all__ = ["DeviceSpec", "DiskError", "NetError", "VirtioDevices", "check_state",
           "parse_mac"]


@dataclass(frozen=True)
class DeviceSpec:
    """A device to create: ``kind`` (blk, console, net, rng) and its options (blk: path,
    readonly, overlay; net: ifname, mac)."""
    kind: str
    options: dict = field(default_factory=dict)


class VirtioDevices:
    """The machine's virtio devices, by name (``virtio-blk0``, ...), each on its window."""

    def __init__(self, memory, specs, serial, irq_line=None, vm=None):
        """``vm`` (with ``irq_line``: the in-kernel irqchip): interrupts through irqfds.
        Notifications stay MMIO exits, carried out in the vCPU that made them: measured
        here, an ioeventfd served by an I/O thread frees the vCPU sooner (a notify 0.3x
        the cost of an exit) but makes a request slower end to end (1.35x: the thread
        must wake) and a Linux boot no faster (docs/devices.md)."""
        if len(specs) > MAX_DEVICES:
            raise ValueError(f"{len(specs)} virtio devices: at most {MAX_DEVICES}")
        self.transports: dict[str, MmioTransport] = {}
        self._irqfds: list[int] = []
        counts: dict[str, int] = {}
        try:
            for i, spec in enumerate(specs):
                n = counts[spec.kind] = counts.get(spec.kind, -1) + 1
                if spec.kind == "blk":
                    dev = Blk(memory, spec.options["path"], spec.options.get("readonly", False),
                              n, spec.options.get("expect"), spec.options.get("overlay", False))
                elif spec.kind == "console":
                    dev = Console(memory, serial, n)
                elif spec.kind == "net":
                    mac = spec.options.get("mac") or bytes((0x52, 0x54, 0, 0x12, 0x34, 0x56 + n))
                    dev = Net(memory, spec.options["ifname"], mac, n)
                else:
                    dev = Rng(memory, n)
                irq = IRQS[i]
                line = (lambda level, irq=irq: irq_line(irq, level)) if irq_line else None
                self.transports[dev.name] = MmioTransport(dev, memory,
                                                          layout.VIRTIO_MMIO_BASE + i * WINDOW,
                                                          line)
            self.irqs = {name: IRQS[i] for i, name in enumerate(self.transports)}
            if vm is not None and irq_line is not None and self.transports:
                self._irqfds_for(vm)
        except BaseException:
            self.close()
            raise

    def _irqfds_for(self, vm) -> None:
        """An irqfd per device: one write pulses its line (0.4x the cost of the two
        KVM_IRQ_LINE ioctls of an edge, measured here)."""
        try:
            for name, t in self.transports.items():
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._irqfds.append(efd)
                vm.irqfd(efd, self.irqs[name])
                t.pulse = lambda efd=efd: os.eventfd_write(efd, 1)
        except OSError as err:           # a KVM without irqfd: KVM_IRQ_LINE, as before
            log.info("virtio: no irqfd (%s): interrupts by KVM_IRQ_LINE", err.strerror)
            for t in self.transports.values():
                t.pulse = None

    def pause_hooks(self) -> list[tuple]:
        """(hold, release) of each device that writes guest RAM from a thread of its own:
        the machine's pause holds it (no such write while the guest is paused)."""
        return [(t.device.hold, t.device.release) for t in self.transports.values()
                if hasattr(t.device, "hold")]

    def resources(self) -> list[tuple[int, int]]:
        """(window base, interrupt line) of each device, for the ACPI tables."""
        return [(t.base, self.irqs[name]) for name, t in self.transports.items()]

    def handle_mmio(self, ex, read, write) -> bool:
        """An access to a device's window, or to an empty one (as QEMU's microvm, every
        window answers: an empty one is a transport with device ID 0, "no device")."""
        off = ex.gpa - layout.VIRTIO_MMIO_BASE
        if not (0 <= off and off + ex.length <= MAX_DEVICES * WINDOW):
            return False
        for t in self.transports.values():
            if t.contains(ex.gpa, ex.length):
                if ex.is_write:
                    t.write(ex.gpa - t.base, read(ex))
                else:
                    write(ex, t.read(ex.gpa - t.base, ex.length))
                return True
        if not ex.is_write:
            write(ex, EMPTY_WINDOW[off % WINDOW:off % WINDOW + ex.length].ljust(ex.length,
                                                                               b"\0"))
        return True

    def save_state(self) -> dict:
        return {name: {**t.save_state(), "index": i}
                for i, (name, t) in enumerate(self.transports.items())}

    def restore_state(self, saved: dict) -> None:
        for name, t in self.transports.items():
            t.restore_state(saved[name])

    def close(self) -> None:
        for t in self.transports.values():
            t.device.close()
        for efd in self._irqfds:
            os.close(efd)
        self._irqfds = []


# --- a snapshot's virtio state, checked before any device exists -------------------------
_QUEUE = {"size": uint(16), "ready": boolean, "desc": uint(64), "avail": uint(64),
          "used": uint(64), "next_avail": uint(16), "next_used": uint(16)}
STATE_FIELDS = {"status": uint(8), "driver_features": uint(64), "offered": uint(64),
                "interrupt_status": uint(2), "queue_sel": uint(32),
                "dev_features_sel": uint(32), "drv_features_sel": uint(32),
                "config_generation": uint(32), "index": uint(8)}


def _list(v) -> bool:
    return isinstance(v, list) and len(v) <= 8


_list.what = "a list of at most 8 queues"


def _object(v) -> bool:
    return isinstance(v, dict)


_object.what = "an object"


def check_state(name: str, state) -> str | None:
    """What is wrong with a virtio device's saved state (types and ranges), or None."""
    from ..fields import check_fields
    kind = name.removeprefix("virtio-").rstrip("0123456789")
    if kind not in KINDS:
        return f"unknown device {name!r} in the state"
    problem = check_fields(name, state, {**STATE_FIELDS, "queues": _list, "device": _object},
                           tuple(STATE_FIELDS) + ("queues", "device"))
    if problem:
        return problem
    for i, q in enumerate(state["queues"]):
        problem = check_fields(f"{name} queue {i}", q, _QUEUE, tuple(_QUEUE))
        if problem:
            return problem
    if kind == "net":
        d = state["device"]
        if not isinstance(d.get("ifname"), str) or not isinstance(d.get("mac"), str) \
                or len(d["mac"]) != 12:
            return f"{name}: the state does not name its tap and MAC"
    if kind == "console":
        text = state["device"].get("input", "")
        if not isinstance(text, str) or len(text) > 2 * (1 << 20) or len(text) % 2 or \
                any(c not in "0123456789abcdef" for c in text):
            return f"{name}: its waiting input is not at most 1 MiB of hex"
    if kind == "blk":
        disk = state["device"].get("disk")
        if not isinstance(disk, dict) or not isinstance(disk.get("path"), str) or \
                not all(isinstance(disk.get(k), int) for k in ("size", "inode", "mtime_ns")):
            return f"{name}: the state does not name its disk"
        if "overlay" in state["device"]:
            problem = check_overlay_state(state["device"]["overlay"])
            if problem:
                return f"{name}: {problem}"
    return None


def kernel_parameters(specs) -> list[str]:
    """What tells Linux where the devices are (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES): each
    spec's window and line, by its position."""
    return [f"virtio_mmio.device=4K@{layout.VIRTIO_MMIO_BASE + i * WINDOW:#x}:{IRQS[i]}"
            for i in range(len(specs))]


def specs_from_state(devices: dict, disks: dict[str, str] | None = None) -> list[DeviceSpec]:
    """The virtio devices a saved machine had, in order (their windows and lines follow
    it), blk devices on their recorded images unless ``disks`` (name -> path) moves one."""
    out = []
    for name in sorted((n for n in devices if n.startswith("virtio-")),
                       key=lambda n: devices[n].get("index", 0)):
        kind = name.removeprefix("virtio-").rstrip("0123456789")
        d = devices[name]["device"]
        if kind == "blk":
            path = (disks or {}).get(name, d["disk"]["path"])
            out.append(DeviceSpec("blk", {"path": path, "readonly": bool(d.get("readonly")),
                                          "expect": d["disk"], "overlay": "overlay" in d}))
        elif kind == "net":
            out.append(DeviceSpec("net", {"ifname": d["ifname"], "mac": bytes.fromhex(d["mac"])}))
        else:
            out.append(DeviceSpec(kind))
    return out
