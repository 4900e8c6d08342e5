"""The PC's CMOS RTC (MC146818) at ports 0x70 (index; bit 7 masks NMI) and 0x71 (data).

The clock reads the host's UTC time plus an offset the guest sets by writing the time
registers, in BCD or binary and 12- or 24-hour form as register B says. Register A's
update-in-progress bit is set in the last 2 ms of every second, as the real part does
before each update. With the alarm interrupt enabled (register B AIE), a thread raises
IRQ 8 when the alarm registers match (0xC0-0xFF is "any"), sets AF and IRQF in
register C (cleared by reading it) and calls ``on_alarm`` (an ACPI wake-up). The rest of
the 128 bytes is battery-backed RAM; the memory size is recorded where a PC BIOS does."""

from __future__ import annotations

import threading
import time

from .fields import hex_bytes, seconds, uint

PORT = 0x70
PORTS = 2
IRQ = 8
SEC, SEC_ALARM, MIN, MIN_ALARM, HOUR, HOUR_ALARM, WEEKDAY, DAY, MONTH, YEAR = range(10)
REG_A, REG_B, REG_C, REG_D = 10, 11, 12, 13
CENTURY = 0x32
A_UIP = 0x80
B_SET, B_PIE, B_AIE, B_UIE, B_DM_BINARY, B_24H = 0x80, 0x40, 0x20, 0x10, 0x04, 0x02
C_IRQF, C_AF = 0x80, 0x20
D_VRT = 0x80
DONT_CARE = 0xC0
UIP_WINDOW = 0.002              # seconds before each update with UIP set


def _bcd(n: int) -> int:
    return ((n // 10) << 4) | (n % 10)


def _unbcd(n: int) -> int:
    return (n >> 4) * 10 + (n & 0xF)


class Cmos:

    STATE_FIELDS = {"index": uint(7), "ram": hex_bytes(128, exact=True), "offset": seconds}

    def __init__(self, ram_size: int = 0, irq=None, clock=time.time):
        self.irq = irq                   # irq(line, level), None without an irqchip
        self.clock = clock
        self.on_alarm = None             # called (no arguments) when the alarm fires
        self.index = 0
        self.offset = 0.0                # guest time - host time, seconds
        self.ram = bytearray(128)
        self.ram[REG_A], self.ram[REG_B], self.ram[REG_D] = 0x26, B_24H, D_VRT
        self._record_memory(ram_size)
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def _record_memory(self, ram_size: int) -> None:
        """Where PC firmware keeps the memory size (KiB above 1 MiB, 64 KiB above 16 MiB)."""
        ext = min(max(ram_size - (1 << 20), 0) >> 10, 0xFFFF)
        above16 = min(max(min(ram_size, 3 << 30) - (16 << 20), 0) >> 16, 0xFFFF)
        self.ram[0x17:0x19] = self.ram[0x30:0x32] = ext.to_bytes(2, "little")
        self.ram[0x34:0x36] = above16.to_bytes(2, "little")
        self.ram[0x15:0x17] = (640).to_bytes(2, "little")

    # --- the clock ---------------------------------------------------------------------
    def _now(self) -> float:
        return self.clock() + self.offset

    def _encode(self, n: int) -> int:
        return n if self.ram[REG_B] & B_DM_BINARY else _bcd(n)

    def _decode(self, n: int) -> int:
        return n if self.ram[REG_B] & B_DM_BINARY else _unbcd(n)

    def _time_register(self, reg: int) -> int:
        t = time.gmtime(self._now())
        if reg == HOUR:
            hour = t.tm_hour
            if not self.ram[REG_B] & B_24H:
                pm = hour >= 12
                return self._encode(hour % 12 or 12) | (0x80 if pm else 0)
            return self._encode(hour)
        value = {SEC: t.tm_sec, MIN: t.tm_min, WEEKDAY: (t.tm_wday + 1) % 7 + 1,
                 DAY: t.tm_mday, MONTH: t.tm_mon, YEAR: t.tm_year % 100,
                 CENTURY: t.tm_year // 100}[reg]
        return self._encode(value)

    def _set_time_register(self, reg: int, value: int) -> None:
        t = time.gmtime(self._now())
        fields = [t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec]
        if reg == HOUR and not self.ram[REG_B] & B_24H:
            hour = self._decode(value & 0x7F) % 12
            fields[3] = hour + (12 if value & 0x80 else 0)
        else:
            where = {SEC: 5, MIN: 4, HOUR: 3, DAY: 2, MONTH: 1}
            if reg in where:
                fields[where[reg]] = self._decode(value)
            elif reg == YEAR:
                fields[0] = fields[0] // 100 * 100 + self._decode(value)
            elif reg == CENTURY:
                fields[0] = self._decode(value) * 100 + fields[0] % 100
            else:
                return
        try:
            import calendar            # here: its import (datetime) costs every boot ~10 ms
            wanted = calendar.timegm((*fields, 0, 0, 0))
        except (ValueError, OverflowError):
            return
        self.offset += wanted - int(self._now())

    # --- ports ---------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF
        with self._lock:
            reg = self.index
            if reg in (SEC, MIN, HOUR, WEEKDAY, DAY, MONTH, YEAR, CENTURY):
                return self._time_register(reg)
            if reg == REG_A:
                frac = self._now() % 1.0
                return (self.ram[REG_A] & 0x7F) | (A_UIP if frac >= 1 - UIP_WINDOW else 0)
            if reg == REG_C:
                value, self.ram[REG_C] = self.ram[REG_C], 0
                if value and self.irq is not None:
                    self.irq(IRQ, 0)
                return value
            return self.ram[reg]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            self.index = value & 0x7F
            return
        with self._lock:
            reg = self.index
            if reg in (SEC, MIN, HOUR, DAY, MONTH, YEAR, CENTURY):
                self._set_time_register(reg, value)
            elif reg in (REG_C, REG_D):
                return                        # read-only
            elif reg == REG_A:
                self.ram[REG_A] = value & 0x7F
            else:
                self.ram[reg] = value
            if reg == REG_B or reg in (SEC_ALARM, MIN_ALARM, HOUR_ALARM):
                self._arm()

    # --- the alarm ----------------------------------------------------------------------
    def _alarm_matches(self) -> bool:
        for reg, now in ((SEC_ALARM, SEC), (MIN_ALARM, MIN), (HOUR_ALARM, HOUR)):
            want = self.ram[reg]
            if want & DONT_CARE == DONT_CARE:
                continue
            if want != self._time_register(now):
                return False
        return True

    def _arm(self) -> None:
        """With AIE set, wake at the next second boundary to compare the alarm."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.ram[REG_B] & B_AIE:
            return
        delay = 1.0 - self._now() % 1.0 + 0.0005
        self._timer = threading.Timer(delay, self._tick)
        self._timer.daemon = True
        self._timer.start()

    def _tick(self) -> None:
        fired = False
        with self._lock:
            if self.ram[REG_B] & B_AIE and self._alarm_matches():
                self.ram[REG_C] |= C_AF | C_IRQF
                fired = True
            self._arm()
        if fired:
            if self.irq is not None:
                self.irq(IRQ, 1)
            if self.on_alarm is not None:
                self.on_alarm()

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def save_state(self) -> dict:
        return {"index": self.index, "ram": self.ram.hex(), "offset": self.offset}

    def restore_state(self, state: dict) -> None:
        self.index = int(state.get("index", 0)) & 0x7F
        if state.get("ram"):
            raw = bytes.fromhex(state["ram"])
            if len(raw) == 128:
                self.ram[:] = raw
        self.offset = float(state.get("offset", 0.0))
        with self._lock:
            self._arm()
