"""QEMU's isa-debug-exit convention: the value the guest writes is its result."""

from __future__ import annotations

import threading

from .fields import optional, uint


class DebugExit:

    STATE_FIELDS = {"result": optional(uint(32))}

    def __init__(self):
        self.result: int | None = None
        self.fired = threading.Event()

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if self.result is None:
            self.result = value
        self.fired.set()

    def save_state(self) -> dict:
        return {"result": self.result}

    def restore_state(self, state: dict) -> None:
        self.result = state.get("result")
        if self.result is not None:
            self.fired.set()
        else:
            self.fired.clear()          # a reset to a snapshot taken before any exit
