"""The few devices a small guest needs: a port-I/O bus, a 16550 UART, debug-exit."""

from .bus import PortBus
from .debug_exit import DebugExit
from .serial import Serial

__all__ = ["PortBus", "Serial", "DebugExit"]
