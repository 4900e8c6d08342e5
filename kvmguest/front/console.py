"""Standard input to the guest's COM1 (`run`/`restore` on a terminal, or with
--console-input); held back and handed on when the guest migrates to a new process
(kvmguest/guest_migrate.py): the bytes read but not yet given to the guest travel in a
memfd named by HELD_ENV, and standard input itself is inherited."""

from __future__ import annotations

import os
import select
import sys
import threading

HELD_ENV = "KVMGUEST_CONSOLE_HELD_FD"


class ConsoleInput:
    """Standard input -> the guest's COM1; held back (and later handed on) once a
    migration has been asked for."""

    def __init__(self, machine, always: bool):
        self.machine = machine
        self.enabled = always or sys.stdin.isatty()
        self._lock = threading.Lock()
        self._held: bytearray | None = None
        self._held_eof = False                # standard input ended while held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.enabled:
            inherited = take_inherited_input()
            if inherited:                     # what the previous process held, first
                self.machine.console.send(inherited)
            self._thread = threading.Thread(target=self._pump, name="console-input",
                                            daemon=True)
            self._thread.start()

    def _pump(self) -> None:
        fd = sys.stdin.fileno()
        while not self._stop.is_set():
            try:       # a bounded wait, so that stop() knows no read is half done
                if not select.select([fd], [], [], 0.05)[0]:
                    continue
                data = os.read(fd, 4096)
            except (OSError, ValueError):
                data = b""
            with self._lock:
                if self._held is not None:
                    if data:
                        self._held += data
                    else:
                        self._held_eof = True
                elif data and self.machine.running:
                    self.machine.console.send(data)
            if not data:
                return

    def stop(self) -> None:
        """Stop reading standard input (every byte read so far is held or delivered)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

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

    def hand_over(self) -> tuple[dict[str, str], bool]:
        """For the process that carries the guest on: the environment entry naming a
        memfd with the held bytes (inherited across exec), and whether standard input
        already ended."""
        self.stop()
        with self._lock:
            held, self._held = bytes(self._held or b""), None
        if not self.enabled:
            return {}, False
        fd = os.memfd_create("kvmguest-console-held", 0)      # inheritable: no CLOEXEC
        os.write(fd, held)
        os.lseek(fd, 0, os.SEEK_SET)
        return {HELD_ENV: str(fd)}, self._held_eof


def take_inherited_input() -> bytes:
    """The console input the previous process of a guest-requested migration held (see
    ConsoleInput.hand_over); the fd is closed and the variable removed."""
    value = os.environ.pop(HELD_ENV, "")
    if not value.isdigit():
        return b""
    fd, chunks = int(value), []
    try:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:kvmguest-console-held"):
            return b""          # not ours: leave it alone
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        os.close(fd)
    except OSError:
        return b""
    return b"".join(chunks)
