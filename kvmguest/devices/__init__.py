"""The devices of a small PC: a port-I/O bus, a 16550 UART, debug-exit, the kvmguest port,
and what test kernels expect of QEMU's PC (fw_cfg, pc-testdev, CMOS/RTC, ACPI PM and reset);
virtio devices on virtio-mmio (virtio/)."""

import ctypes

from .acpi_pm import AcpiPm
from .bus import PortBus
from .cmos import Cmos
from .debug_exit import DebugExit
from .fw_cfg import FwCfg
from .guest_port import GuestPort
from .serial import Serial
from .testdev import PcTestdev

from .fields import check_fields
from . import cmos, fw_cfg
from .virtio import DeviceSpec, VirtioDevices
from .virtio import check_state as check_virtio_state

__all__ = ["PortBus", "Serial", "DebugExit", "FwCfg", "PcTestdev", "Cmos", "AcpiPm",
           "GuestPort", "DEVICE_TYPES", "DeviceSpec", "Devices", "check_device_states"]

# Where the PC has them (QEMU's addresses, which test kernels expect).
COM1_PORT, COM1_IRQ = 0x3F8, 4
DEBUG_EXIT_PORT = 0xF4
GUEST_PORT = 0xF8                # the kvmguest port (guest_port.py)

# The devices whose state a snapshot carries, by the name it is saved under.
DEVICE_TYPES = {"serial": Serial, "debug_exit": DebugExit, "fw_cfg": FwCfg,
                "testdev": PcTestdev, "cmos": Cmos, "acpi_pm": AcpiPm, "guest_port": GuestPort}


def check_device_states(devices) -> str | None:
    """What is wrong with a snapshot's device states (None: nothing): every device known,
    every field of the right type and range (each device's STATE_FIELDS)."""
    if not isinstance(devices, dict):
        return "device state is not an object"
    for name, state in devices.items():
        if name.startswith("virtio-"):
            problem = check_virtio_state(name, state)
            if problem:
                return problem
            continue
        kind = DEVICE_TYPES.get(name)
        if kind is None:
            return f"unknown device {name!r} in the state"
        problem = check_fields(name, state, kind.STATE_FIELDS,
                               getattr(kind, "STATE_REQUIRED", ()))
        if problem:
            return problem
    return None


class Devices:
    """A machine's devices, each under the name its state is saved by (DEVICE_TYPES):
    built together, their ports registered on one bus, saved and restored by name.

    ``irq_line(line, level)`` drives the in-kernel irqchip's ISA lines (None: a machine
    without one: no device interrupts); ``on_power(kind)`` hears the guest ask to power
    off, reset or suspend; ``on_rtc_alarm()`` the RTC alarm."""

    def __init__(self, memory, vcpus: int, irq_line=None, stream=None,
                 console_capacity: int = 1 << 20, on_power=None, on_rtc_alarm=None,
                 virtio=(), vm=None):
        serial_irq = (lambda level: irq_line(COM1_IRQ, level)) if irq_line else None
        self.serial = Serial(capacity=console_capacity, stream=stream, irq=serial_irq)
        self.debug_exit = DebugExit()
        self.guest_port = GuestPort()
        self.fw_cfg = FwCfg(memory.size, vcpus, max(r.gpa + r.size for r in memory.regions))
        self.testdev = PcTestdev(memory, irq=irq_line)
        self.cmos = Cmos(memory.size, irq=irq_line)
        self.cmos.on_alarm = on_rtc_alarm
        self.acpi_pm = AcpiPm(on_power)
        self.bus = PortBus()
        self.bus.register(COM1_PORT, 8, self.serial)
        self.bus.register(DEBUG_EXIT_PORT, 4, self.debug_exit)
        self.bus.register(GUEST_PORT, 4, self.guest_port)
        self.bus.register(fw_cfg.SELECTOR_PORT, fw_cfg.PORTS, self.fw_cfg)
        self.bus.register(cmos.PORT, cmos.PORTS, self.cmos)
        for base, count, handler in self.testdev.ports() + self.acpi_pm.ports():
            self.bus.register(base, count, handler)
        self.virtio = VirtioDevices(memory, virtio, self.serial, irq_line, vm)

    def handle_mmio(self, ex) -> bool:
        """An MMIO exit in one of our windows carried out (False: nobody's)."""
        return self.testdev.handle_mmio(ex) or self.virtio.handle_mmio(
            ex, lambda e: ctypes.string_at(e.data_addr, e.length),
            lambda e, data: ctypes.memmove(e.data_addr, data, e.length))

    def save_state(self) -> dict:
        return {**{name: getattr(self, name).save_state() for name in DEVICE_TYPES},
                **self.virtio.save_state()}

    def restore_state(self, saved: dict) -> None:
        """Each device in ``saved`` (checked by check_device_states) takes its state; a
        device an older snapshot lacks keeps its reset state."""
        for name in DEVICE_TYPES:
            if isinstance(saved.get(name), dict):
                getattr(self, name).restore_state(saved[name])
        self.virtio.restore_state(saved)

    def check_restore(self, saved: dict) -> str | None:
        """What makes ``saved`` unusable by these devices (virtio: features, queues)."""
        for name, t in self.virtio.transports.items():
            if name not in saved:
                return f"the snapshot has no state for {name}"
            problem = t.check_state(saved[name])
            if problem:
                return problem
        return None

    def close(self) -> None:
        self.cmos.close()
        self.virtio.close()
