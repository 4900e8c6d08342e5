"""Migration when the guest asks for it: `kvmguest run/restore --guest-migrate`.

The guest writes MIGRATE to the kvmguest port (kvmguest/devices/guest_port.py) at a
point of its choosing; its vCPU is held right after the OUT. This process then
live-saves the guest to a temporary snapshot (the guest stops here), closes the machine
(its RAM is freed) and replaces itself (exec) with ``kvmguest restore --guest-migrate``
of that snapshot: same process, same console, the standard input the guest was reading
(bytes that arrived from the request on were held back and travel in a memfd, so no
keystroke is lost or read twice). The new image removes the temporary snapshot as soon
as the guest is restored from it, so at any time one process and at most one snapshot
hold the guest. Each hop lowers ``--max-migrations``; a request beyond it, or one whose
save fails, is refused: the guest runs on here and, reading the port, learns it was not
migrated. Repeated refusals are logged a few times, then counted.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import stat
import sys
import tempfile
import threading
import time

from kvmguest.front.console import ConsoleInput
from kvmguest.devices.guest_port import MIGRATE
from kvmguest.errors import Handover
from kvmguest.loglimit import LogLimit

log = logging.getLogger(__name__)

DIR_ENV = "KVMGUEST_MIGRATION_DIR"      # the temporary folder the new image removes
DIR_PREFIX = "kvmguest-migrate-"
DEFAULT_MAX_MIGRATIONS = 16


class GuestMigrator:
    """Listens for the guest's MIGRATE; after the run, :meth:`hand_over` carries the
    guest on when a migration was saved."""

    def __init__(self, machine, console: ConsoleInput, argv_tail: list[str],
                 max_migrations: int = DEFAULT_MAX_MIGRATIONS):
        self.machine = machine
        self.console = console
        self.argv_tail = argv_tail            # options the new process gets (-q, --timeout)
        self.max_migrations = max_migrations  # hops left, this one included
        self.dir: str | None = None
        self.path: str | None = None
        self.error: BaseException | None = None
        self.refusals = LogLimit(log, first=3)
        self.requests = machine.listen_guest_requests()
        self._thread = threading.Thread(target=self._listen, name="guest-migrate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _listen(self) -> None:
        from migrate.precopy import live_save
        m = self.machine
        while m.running:
            try:
                req, _ = self.requests.get(timeout=0.05)
            except queue.Empty:
                continue
            if req != MIGRATE:                # READY: nothing to do here; let it run on
                self._run_on()
                continue
            if self.max_migrations <= 0:
                self.refusals(logging.WARNING, "the guest asked to migrate again; "
                              "--max-migrations is reached, so it runs on in this process")
                self._run_on()
                continue
            self.console.hold()
            try:
                if self.dir is None:
                    self.dir = tempfile.mkdtemp(prefix=DIR_PREFIX)
                path = os.path.join(self.dir, "guest.snap")
                t = time.perf_counter()
                live_save(m, path, then="stop")
                log.info("the guest asked to migrate: saved in %.1f ms",
                         (time.perf_counter() - t) * 1e3)
                self.path = path
                return
            except BaseException as err:      # noqa: BLE001 - the guest runs on
                self.error = err
                self.refusals(logging.ERROR, "the guest asked to migrate; the save failed: %s",
                              err)
                self.console.release()
                self._run_on()

    def _run_on(self) -> None:
        """Release the vCPU held at its request."""
        self.machine.pause_all()
        self.machine.resume_all()

    def hand_over(self, deadline: float | None) -> None:
        """After the machine stopped: when a migration was saved, raise Handover (the CLI
        execs the new image once everything here is closed); else return."""
        self._thread.join(1.0)
        self.refusals.close()
        if self.path is None:
            return
        argv = [sys.executable, "-m", "kvmguest", "restore", self.path, "--guest-migrate",
                "--max-migrations", str(self.max_migrations - 1), *self.argv_tail]
        if deadline is not None:
            argv += ["--timeout", f"{max(deadline - time.monotonic(), 0.001):.3f}"]
        held, stdin_ended = self.console.hand_over()
        if self.console.enabled:
            argv.append("--console-input")
        env = dict(os.environ, **held)
        env[DIR_ENV] = self.dir
        self.dir = None                       # the new image removes it
        raise Handover(argv, env, self.path, stdin_ended)

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def remove_inherited_snapshot(path: str) -> None:
    """In the image a migration handed over to: once the guest is restored (or the
    restore failed), remove the temporary folder of the snapshot it came from. Only a
    folder of ours: named as we name them, owned by us, holding ``path``."""
    folder = os.environ.pop(DIR_ENV, None)
    if not folder:
        return
    try:
        st = os.lstat(folder)
        if (os.path.basename(folder).startswith(DIR_PREFIX) and stat.S_ISDIR(st.st_mode)
                and st.st_uid == os.getuid()
                and os.path.dirname(os.path.abspath(path)) == os.path.abspath(folder)):
            shutil.rmtree(folder, ignore_errors=True)
    except OSError:
        pass
