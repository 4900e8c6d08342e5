"""Migration when the guest asks for it: `kvmguest run/restore --guest-migrate`.

The guest writes MIGRATE to the kvmguest port (kvmguest/devices/guest_port.py) at a
point of its choosing; its vCPU is held right after the OUT. This process then
live-saves the guest to a temporary snapshot (the guest stops here) and carries it on in
a new ``kvmguest restore --guest-migrate`` process, which inherits the console (stdout)
and gets the standard input the guest was reading: input that arrives from the request
on is held back and handed to the new process, so no keystroke is lost or read twice.
The first process waits for the second and exits with its status; the temporary
snapshot is removed when the new process is done with it. If the save fails, the guest
runs on here and, reading the port, learns it was not migrated.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from kvmguest.console import ConsoleInput
from kvmguest.devices.guest_port import MIGRATE

log = logging.getLogger(__name__)


class GuestMigrator:
    """Listens for the guest's MIGRATE; after the run, :meth:`carry_on` starts the new
    process when a migration was saved."""

    def __init__(self, machine, console: ConsoleInput, argv_tail: list[str]):
        self.machine = machine
        self.console = console
        self.argv_tail = argv_tail            # options the new process gets (-q, --timeout)
        self.dir = tempfile.mkdtemp(prefix="kvmguest-migrate-")
        self.path: str | None = None
        self.error: BaseException | None = None
        self.requests = machine.listen_guest_requests()
        self._thread = threading.Thread(target=self._listen, name="guest-migrate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _listen(self) -> None:
        from .precopy import live_save
        m = self.machine
        while m.running:
            try:
                req, _ = self.requests.get(timeout=0.05)
            except queue.Empty:
                continue
            if req != MIGRATE:                # READY: nothing to do here; let it run on
                m.pause_all()
                m.resume_all()
                continue
            self.console.hold()
            path = os.path.join(self.dir, "guest.snap")
            try:
                t = time.perf_counter()
                live_save(m, path, then="stop")
                log.info("the guest asked to migrate: saved in %.1f ms",
                         (time.perf_counter() - t) * 1e3)
                self.path = path
                return
            except BaseException as err:      # noqa: BLE001 - the guest runs on
                self.error = err
                log.error("the guest asked to migrate; the save failed: %s", err)
                self.console.release()
                m.pause_all()
                m.resume_all()

    def carry_on(self, deadline: float | None) -> int | None:
        """After the machine stopped: run the new process (the exit status), or None
        when no migration was saved."""
        self._thread.join(1.0)
        if self.path is None:
            return None
        argv = [sys.executable, "-m", "kvmguest.cli", "restore", self.path, "--guest-migrate",
                *self.argv_tail]
        if deadline is not None:
            argv += ["--timeout", f"{max(deadline - time.monotonic(), 0.001):.3f}"]
        if self.console.enabled:
            argv.append("--console-input")
        sys.stdout.flush()
        child = subprocess.Popen(argv, stdin=subprocess.PIPE if self.console.enabled else
                                 subprocess.DEVNULL)
        if self.console.enabled:
            self.console.hand_to(child.stdin)
        return child.wait()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
