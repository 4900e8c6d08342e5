"""Pausing a guest that never exits on its own, resuming it, and timeouts."""

import re
import struct
import time

import pytest

from helpers import guest, wait_console, wait_until
from kvmguest import GuestTimeout


_ADDRESS = re.compile(r"counter at (0x[0-9a-f]+)\r?\n")


def _counter(m) -> int:
    """The spin guest's counter, at the address its whole first line gave (the line is
    read once it has ended: the console is seen byte by byte, mid-line too)."""
    wait_until(lambda: _ADDRESS.search(m.serial.text()), 30, "the spin guest's address line")
    addr = int(_ADDRESS.search(m.serial.text()).group(1), 16)
    return struct.unpack("<Q", m.memory.read(addr, 8))[0]


def test_pause_stops_a_spinning_guest_and_resume_continues_it(machine_factory):
    m = machine_factory(guest("spin"))
    m.start()
    wait_console(m, "counter at")
    wait_until(lambda: _counter(m) > 1000, 10, "the guest counting")
    t0 = time.monotonic()
    m.pause_all()
    assert time.monotonic() - t0 < 1.0
    assert m.paused
    frozen = _counter(m)
    time.sleep(0.1)                     # a window in which a running guest would count
    assert _counter(m) == frozen, "guest ran while paused"
    m.resume_all()
    wait_until(lambda: _counter(m) > frozen + 1000, 10, "the guest counting again")
    m.pause_all()
    assert _counter(m) > frozen, "guest did not run after resume"
    for _ in range(5):          # repeated pause/resume stays reliable
        m.resume_all()
        m.pause_all()
    m.resume_all()
    assert m.running


def test_timeout_stops_a_guest_that_never_exits(machine_factory):
    m = machine_factory(guest("spin"))
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout, match="did not finish within 0.3 s") as info:
        m.run(timeout=0.3)
    assert time.monotonic() - t0 < 2.0
    assert "spin: counter at" in info.value.console
    assert not m.running
