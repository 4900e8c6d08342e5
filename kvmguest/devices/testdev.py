"""QEMU's pc-testdev, which kvm-unit-tests' x86 tests drive:

- 0xe0-0xe3: a 32-bit scratch register, readable and writable at every width and offset;
  0xe8-0xeb: the same register, reached one byte per access (string I/O tests);
- 0xe4: write a guest-physical address to "flush" its page: the host mapping is
  write-protected and restored (GuestMemory.flush_page), so KVM drops its mapping;
- 0x2000-0x2017: a write sets ISA interrupt line (port - 0x2000) to the value's truth;
- 0xff000000: 64 KiB of MMIO scratch memory (emulated accesses, byte-exact)."""

from __future__ import annotations

import ctypes

from .fields import hex_bytes, uint


SCRATCH_PORT, FLUSH_PORT, SCRATCH_BYTE_PORT, IRQ_PORT = 0xE0, 0xE4, 0xE8, 0x2000
IRQ_LINES = 24
IOMEM_BASE, IOMEM_SIZE = 0xFF000000, 0x10000


class _Scratch:
    def __init__(self, dev: "PcTestdev"):
        self.dev = dev

    def read(self, offset: int, size: int) -> int:
        return (self.dev.scratch >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        mask = ((1 << (8 * size)) - 1) << (8 * offset)
        self.dev.scratch = (self.dev.scratch & ~mask & 0xFFFFFFFF) | ((value << (8 * offset)) & mask)


class _WriteOnly:
    """Ports that only take writes (``on_write(offset, value)``); reads float high."""

    def __init__(self, on_write):
        self.on_write = on_write

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        self.on_write(offset, value)


_ZEROS = bytes(IOMEM_SIZE)


class PcTestdev:
    """``irq(line, level)`` drives an ISA line (None: no irqchip); ``memory`` is the guest
    RAM whose pages a flush write-protects for a moment."""

    STATE_FIELDS = {"scratch": uint(32), "iomem": hex_bytes(IOMEM_SIZE)}

    def __init__(self, memory, irq=None):
        self.memory = memory
        self.irq = irq
        self.scratch = 0
        self.iomem = bytearray(IOMEM_SIZE)
        self.flushes = 0

    def ports(self):
        """(base, count, handler) for the port bus."""
        scratch = _Scratch(self)
        return [(SCRATCH_PORT, 4, scratch),
                (FLUSH_PORT, 4, _WriteOnly(lambda offset, value: self.flush_page(value))),
                (SCRATCH_BYTE_PORT, 4, scratch),
                (IRQ_PORT, IRQ_LINES, _WriteOnly(self.set_irq_line))]

    def set_irq_line(self, line: int, value: int) -> None:
        if self.irq is not None:
            self.irq(line, 1 if value else 0)

    def flush_page(self, gpa: int) -> None:
        if self.memory.flush_page(gpa):
            self.flushes += 1

    # MMIO window at IOMEM_BASE
    def handle_mmio(self, ex) -> bool:
        """Carry out an MMIO exit (kvmguest.exits.MmioExit) that falls in the window;
        False if it is not ours."""
        off = ex.gpa - IOMEM_BASE
        if not (0 <= off and off + ex.length <= IOMEM_SIZE):
            return False
        if ex.is_write:
            self.mmio_write(off, ctypes.string_at(ex.data_addr, ex.length))
        else:
            ctypes.memmove(ex.data_addr, self.mmio_read(off, ex.length), ex.length)
        return True

    def mmio_read(self, offset: int, size: int) -> bytes:
        return bytes(self.iomem[offset:offset + size]).ljust(size, b"\0")

    def mmio_write(self, offset: int, data: bytes) -> None:
        self.iomem[offset:offset + len(data)] = data[:IOMEM_SIZE - offset]

    def save_state(self) -> dict:
        state = {"scratch": self.scratch}
        if self.iomem != _ZEROS:      # a memcmp (~2 us, not count()'s 30): inside a pause
            state["iomem"] = self.iomem.hex()
        return state

    def restore_state(self, state: dict) -> None:
        self.scratch = int(state.get("scratch", 0)) & 0xFFFFFFFF
        if state.get("iomem"):
            raw = bytes.fromhex(state["iomem"])
            self.iomem = bytearray(raw[:IOMEM_SIZE].ljust(IOMEM_SIZE, b"\0"))
        else:                        # in place, at C speed: a reset does this every time
            self.iomem[:] = _ZEROS
