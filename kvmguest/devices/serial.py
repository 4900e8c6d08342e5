"""A 16550 UART: enough of the register model for polling and interrupt-driven drivers.

Output is kept in a bounded buffer (the newest ``capacity`` bytes; older bytes are
counted as dropped) and optionally streamed to a callback. Input is a queue the guest
reads from RBR, with LSR.DR telling it that a byte is waiting. With an interrupt line
(``irq(level)``, the in-kernel irqchip's IRQ 4), the UART raises received-data and
transmitter-empty interrupts as IER enables them and reports them in IIR, as a 16550
does; without one, IER is stored but never acted on."""

from __future__ import annotations

import collections
import threading
from typing import Callable

from .fields import boolean, hex_bytes, registers

# Register offsets.
RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MSR_DCD_DSR_CTS = 0xB0
IIR_NO_INT, IIR_FIFO_ENABLED = 0x01, 0xC0
IIR_THRE, IIR_RDA = 0x02, 0x04
IER_RDA, IER_THRE = 0x01, 0x02


PANIC_MARK = b"Kernel panic - not syncing"
REGISTERS = ("ier", "lcr", "mcr", "scr", "dll", "dlm", "fcr")
MAX_INPUT = 1 << 20             # bytes of pending console input a saved state may hold


class Serial:
    STATE_FIELDS = {"regs": registers(REGISTERS), "input": hex_bytes(MAX_INPUT),
                    "thre_pending": boolean, "irq_level": boolean}
    STATE_REQUIRED = ("regs",)

    def __init__(self, capacity: int = 1 << 20, stream: Callable[[bytes], None] | None = None,
                 irq: Callable[[int], None] | None = None):
        self.capacity = capacity
        self.stream = stream
        self.irq = irq
        self.irq_level = 0           # what we last drove the line to
        self.thre_pending = False    # a transmitter-empty interrupt not yet acknowledged
        self._out = bytearray()
        self.dropped = 0
        self.panic_line: str | None = None   # Linux's "Kernel panic - not syncing" line
        self.watch_panics = False            # a Linux kernel's console (Machine sets it)
        self._in: collections.deque[int] = collections.deque()
        # Other consoles given the same input (virtio-console's hvc0): feed(data) each.
        self.input_listeners: list[Callable[[bytes], None]] = []
        self._lock = threading.Lock()
        self._line = threading.Condition(self._lock)    # notified at every newline
        self.regs = {"ier": 0, "lcr": 0x03, "mcr": 0x08, "scr": 0, "dll": 0x0C, "dlm": 0,
                     "fcr": 0}

    # --- host side ---
    @property
    def output(self) -> bytes:
        with self._lock:
            return bytes(self._out)

    def text(self) -> str:
        return self.output.decode("utf-8", "replace").replace("\r\n", "\n")

    def clear_output(self) -> None:
        """Forget the output captured so far (a test fixture's reset starts it afresh)."""
        with self._lock:
            self._out.clear()

    def feed(self, data: bytes) -> None:
        """Queue input for the guest (it gets a received-data interrupt if it enabled one)."""
        with self._lock:
            self._in.extend(data)
        self._update_irq()
        for listener in list(self.input_listeners):
            listener(data)

    send = feed

    def _pending(self) -> int:
        """The IIR code of the highest-priority pending interrupt (IIR_NO_INT if none)."""
        ier = self.regs["ier"]
        if ier & IER_RDA and self._in:
            return IIR_RDA
        if ier & IER_THRE and self.thre_pending:
            return IIR_THRE
        return IIR_NO_INT

    def _update_irq(self) -> None:
        if self.irq is None:
            return
        with self._lock:
            level = 0 if self._pending() == IIR_NO_INT else 1
            changed, self.irq_level = level != self.irq_level, level
        if changed:
            self.irq(level)

    def wait_for(self, text: str | bytes, timeout: float) -> bool:
        """Wait until the console output holds ``text`` (checked at each newline); a test's
        handshake with its guest instead of a sleep. False on timeout."""
        want = text.encode() if isinstance(text, str) else text
        with self._line:
            return self._line.wait_for(
                lambda: want in self._out or want in self._out.replace(b"\r\n", b"\n"),
                timeout)

    def emit(self, data: bytes) -> None:
        """Output another console device wrote (virtio's hvc0): it goes where this UART's
        does (the console text, the stream), line handling and panic watch included."""
        for byte in data:
            self._emit(byte)

    def _emit(self, byte: int) -> None:
        with self._lock:
            self._out.append(byte)
            if len(self._out) > self.capacity:
                excess = len(self._out) - self.capacity
                del self._out[:excess]
                self.dropped += excess
            if byte == 0x0A:
                self._line.notify_all()
                if self.watch_panics and self.panic_line is None:
                    self._watch_panic()
        if self.stream is not None:
            self.stream(bytes((byte,)))

    def _watch_panic(self) -> None:
        """At each newline: is the line Linux's panic line? (A panicked kernel spins
        forever; the machine ends the run when it sees this.)"""
        start = self._out.rfind(b"\n", max(0, len(self._out) - 512), len(self._out) - 1) + 1
        line = self._out[start:]
        if PANIC_MARK in line:
            self.panic_line = bytes(line).decode("utf-8", "replace").strip()

    # --- guest side ---
    def read(self, offset: int, size: int) -> int:
        dlab = self.regs["lcr"] & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                return self.regs["dll"]
            with self._lock:
                value = self._in.popleft() if self._in else 0
            self._update_irq()
            return value
        if offset == IER:
            return self.regs["dlm"] if dlab else self.regs["ier"]
        if offset == IIR_FCR:
            with self._lock:
                code = self._pending()
                if code == IIR_THRE:        # reading IIR acknowledges THRE
                    self.thre_pending = False
            self._update_irq()
            return code | (IIR_FIFO_ENABLED if self.regs["fcr"] & 1 else 0)
        if offset == LCR:
            return self.regs["lcr"]
        if offset == MCR:
            return self.regs["mcr"]
        if offset == LSR:
            with self._lock:
                ready = LSR_DR if self._in else 0
            return LSR_THRE | LSR_TEMT | ready
        if offset == MSR:
            return MSR_DCD_DSR_CTS
        return self.regs["scr"]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        dlab = self.regs["lcr"] & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                self.regs["dll"] = value
            else:
                self._emit(value)
                self.thre_pending = True    # sent at once: the THR is empty again
                self._update_irq()
        elif offset == IER:
            if dlab:
                self.regs["dlm"] = value
            else:
                if value & IER_THRE and not self.regs["ier"] & IER_THRE:
                    self.thre_pending = True  # enabling THRE with the THR empty: interrupt
                self.regs["ier"] = value & 0x0F
                self._update_irq()
        elif offset == IIR_FCR:
            self.regs["fcr"] = value
        elif offset == LCR:
            self.regs["lcr"] = value
        elif offset == MCR:
            self.regs["mcr"] = value
        elif offset == SCR:
            self.regs["scr"] = value

    def save_state(self) -> dict:
        with self._lock:
            return {"regs": dict(self.regs), "input": bytes(self._in).hex(),
                    "thre_pending": self.thre_pending, "irq_level": self.irq_level}

    def restore_state(self, state: dict) -> None:
        regs = state["regs"]
        if set(regs) != set(self.regs) or not all(
                isinstance(v, int) and 0 <= v <= 0xFF for v in regs.values()):
            raise ValueError("serial state has unknown registers or values")
        self.regs.update(regs)
        self.panic_line = None          # a reset to before a panic: the guest runs again
        with self._lock:
            self._in = collections.deque(bytes.fromhex(state.get("input", "")))
            self.thre_pending = bool(state.get("thre_pending", False))
            # The line level is remembered, not driven again: an interrupt raised before
            # the save is in the restored irqchip state (IOAPIC/PIC IRR) or was delivered
            # already; raising the line here would be a second edge, a second interrupt.
            self.irq_level = 1 if state.get("irq_level") else 0
