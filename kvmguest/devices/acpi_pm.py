"""The ACPI fixed hardware the FADT advertises, and the PC's reset port.

- PM1a event block (4 ports): PM1_STS (write 1 to clear) and PM1_EN;
- PM1a control (2 ports): SCI_EN reads as set (no SMI handshake: ACPI is always on);
  writing SLP_EN with SLP_TYP 0 powers off, with SLP_TYP 1 enters S3 (the values of
  QEMU's PIIX4, which test kernels assume);
- PM timer (4 ports): 3.579545 MHz, 32 bits (the FADT says TMR_VAL_EXT), counted from
  the host's monotonic clock so that it runs on across a save and restore;
- reset control at 0xcf9: writing a value with bit 2 set resets the machine.

``on_event(kind)`` is called with "poweroff", "suspend" or "reset"."""

from __future__ import annotations

import time

from .fields import uint

PM_BASE = 0x600
PM1_EVT, PM1_CNT, PM_TMR = PM_BASE, PM_BASE + 4, PM_BASE + 8
PM1_EVT_LEN, PM1_CNT_LEN, PM_TMR_LEN = 4, 2, 4
RESET_PORT, RESET_VALUE = 0xCF9, 0x06
RESET_BIT = 0x04
PM_TIMER_HZ = 3579545
SCI_EN, SLP_EN = 0x0001, 0x2000
SLP_TYP_SHIFT, SLP_TYP_MASK = 10, 0x7
SLP_TYP_SOFT_OFF, SLP_TYP_S3 = 0, 1
STS_WAK, STS_RTC = 0x8000, 0x0400


class PmTimer:
    def __init__(self, clock=time.monotonic_ns):
        self.clock = clock
        self.base = clock()

    def count(self) -> int:
        return ((self.clock() - self.base) * PM_TIMER_HZ // 1_000_000_000) & 0xFFFFFFFF

    def read(self, offset: int, size: int) -> int:
        return (self.count() >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        pass

    def save_state(self) -> dict:
        return {"count": self.count()}

    def restore_state(self, state: dict) -> None:
        count = int(state.get("count", 0)) & 0xFFFFFFFF
        self.base = self.clock() - count * 1_000_000_000 // PM_TIMER_HZ


def _field(regs: int, offset: int, size: int) -> int:
    return (regs >> (8 * offset)) & ((1 << (8 * size)) - 1)


class Pm1Event:
    """PM1_STS (offset 0) and PM1_EN (offset 2)."""

    def __init__(self):
        self.status = 0
        self.enable = 0

    def read(self, offset: int, size: int) -> int:
        return _field(self.status | (self.enable << 16), offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        regs = (value & ((1 << (8 * size)) - 1)) << (8 * offset)
        if offset < 2:
            self.status &= ~(regs & 0xFFFF)          # write 1 to clear
        if offset + size > 2:
            mask = (((1 << (8 * size)) - 1) << (8 * offset)) >> 16
            self.enable = (self.enable & ~mask & 0xFFFF) | ((regs >> 16) & mask & 0xFFFF)


class Pm1Control:
    def __init__(self, on_event):
        self.on_event = on_event
        self.value = SCI_EN

    def read(self, offset: int, size: int) -> int:
        return _field(self.value | SCI_EN, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        mask = ((1 << (8 * size)) - 1) << (8 * offset)
        new = (self.value & ~mask) | ((value << (8 * offset)) & mask)
        self.value = (new & ~SLP_EN) | SCI_EN        # SLP_EN is write-only
        if new & SLP_EN:
            typ = (new >> SLP_TYP_SHIFT) & SLP_TYP_MASK
            if typ == SLP_TYP_SOFT_OFF:
                self.on_event("poweroff")
            elif typ == SLP_TYP_S3:
                self.on_event("suspend")


class ResetControl:
    def __init__(self, on_event):
        self.on_event = on_event
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value & 0x0E
        if value & RESET_BIT:
            self.on_event("reset")


class AcpiPm:
    """The PM1 blocks, the PM timer and the reset port, as one device with one state."""

    STATE_FIELDS = {"status": uint(16), "enable": uint(16), "control": uint(16),
                    "count": uint(32)}

    def __init__(self, on_event):
        self.event = Pm1Event()
        self.control = Pm1Control(on_event)
        self.timer = PmTimer()
        self.reset = ResetControl(on_event)

    def ports(self):
        return [(PM1_EVT, PM1_EVT_LEN, self.event), (PM1_CNT, PM1_CNT_LEN, self.control),
                (PM_TMR, PM_TMR_LEN, self.timer), (RESET_PORT, 1, self.reset)]

    def wake(self, status: int) -> bool:
        """Record a wake event; True when the guest enabled it (PM1_EN) to wake it."""
        self.event.status |= status | STS_WAK
        return bool(self.event.enable & status)

    def save_state(self) -> dict:
        return {"status": self.event.status, "enable": self.event.enable,
                "control": self.control.value, **self.timer.save_state()}

    def restore_state(self, state: dict) -> None:
        self.event.status = int(state.get("status", 0)) & 0xFFFF
        self.event.enable = int(state.get("enable", 0)) & 0xFFFF
        self.control.value = (int(state.get("control", 0)) & 0xFFFF & ~SLP_EN) | SCI_EN
        self.timer.restore_state(state)
