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

__all__ = ["PortBus", "Serial", "DebugExit", "FwCfg", "PcTestdev", "Cmos", "AcpiPm",
           "GuestPort"]
