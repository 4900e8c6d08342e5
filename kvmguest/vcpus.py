"""A machine's vCPUs as one set: started together, paused and resumed together (pauses
nest, and a pause that cannot complete is rolled back), stopped, waited for.

Each member is a :class:`~kvmguest.vcpu.VcpuThread` (``.vcpu`` is its KVM vCPU,
``.cpuid`` the CPUID it was given). The set ends the whole guest when one vCPU finishes
it or fails: the others are told to stop and :meth:`wait_done` returns."""

from __future__ import annotations

import logging
import threading
import time

from .vcpu import VcpuThread, install_kick_handler

log = logging.getLogger(__name__)

PAUSE_TIMEOUT = 2.0


class PauseTimeout(Exception):
    """A vCPU did not park in time; every pause request was withdrawn (``late``: which)."""

    def __init__(self, late: list[int], timeout: float):
        super().__init__(f"vCPU {', '.join(map(str, late))} did not pause within "
                         f"{timeout:g} s; the guest runs on")
        self.late = late


class VcpuSet:
    def __init__(self):
        self.threads: list[VcpuThread] = []
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.started_at = 0.0
        self._done_lock = threading.Lock()
        self._pause_lock = threading.RLock()
        self._pauses = 0
        # Called with every vCPU parked when the first pause starts (on_parked), and
        # before they are released when the last one ends (on_release): a debugger lifts
        # its breakpoints out of guest memory there, so no save or checkpoint holds them.
        self.on_parked: list = []
        self.on_release: list = []

    # --- the list ---
    def add(self, thread: VcpuThread) -> None:
        thread.on_done = self._one_done
        self.threads.append(thread)

    def __len__(self) -> int:
        return len(self.threads)

    def __iter__(self):
        return iter(self.threads)

    def __getitem__(self, index: int) -> VcpuThread:
        return self.threads[index]

    @property
    def exits(self) -> int:
        return sum(t.exits for t in self.threads)

    @property
    def first_run_at(self) -> float | None:
        return self.threads[0].first_run_at if self.threads else None

    @property
    def finished_at(self) -> float:
        return max(t.finished_at for t in self.threads)

    # --- running ---
    @property
    def started(self) -> bool:
        return any(t.started for t in self.threads)

    @property
    def running(self) -> bool:
        return bool(self.threads) and self.threads[0].started and not self.done.is_set()

    def start(self, paused: bool = False) -> None:
        """Start every vCPU thread; ``paused``: each parks before its first instruction
        and this returns holding one pause (as pause_all would), for resume_all to end."""
        if self.started:
            raise RuntimeError("machine already started")
        if not install_kick_handler():
            log.warning("kick signal handler not installed (not in the main thread): "
                        "pause waits for the guest's next exit")
        self.started_at = time.monotonic()
        if paused:
            with self._pause_lock:
                for t in self.threads:
                    t.request_pause()
                for t in self.threads:
                    t.start()
                self._pauses += 1
                self._wait_parked(self.threads, PAUSE_TIMEOUT)
                self._parked()
            return
        for t in self.threads:
            t.start()

    def wait_done(self, timeout: float | None = None) -> bool:
        """Wait until the guest has finished (exit, crash or stop); False on timeout."""
        return self.done.wait(timeout)

    def join(self, timeout: float) -> None:
        """Let the threads that were told to stop end (at most ``timeout`` s each)."""
        for t in self.threads:
            t.join(timeout)

    def _one_done(self, thread: VcpuThread) -> None:
        """A vCPU loop ended. A finished guest or a failed vCPU ends the whole machine."""
        with self._done_lock:
            ends_all = thread.finished or thread.error is not None
            if ends_all and not self.done.is_set():
                if thread.error is not None and self.error is None:
                    self.error = thread.error
                for other in self.threads:
                    if other is not thread:
                        other.stop()
            if ends_all or all(t.done.is_set() for t in self.threads if t.started):
                self.done.set()

    def stop(self, timeout: float = 5.0) -> list[int]:
        """End every vCPU thread (the guest does not run again); the vCPUs whose thread
        did not end within ``timeout``."""
        for t in self.threads:
            t.stop()
        late = [t.index for t in self.threads if not t.join(timeout)]
        self.done.set()
        return late

    # --- pausing ---
    @property
    def paused(self) -> bool:
        return bool(self.threads) and all(t.started and t.parked for t in self.threads)

    def pause_all(self, timeout: float = PAUSE_TIMEOUT) -> None:
        """Park every vCPU at an instruction boundary, with its pending I/O completed;
        return only when all are parked (or the guest has finished). If one does not park
        within ``timeout``, every request is withdrawn (the guest runs on) and
        PauseTimeout says which.

        Pauses nest (a checkpoint and a live save may both hold one): the guest runs
        again only when every pause_all has had its resume_all."""
        with self._pause_lock:
            self._pauses += 1
            if self._pauses > 1:
                return
            try:
                self._park_all(timeout)
            except BaseException:
                self._pauses -= 1
                raise
            self._parked()

    def _parked(self) -> None:
        for fn in self.on_parked:
            fn()

    def _park_all(self, timeout: float) -> None:
        if self.done.is_set() or not self.running:
            return
        for t in self.threads:
            t.request_pause()
        self._wait_parked(self.threads, timeout)

    def _wait_parked(self, threads, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in threads:
            # Woken the moment the vCPU parks; kicked again every millisecond until then
            # (a signal can land just before KVM_RUN re-enters the guest).
            while not t.wait_parked(0.001):
                if self.done.is_set():
                    return
                if time.monotonic() > deadline:
                    late = [t.index for t in self.threads if not t.parked]
                    self.release()
                    raise PauseTimeout(late, timeout)
                t.kick()

    def resume_all(self) -> None:
        """Release every parked vCPU together (when this ends the last pause)."""
        with self._pause_lock:
            if self._pauses > 0:
                self._pauses -= 1
                if self._pauses > 0:
                    return
            for fn in self.on_release:
                fn()
            self.release()

    def run_one(self, thread: VcpuThread, timeout: float) -> bool:
        """While every vCPU is held parked (a debugger's single step), let ``thread``
        alone run until its exit handler parks it again (``request_pause``); no other
        pause or resume happens meanwhile. False when it had not parked within
        ``timeout`` (it is then parked by force, at its next exit or kick)."""
        with self._pause_lock:
            if self._pauses == 0:
                raise RuntimeError("run_one needs the vCPUs held by a pause")
            thread.resume()
            parked = thread.wait_parked(timeout)
            if not parked:
                thread.request_pause()
                while not thread.wait_parked(0.001):
                    if thread.done.is_set():
                        break
                    thread.kick()
            return parked

    def release(self) -> None:
        """Resume every vCPU now, whatever pauses are held (S3 wake, a failed pause)."""
        for t in self.threads:
            t.resume()

    def park_others(self, thread: VcpuThread) -> list[VcpuThread]:
        """Park every vCPU but ``thread`` (the one asking for S3); returns them."""
        others = [t for t in self.threads if t is not thread]
        for t in others:
            t.request_pause()
        for t in others:
            while not t.wait_parked(0.01):
                t.kick()
        return others
