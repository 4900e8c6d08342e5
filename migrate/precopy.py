"""Live save: pre-copy passes while the guest runs, then a short stop-and-copy.

Pass 0 writes every non-zero page; each later pass rewrites what the dirty log (merged
with the VMM's own writes) reports. When the remaining dirty set would take no longer
than the downtime target at the measured bandwidth, or a pass/time limit is reached, the
vCPU is paused, the last dirty pages and the vCPU/device state are written, and the
file is made durable and renamed into place.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from kvmguest.dirty import merge_pages
from kvmguest.memory import PAGE_SIZE as PAGE
from kvmguest.state import read_machine

from .pageio import fault_point
from .errors import SaveError, check_cancel
from .writer import MappedWriter, PassStats

log = logging.getLogger(__name__)
CONVERGED_PAGES = 256        # a final set this small is not worth another pass


@dataclass
class SaveReport:
    path: str
    format: str
    passes: list[PassStats] = field(default_factory=list)
    downtime_ms: float = 0.0
    total_seconds: float = 0.0
    file_size: int = 0
    allocated: int = 0
    stop_reason: str = ""
    then: str = "stop"
    # Where the downtime went, in ms: pause (every vCPU parked), final harvest (the
    # last dirty set), last pages (written), state (the wait for the vCPU/VM/device state
    # read meanwhile); resume (--then continue: every vCPU running again) comes after.
    downtime_parts: dict = field(default_factory=dict)
    paused_at: float = 0.0       # time.perf_counter() when the final pause began
    postcopy: dict = field(default_factory=dict)   # a migration's post-copy: what followed

    @property
    def bytes_written(self) -> int:
        return sum(p.bytes_written for p in self.passes)

    @property
    def throughput(self) -> float:
        busy = sum(p.seconds for p in self.passes)
        return self.bytes_written / busy if busy else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bytes_written"] = self.bytes_written
        d["throughput"] = self.throughput
        return d

    def summary(self) -> str:
        if self.format == "migrate":
            lines = [f"migrated to {self.path}: {len(self.passes)} passes, "
                     f"{self.bytes_written / 2**20:.1f} MiB sent at "
                     f"{self.throughput / 2**20:.0f} MiB/s, downtime {self.downtime_ms:.1f} ms "
                     f"(to the destination's acknowledgement: {self.total_seconds:.2f} s in "
                     f"all); stopped iterating: {self.stop_reason}; the guest runs there"]
        else:
            lines = [f"saved {self.path} ({self.format}): {len(self.passes)} passes, "
                     f"{self.bytes_written / 2**20:.1f} MiB written at "
                     f"{self.throughput / 2**20:.0f} MiB/s, downtime {self.downtime_ms:.1f} ms, "
                     f"file {self.file_size / 2**20:.1f} MiB ({self.allocated / 2**20:.1f} MiB "
                     f"allocated); stopped iterating: {self.stop_reason}; guest {self.then}"]
        for p in self.passes:
            lines.append(f"  pass {p.index}: {p.pages_dirty} dirty, {p.pages_written} written, "
                         f"{p.pages_zero} zero, {p.seconds * 1e3:.1f} ms")
        if self.postcopy:
            pc = self.postcopy
            lines.append(f"  post-copy: {pc['pushed']} pages pushed, {pc['answered']} sent as "
                         f"the destination asked, in {pc['seconds'] * 1e3:.1f} ms")
        if self.downtime_parts:
            lines.append("  downtime: " + ", ".join(f"{k} {v:.2f} ms"
                                                     for k, v in self.downtime_parts.items()))
        return "\n".join(lines)


@dataclass(frozen=True)
class SaveOptions:
    """How a live save runs (live_save's keywords, checked there)."""
    threads: int = 1
    direct: bool = False
    downtime_ms: float = 50.0
    max_passes: int = 30
    max_seconds: float = 60.0
    min_passes: int = 1
    then: str = "stop"
    format: str = "mapped"
    tls: object = None               # migrate.live.Tls, for format "migrate" over TCP
    postcopy: str = "off"            # format "migrate": "auto", "now" or "off" (live.POSTCOPY_MODES)
    local: bool = False              # format "migrate": RAM handed over (shared memory)


def live_save(machine, path: str, *, threads: int = 1, direct: bool = False,
              downtime_ms: float = 50.0, max_passes: int = 30, max_seconds: float = 60.0,
              min_passes: int = 1,
              then: str = "stop", format: str = "mapped",
              progress: Callable[[str, float], None] | None = None,
              cancel: threading.Event | None = None, tls=None,
              postcopy: str = "auto", local: bool = False) -> SaveReport:
    """Save a running machine to ``path``; the guest keeps running until the final pause.

    ``min_passes`` pre-copy passes run even when the dirty set converges sooner (for
    measurements); ``max_passes`` and ``max_seconds`` bound the iteration.
    ``then`` is "stop" (the source guest ends) or "continue" (a live checkpoint). On any
    failure the temporary file is removed, a running guest is resumed, and SaveError is
    raised; the previous file at ``path`` is untouched. Setting ``cancel`` stops the
    save at its next chunk of pages with SaveCancelled, with the same clean-up.

    ``progress(what, fraction)`` is told how far the save is; the fraction never goes
    backwards (pass 0 is most of the work; later passes fill the rest as the dirty set
    shrinks).

    A migration (``format`` "migrate", ``path`` the destination's address) may switch to
    post-copy (``postcopy``: "now" after pass 0, "auto" when pre-copy does not converge,
    "off"): the guest then runs there before all its pages have gone; once the
    destination acknowledged, a failure is GuestLost and the guest is not resumed here.
    ``local``: the destination is a process on this host (unix:PATH) and the guest's RAM
    is shared memory (Machine's shared_memory): it is handed over, not copied."""
    if then not in ("stop", "continue"):
        raise SaveError(f"--then must be stop or continue, not {then!r}")
    if not machine.running:
        raise SaveError("the guest is not running")
    if format == "migrate":
        from .live import POSTCOPY_MODES
        if postcopy not in POSTCOPY_MODES:
            raise SaveError(f"post-copy must be one of {', '.join(POSTCOPY_MODES)}, "
                            f"not {postcopy!r}")
        if local:
            postcopy = "off"
    options = SaveOptions(threads, direct, downtime_ms, max_passes, max_seconds, min_passes,
                          then, format, tls, postcopy if format == "migrate" else "off",
                          local and format == "migrate")
    if not machine.save_lock.acquire(blocking=False):
        raise SaveError("a save of this guest is already in progress")
    try:
        return _live_save(machine, path, options, progress, cancel)
    finally:
        machine.save_lock.release()


def make_writer(format: str, path: str, memory, threads: int, direct: bool,
                cancel: threading.Event | None = None):
    if format == "mapped":
        return MappedWriter(path, memory, threads=threads, direct=direct, cancel=cancel)
    if format == "stream":
        from .formats.stream import StreamWriter
        return StreamWriter(path, memory, direct=direct, cancel=cancel)
    raise SaveError(f"unknown format {format!r} (mapped or stream)")


class _Progress:
    """Monotonic progress: pass 0 counts for PASS0_SHARE, later passes for the rest."""
    PASS0_SHARE = 0.8

    def __init__(self, report: Callable[[str, float], None] | None, total_pages: int):
        self.report, self.total, self.shown = report, max(total_pages, 1), 0.0

    def __call__(self, what: str, fraction: float) -> None:
        self.shown = max(self.shown, min(fraction, 1.0))
        if self.report:
            self.report(what, self.shown)

    def pass0(self, done_pages: int) -> None:
        self("pass 0", self.PASS0_SHARE * done_pages / self.total)

    def later(self, index: int, dirty: int, first_dirty: int) -> None:
        left = dirty / max(first_dirty, 1)
        self(f"pass {index}", self.PASS0_SHARE + (1 - self.PASS0_SHARE) * (1 - left) * 0.9)


def _live_save(machine, path: str, o: SaveOptions, progress, cancel) -> SaveReport:
    save = _Save(machine, path, o, progress, cancel)
    switch = sys.getswitchinterval()
    try:
        machine.msr_indices()                      # fetched now, not during the downtime
        save.client = machine.dirty.open("live save")   # from here on, every write is logged
        dirty = save.converge()
        state = save.stop_and_copy(dirty)
        save.writer.finish(state)
        save.shown("done", 1.0)
    except BaseException:
        sys.setswitchinterval(switch)
        save.writer.abort()
        if getattr(save.writer, "committed", False):
            machine.event = "lost"     # post-copy broke off: the destination ran the guest
            machine.stop()
        elif save.paused:
            machine.resume_all()   # nothing lost: the guest carries on as if no save happened
        if save.client is not None:
            save.client.close()
        raise
    finally:
        sys.setswitchinterval(switch)
    save.client.close()
    if o.then == "stop":
        machine.stop()
    report = save.report
    report.passes = save.writer.passes
    report.postcopy = getattr(save.writer, "postcopy_stats", {})
    if o.format != "migrate":
        st = os.stat(report.path)
        report.file_size, report.allocated = st.st_size, st.st_blocks * 512
    report.total_seconds = time.perf_counter() - save.t0
    log.info("%s", report.summary())
    return report


class _Save:
    """One live save in progress: pre-copy passes until the rest fits the downtime target
    (:meth:`converge`), then the pause in which the last pages and the state are taken
    (:meth:`stop_and_copy`)."""

    def __init__(self, machine, path: str, o: SaveOptions, progress, cancel):
        self.t0 = time.perf_counter()
        self.machine, self.o, self.cancel = machine, o, cancel
        if o.format == "migrate":                     # path: the destination's address
            from kvmguest.state import machine_shape
            from .live import SocketWriter
            self.writer = SocketWriter(path, machine.memory, cancel, o.tls,
                                       machine_shape(machine), o.postcopy, o.local, o.threads)
        else:
            self.writer = make_writer(o.format, path, machine.memory, o.threads, o.direct,
                                      cancel)
        self.postcopy = False        # switched: the last pages follow the guest
        self.report = SaveReport(path=path if o.format == "migrate" else os.path.abspath(path),
                                 format=o.format, then=o.then)
        self.total_pages = sum(r.npages for r in machine.memory.saved_regions)
        self.shown = _Progress(progress, self.total_pages)
        self.client = None
        self.paused = False
        self.switch = sys.getswitchinterval()

    def converge(self) -> dict:
        """Pass 0 (all of RAM), then passes of what the guest dirtied meanwhile, until the
        rest fits the downtime target (or a limit): the last harvest, not yet written."""
        o, writer, report, shown = self.o, self.writer, self.report, self.shown
        writer.on_progress = shown.pass0
        stats = writer.write_pass(None)
        writer.on_progress = None
        previous, first_dirty = self.total_pages, None
        shown.pass0(self.total_pages)
        while True:
            check_cancel(self.cancel, report.path)
            dirty = self._relevant(self.client.take())
            if o.postcopy == "now" and self._switch():
                report.stop_reason = "post-copy after pass 0 (--postcopy)"
                return dirty
            n = sum(len(v) for v in dirty.values())
            first_dirty = n if first_dirty is None else first_dirty
            bandwidth = max(stats.throughput, 1.0) if stats.bytes_written else float("inf")
            estimate_ms = n * PAGE / bandwidth * 1e3 if n else 0.0
            # Converged: the rest fits the downtime target, and another pass would not
            # shrink it much (passes are cheap; every page left here is downtime).
            shrinking = n >= CONVERGED_PAGES and n < previous // 2
            if (estimate_ms <= o.downtime_ms and not shrinking
                    and len(writer.passes) >= o.min_passes):
                report.stop_reason = (f"{n} dirty pages fit the {o.downtime_ms:g} ms "
                                      f"downtime target (~{estimate_ms:.1f} ms)")
                return dirty
            previous = n
            limit = None
            if len(writer.passes) >= o.max_passes:
                limit = f"pass limit {o.max_passes} reached with {n} dirty pages"
            elif time.perf_counter() - self.t0 > o.max_seconds:
                limit = f"time limit {o.max_seconds:g} s reached with {n} dirty pages"
            if limit is not None:
                report.stop_reason = limit
                if estimate_ms > o.downtime_ms and o.postcopy == "auto" and self._switch():
                    report.stop_reason += ": post-copy"
                return dirty
            if not self.machine.running:
                raise SaveError("the guest finished during the save; nothing was saved")
            stats = writer.write_pass(dirty)
            shown.later(stats.index, n, first_dirty)

    def _relevant(self, dirty: dict) -> dict:
        """The dirty pages to send: a local migration's shared RAM is not sent at all."""
        shared = getattr(self.writer, "shared_slots", ())
        return {slot: pages for slot, pages in dirty.items() if slot not in shared}

    def _switch(self) -> bool:
        """Whether the last pages may follow the guest (post-copy): the destination's
        fault channel is up. With --postcopy, SaveError when it is not."""
        if self.writer.can_postcopy():
            self.postcopy = True
        elif self.o.postcopy == "now":
            raise SaveError(f"post-copy is not possible: no fault channel to the destination "
                            f"({self.writer.fault_error}); the guest runs on here")
        return self.postcopy

    def stop_and_copy(self, dirty: dict) -> dict:
        """The downtime: pause, the pages dirtied since the last harvest, the state; the
        guest resumes at once with --then continue. Returns the state to write."""
        machine, writer, report = self.machine, self.writer, self.report
        check_cancel(self.cancel, report.path)
        self.shown("stop-and-copy", self.shown.shown)
        writer.settle()
        # Inside the downtime the vCPU threads hand the GIL around as they park: with the
        # default 5 ms switch interval a thread waiting for it could stall the pause by up
        # to 5 ms (seen with 4 vCPUs); 0.1 ms keeps the hand-offs short.
        if self.postcopy:
            writer.defer(dirty)     # what the guest dirtied since the last pass, ahead
        sys.setswitchinterval(1e-4)
        t_pause = self.report.paused_at = time.perf_counter()
        machine.pause_all()
        if not machine.running:
            raise SaveError("the guest finished during the save; nothing was saved")
        self.paused = True
        t_paused = time.perf_counter()
        fault_point("final-pass")
        # The set harvested last (not yet written) plus what came after it.
        final = self._relevant(self.client.take(protect=False))   # not write-protected again
        t_harvested = time.perf_counter()
        if self.postcopy:
            writer.defer(final)              # the rest: the pages follow the guest
        else:
            writer.write_pass({slot: merge_pages(dirty.get(slot, final[slot]), final[slot])
                               for slot in final})
        t_written = time.perf_counter()
        # Read here, after the writes, not beside them in a thread: on 2 cores the GIL
        # hand-offs cost more than the overlap gained (1/4 vCPUs 0.91/1.64 ms with a
        # thread, 0.77/1.41 ms without, alternating rounds in one run).
        state = read_machine(machine)          # encoded once the downtime is over
        t_state = time.perf_counter()
        sys.setswitchinterval(self.switch)
        report.downtime_ms = (t_state - t_pause) * 1e3
        report.downtime_parts = {"pause": (t_paused - t_pause) * 1e3,
                                 "final harvest": (t_harvested - t_paused) * 1e3,
                                 "last pages": (t_written - t_harvested) * 1e3,
                                 "state": (t_state - t_written) * 1e3}
        if self.o.then == "continue":
            # The pages and state are in the file (page cache) already; the guest may run.
            self.client.close()
            machine.resume_all()
            self.paused = False
            report.downtime_parts["resume"] = (time.perf_counter() - t_state) * 1e3
        return state.to_json()
