"""Port-I/O bus: routes each access to the device that owns the port."""

from __future__ import annotations

import ctypes
import logging
from typing import Protocol

from ..loglimit import LogLimit

log = logging.getLogger(__name__)


class PortDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


class PortBus:
    """Maps port ranges to devices. Unknown ports read as all-ones; the first few are
    logged (once each), the rest counted: a guest scanning every port floods nothing."""

    def __init__(self):
        self._ranges: list[tuple[int, int, PortDevice]] = []
        self._unknown_seen: set[int] = set()
        self._unknown_log = LogLimit(log, first=16)
        self.unknown_accesses = 0

    def register(self, base: int, size: int, device: PortDevice) -> None:
        for b, s, _ in self._ranges:
            if base < b + s and b < base + size:
                raise ValueError(f"ports {base:#x}+{size} overlap {b:#x}+{s}")
        self._ranges.append((base, size, device))

    def _find(self, port: int):
        for base, size, dev in self._ranges:
            if base <= port < base + size:
                return dev, port - base
        return None, 0

    def _unknown(self, port: int, what: str) -> None:
        self.unknown_accesses += 1
        if port not in self._unknown_seen:
            self._unknown_seen.add(port)
            self._unknown_log(logging.INFO, "guest %s unknown port %#x (logged once per port)",
                              what, port)

    def read(self, port: int, size: int) -> int:
        dev, off = self._find(port)
        if dev is None:
            self._unknown(port, "read")
            return (1 << (8 * size)) - 1
        return dev.read(off, size)

    def write(self, port: int, size: int, value: int) -> None:
        dev, off = self._find(port)
        if dev is None:
            self._unknown(port, "wrote")
            return
        dev.write(off, size, value)

    def handle_io(self, ex) -> None:
        """Carry out a port-I/O exit (kvmguest.exits.IoExit): each of its ``count``
        accesses goes to the device; an IN's values land in the kvm_run page."""
        size = ex.size
        if ex.out:
            data = ctypes.string_at(ex.data_addr, size * ex.count)
            for i in range(ex.count):
                self.write(ex.port, size, int.from_bytes(data[i * size:(i + 1) * size], "little"))
        else:
            for i in range(ex.count):
                ctypes.memmove(ex.data_addr + i * size,
                               self.read(ex.port, size).to_bytes(size, "little"), size)
