"""The devices of a small PC: a port-I/O bus, a 16550 UART, debug-exit, the kvmguest port,
and what test kernels expect of QEMU's PC (fw_cfg, pc-testdev, CMOS/RTC, ACPI PM and reset)."""

from .acpi_pm import AcpiPm
from .bus import PortBus
from .cmos import Cmos
from .debug_exit import DebugExit
from .fw_cfg import FwCfg
from .guest_port import GuestPort
from .serial import Serial
from .testdev import PcTestdev

from .fields import check_fields

__all__ = ["PortBus", "Serial", "DebugExit", "FwCfg", "PcTestdev", "Cmos", "AcpiPm",
           "GuestPort", "DEVICE_TYPES", "check_device_states"]

# The devices whose state a snapshot carries, by the name it is saved under.
DEVICE_TYPES = {"serial": Serial, "debug_exit": DebugExit, "fw_cfg": FwCfg,
                "testdev": PcTestdev, "cmos": Cmos, "acpi_pm": AcpiPm, "guest_port": GuestPort}


def check_device_states(devices) -> str | None:
    """What is wrong with a snapshot's device states (None: nothing): every device known,
    every field of the right type and range (each device's STATE_FIELDS)."""
    if not isinstance(devices, dict):
        return "device state is not an object"
    for name, state in devices.items():
        kind = DEVICE_TYPES.get(name)
        if kind is None:
            return f"unknown device {name!r} in the state"
        problem = check_fields(name, state, kind.STATE_FIELDS,
                               getattr(kind, "STATE_REQUIRED", ()))
        if problem:
            return problem
    return None
