"""A vCPU's thread: the KVM_RUN loop, the kick and the pause handshake.

Each vCPU of a Machine runs in its own :class:`VcpuThread`. ``Vcpu.run()`` returns each
exit as a typed record (kvmguest.exits); the thread hands it to the machine's handler,
which says whether the guest is finished. Pausing is a handshake: the requester sets a flag
and kicks the thread (immediate_exit plus a real-time signal of our own); after an exit
it handled, the thread enters KVM_RUN once more with immediate_exit so that KVM completes
the pending I/O (an IN's value lands in the registers); then it parks until resumed.
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
import time
from typing import Callable

from .exits import Exit

log = logging.getLogger(__name__)

# The kick that makes KVM_RUN return: a real-time signal of our own (SIGUSR1/2 belong to
# the application embedding us). Its handler does nothing; EINTR is the point.
KICK_SIGNAL = signal.SIGRTMIN + 2
_kick_installed = False


def install_kick_handler() -> bool:
    """Install the no-op kick handler (main thread only); True once it is in place."""
    global _kick_installed
    if not _kick_installed and threading.current_thread() is threading.main_thread():
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            signal.signal(KICK_SIGNAL, lambda *_: None)
        _kick_installed = True
    return _kick_installed


# --- the thread --------------------------------------------------------------------------
class VcpuThread:
    """Runs one vCPU. ``handler(thread, exit)`` returns True when the guest is finished;
    ``on_done(thread)`` is called once when the loop ends (finished, failed or stopped)."""

    def __init__(self, vcpu, handler: Callable[["VcpuThread", Exit], bool],
                 on_done: Callable[["VcpuThread"], None] | None, fault_was_flush=None):
        self.vcpu, self.index = vcpu, vcpu.index
        self.cpuid = None                # the CPUID it was given (KVM_SET_CPUID2)
        self.handler, self.on_done = handler, on_done
        # GuestMemory.fault_was_flush: KVM_RUN fails with EFAULT when the guest writes a
        # page another vCPU's flush has made read-only for a moment; such a run is retried.
        self.fault_was_flush = fault_was_flush
        self._fault_seq: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pause_req = threading.Event()
        self._paused = threading.Event()
        self._resume = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.finished = False            # the handler said the guest is finished
        self.exits = 0
        self.first_run_at: float | None = None   # perf_counter() at the first KVM_RUN
        self.finished_at = 0.0

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def stopping(self) -> bool:
        """The loop was asked to end."""
        return self._stop.is_set()

    @property
    def parked(self) -> bool:
        """Paused at an instruction boundary (or not running at all)."""
        return self._paused.is_set() or self.done.is_set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"vCPU {self.index} already started")
        self._thread = threading.Thread(target=self._loop, name=f"vcpu{self.index}",
                                        daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Make KVM_RUN return as soon as possible (also from a halt inside KVM)."""
        run = self.vcpu.run_struct
        if run is not None:
            run.immediate_exit = 1
        t = self._thread
        if t is not None and t.ident is not None and t.is_alive() and _kick_installed:
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def request_pause(self) -> None:
        asked = self._pause_req.is_set()      # asked already (and kicked, or by itself)
        self._resume.clear()
        self._pause_req.set()
        if not asked:
            self.kick()

    def park_after_exit(self) -> None:
        """From the exit handler (this vCPU's own thread): park before running again. No
        kick: the loop sees the request before its next KVM_RUN (a signal to oneself
        would only cost a trip through the main thread's Python signal handler)."""
        self._resume.clear()
        self._pause_req.set()

    def wait_parked(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until the vCPU is parked or its loop has ended."""
        return self._paused.wait(timeout) or self.done.is_set()

    def resume(self) -> None:
        """Release a parked vCPU, or withdraw a pause request it has not honoured yet."""
        self._pause_req.clear()
        self._paused.clear()
        self._resume.set()

    def stop(self) -> None:
        """Ask the loop to end (the vCPU does not run again); see :meth:`join`."""
        self._stop.set()
        self._resume.set()
        self.kick()

    def join(self, timeout: float) -> bool:
        """Wait for the loop to end, kicking it meanwhile; False if it did not."""
        deadline = time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive():
            self.kick()
            self._thread.join(0.005)
            if time.monotonic() > deadline:
                return False
        return True

    def _loop(self) -> None:
        run = self.vcpu.run_struct
        self.first_run_at = time.perf_counter()
        # Whether an exit was handled since KVM_RUN last returned without one: KVM
        # completes that exit's I/O only when it is entered again.
        unsettled = True
        try:
            while not self._stop.is_set():
                if self._pause_req.is_set():
                    if unsettled:
                        # Enter once with immediate_exit so KVM completes the pending I/O
                        # (the registers then hold what an IN returned). Not after a run
                        # that a kick ended: nothing is pending then, and a KVM_RUN more
                        # per vCPU is time inside every pause.
                        run.immediate_exit = 1
                        self.vcpu.run()
                        unsettled = False
                    self._paused.set()
                    self._resume.wait()
                    run.immediate_exit = 0
                    continue
                try:
                    ex = self.vcpu.run()
                except OSError as err:
                    if err.errno != errno.EFAULT or self.fault_was_flush is None:
                        raise
                    seq = self.fault_was_flush(self._fault_seq)
                    if seq is None:
                        raise
                    self._fault_seq = seq
                    continue
                if ex is None:
                    unsettled = False
                    if not (self._pause_req.is_set() or self._stop.is_set()):
                        run.immediate_exit = 0
                    continue
                unsettled = True
                self.exits += 1
                if self.handler(self, ex):
                    self.finished = True
                    break
        except BaseException as err:  # noqa: BLE001 - reported through Machine.wait()
            self.error = err
        finally:
            self.finished_at = time.monotonic()
            self._paused.set()
            self.done.set()
            self.on_done(self)
