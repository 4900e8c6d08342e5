"""Standard input to the guest's COM1 (`run`/`restore` on a terminal, or with
--console-input); held back and handed on when the guest migrates to a new process
(migrate/guest_migrate.py)."""

from __future__ import annotations

import os
import sys
import threading


class ConsoleInput:
    """Standard input -> the guest's COM1; held back (and later handed on) once a
    migration has been asked for."""

    def __init__(self, machine, always: bool):
        self.machine = machine
        self.enabled = always or sys.stdin.isatty()
        self._lock = threading.Lock()
        self._held: bytearray | None = None
        self._held_eof = False                # standard input ended while held
        self._sink = None                     # the new process's stdin, once it exists

    def start(self) -> None:
        if self.enabled:
            threading.Thread(target=self._pump, name="console-input", daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(sys.stdin.fileno(), 4096)
            except OSError:
                data = b""
            with self._lock:
                if self._sink is not None:
                    self._write_sink(data)
                elif self._held is not None:
                    if data:
                        self._held += data
                    else:
                        self._held_eof = True
                elif data and self.machine.running:
                    self.machine.console.send(data)
            if not data:
                return

    def _write_sink(self, data: bytes) -> None:
        try:
            if data:
                self._sink.write(data)
                self._sink.flush()
            else:
                self._sink.close()
        except (BrokenPipeError, ValueError):
            pass

    def hold(self) -> None:
        with self._lock:
            if self._held is None:
                self._held = bytearray()

    def release(self) -> None:
        """The migration did not happen: what was held goes to the guest after all."""
        with self._lock:
            held, self._held = self._held, None
            if held:
                self.machine.console.send(bytes(held))

    def hand_to(self, sink) -> None:
        with self._lock:
            held, self._held = self._held or b"", None
            self._sink = sink
            if held:
                self._write_sink(bytes(held))
            if self._held_eof:
                self._write_sink(b"")
