"""One guest's life in a `kvmguest run` or `kvmguest restore` process, once its machine
is booted or restored: console input, a control socket, continuous checkpoints, a live
save (run's --save), guest-requested migration, then the end the guest came to.

Both commands run a guest the same way, so they share this loop; cli.py only parses,
checks options and prints. The control socket is made by the caller (run makes it before
the guest boots) and is closed here, with every other helper, however the guest ends."""

from __future__ import annotations

import sys
import time

from kvmguest.errors import KvmguestError
from kvmguest.machine import GuestTimeout


class Session:
    """``args`` is the command's parsed options (run's or restore's: console_input,
    guest_migrate, max_migrations, quiet, verbose, timeout, checkpoint, every, save, ...);
    ``note`` tells the user one thing (cli prefixes it), ``show`` prints a save's summary."""

    def __init__(self, args, note, show):
        self.args, self.note, self.show = args, note, show
        self.saved = None             # the report of the last save (one that may stop it)

    def on_saved(self, report) -> None:
        self.saved = report
        self.show(report.summary())

    def listen(self):
        """The control socket, when asked for (a ControlServer, not yet attached)."""
        if not self.args.control:
            return None
        from kvmguest.front.control import ControlServer
        return ControlServer(self.args.control, on_saved=self.on_saved)

    def run(self, m, control):
        """Start the guest and run it to its end; returns its GuestResult. Raises
        errors.Handover when the guest asked to migrate and was saved for it."""
        args = self.args
        migrator = checkpoints = stub = None
        try:
            if control:
                control.attach(m)
            from kvmguest.front.console import ConsoleInput
            console = ConsoleInput(m, args.console_input)
            if args.guest_migrate:
                from kvmguest.front.guest_migrate import DEFAULT_MAX_MIGRATIONS, GuestMigrator
                tail = (["-q"] if args.quiet else []) + (["-v"] if args.verbose else [])
                migrator = GuestMigrator(m, console, tail, DEFAULT_MAX_MIGRATIONS
                                         if args.max_migrations is None
                                         else args.max_migrations)
            deadline = time.monotonic() + args.timeout if args.timeout is not None else None
            stub = self._gdb(m)
            m.start(paused=stub is not None and stub.holding)
            console.start()
            if migrator:
                migrator.start()
            if args.checkpoint:
                from migrate.checkpoint import Checkpointer
                checkpoints = Checkpointer(m, args.checkpoint, args.every or 1.0)
                checkpoints.start()
                if control:
                    control.attach(m, checkpoints)
                if stub:
                    stub.attach_checkpoints(checkpoints)
            if stub:
                stub.start()              # serves gdb once everything it may meet is in place
            if args.save and not self._live_save(m):
                return m.wait()
            try:
                result = m.wait(args.timeout)
            except GuestTimeout:
                if stub:
                    stub.end("the run's --timeout has passed")   # whatever gdb does
                raise
            except KvmguestError:
                if stub:
                    stub.linger(deadline)     # gdb may be looking at the crash
                raise
            if stub:
                stub.linger(deadline)         # gdb may still be looking at the ended guest
            if checkpoints is not None:
                checkpoints, running = None, checkpoints
                running.stop()            # raises what a checkpoint failed with
            if control:
                control.drain()           # a save over the socket may have stopped the guest
            if migrator:
                migrator.hand_over(deadline)          # raises Handover when it was saved
            return result
        finally:
            sys.stdout.flush()
            if stub:
                stub.close()
            if checkpoints is not None:
                checkpoints.stop()
            if control:
                control.close()           # cancels a save in progress, removes the socket
            if migrator:
                migrator.close()

    def _gdb(self, m):
        """The gdb stub, listening, when --gdb asked for it (not yet serving)."""
        if not getattr(self.args, "gdb", None):
            return None
        from kvmguest.front.gdb.server import GdbStub

        def snapshot(path: str) -> str:          # gdb's `monitor snapshot PATH`
            from migrate.precopy import live_save
            report = live_save(m, path, then="continue")
            return f"saved the stopped guest: {report.summary().splitlines()[0]}"

        stub = GdbStub(m, self.args.gdb, wait=self.args.gdb_wait == "yes", note=self.note,
                       snapshot=snapshot)
        self.note(f"gdb: {'the guest waits for gdb' if stub.holding else 'gdb can attach'} "
                  f"at {stub.where} (gdb -ex 'target remote {stub.where}')")
        return stub

    def _live_save(self, m) -> bool:
        """run's --save after --save-after seconds; False when the guest ended first."""
        args = self.args
        if m.wait_done(args.save_after):
            self.note(f"the guest finished before --save-after {args.save_after:g} s; "
                     "nothing saved")
            return False
        from migrate.precopy import live_save

        from kvmguest.front.progress import Progress
        progress = Progress("saving")
        try:
            report = live_save(m, args.save, threads=args.threads, direct=args.direct_io,
                               then=args.then, format=args.format,
                               downtime_ms=args.downtime, progress=progress)
        finally:
            progress.done()
        self.on_saved(report)
        return True
