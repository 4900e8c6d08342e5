"""QEMU's fw_cfg, the legacy port interface: write a 16-bit key to 0x510, read the
item's bytes one at a time from 0x511. kvm-unit-tests reads the CPU count and RAM size
here, and MAX_RAM (0x11, which kvm-unit-tests defines for bare metal). Only the items a
test kernel asks for exist; any other key reads as zeros."""

from __future__ import annotations

import struct

from .fields import uint

SELECTOR_PORT, DATA_PORT = 0x510, 0x511   # one range of 2 ports
PORTS = 2
SIGNATURE, ID, RAM_SIZE, NOGRAPHIC, NB_CPUS, MAX_CPUS, MAX_RAM, FILE_DIR = (
    0x00, 0x01, 0x03, 0x04, 0x05, 0x0F, 0x11, 0x19)
ID_TRADITIONAL = 1                        # port interface only, no DMA


class FwCfg:

    STATE_FIELDS = {"selector": uint(16), "offset": uint(32)}

    def __init__(self, ram_size: int, vcpus: int, ram_end: int | None = None):
        """``ram_end``: the top of guest-physical RAM (MAX_RAM, which kvm-unit-tests reads
        as the highest address it may allocate from; QEMU leaves it 0, "no limit")."""
        self.items = {
            SIGNATURE: b"QEMU",
            ID: struct.pack("<I", ID_TRADITIONAL),
            RAM_SIZE: struct.pack("<Q", ram_size),
            NOGRAPHIC: struct.pack("<H", 1),
            NB_CPUS: struct.pack("<H", vcpus),
            MAX_CPUS: struct.pack("<H", vcpus),
            MAX_RAM: struct.pack("<Q", ram_end or ram_size),
            FILE_DIR: struct.pack(">I", 0),       # no named files
        }
        self.selector = 0
        self.offset = 0

    def read(self, offset: int, size: int) -> int:
        if offset + size - 1 < DATA_PORT - SELECTOR_PORT:
            return (1 << (8 * size)) - 1          # the selector is write-only
        item = self.items.get(self.selector & 0x3FFF, b"")
        value = 0
        for i in range(size):                     # wider reads take consecutive bytes
            byte = item[self.offset] if self.offset < len(item) else 0
            value |= byte << (8 * i)
            self.offset += 1
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:                           # selecting an item rewinds it
            self.selector = value & 0xFFFF
            self.offset = 0

    def save_state(self) -> dict:
        return {"selector": self.selector, "offset": self.offset}

    def restore_state(self, state: dict) -> None:
        self.selector = int(state.get("selector", 0)) & 0xFFFF
        self.offset = max(0, int(state.get("offset", 0)))
