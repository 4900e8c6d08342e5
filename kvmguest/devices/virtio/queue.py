"""A split virtqueue (virtio 1.1, 2.6), as Firecracker's queue.rs keeps one: the rings
live in guest RAM; the device keeps only where they are, its size and its two cursors
(``next_avail``, ``next_used``). Everything read from the rings is input: a chain that
loops, runs longer than the queue, points outside RAM, or gives the device a read-only
buffer to write is a :class:`QueueError`, never a crash or a hang of the VMM."""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_SIZE = 256                     # the largest queue a device offers (QueueNumMax)
DESC = struct.Struct("<QIHH")      # addr, len, flags, next
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1


class QueueError(Exception):
    """The driver broke the queue's rules (the device sets NEEDS_RESET)."""


@dataclass
class Buffer:
    """One descriptor of a chain: guest-physical address, length, device-writable."""
    addr: int
    length: int
    write: bool


@dataclass
class Chain:
    head: int
    buffers: list[Buffer]

    def readable(self) -> list[Buffer]:
        return [b for b in self.buffers if not b.write]

    def writable(self) -> list[Buffer]:
        return [b for b in self.buffers if b.write]


class Queue:
    """One queue of a device, as the driver set it up (QueueNum/Desc/Driver/Device)."""

    FIELDS = ("size", "ready", "desc", "avail", "used", "next_avail", "next_used")

    def __init__(self, memory):
        self.memory = memory
        self.reset()

    def reset(self) -> None:
        self.size, self.ready = MAX_SIZE, False
        self.desc = self.avail = self.used = 0
        self.next_avail = self.next_used = 0

    # --- checks -------------------------------------------------------------------------
    def check(self) -> str | None:
        """What is wrong with the queue's set-up (None: usable): a size that is a power
        of two within MAX_SIZE, and each ring in RAM, aligned as the spec says."""
        if not self.size or self.size > MAX_SIZE or self.size & (self.size - 1):
            return f"queue size {self.size} is not a power of two up to {MAX_SIZE}"
        for name, addr, length, align in (
                ("descriptor table", self.desc, 16 * self.size, 16),
                ("driver ring", self.avail, 6 + 2 * self.size, 2),
                ("device ring", self.used, 6 + 8 * self.size, 4)):
            if addr % align or not self.memory.is_ram(addr, length):
                return f"the {name} at {addr:#x} is not in RAM (or not aligned)"
        return None

    # --- the device's side --------------------------------------------------------------
    def _u16(self, gpa: int) -> int:
        return int.from_bytes(self.memory.read(gpa, 2), "little")

    def pending(self) -> bool:
        return self.ready and self._u16(self.avail + 2) != self.next_avail

    def pop(self) -> Chain | None:
        """The next chain the driver made available, or None."""
        if not self.ready:
            return None
        idx = self._u16(self.avail + 2)
        if idx == self.next_avail:
            return None
        if (idx - self.next_avail) & 0xFFFF > self.size:
            raise QueueError(f"the driver ring's index moved {(idx - self.next_avail) & 0xFFFF} "
                             f"ahead of a queue of {self.size}")
        head = self._u16(self.avail + 4 + 2 * (self.next_avail % self.size))
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return Chain(head, self._walk(head))

    def _walk(self, head: int) -> list[Buffer]:
        buffers, i, seen_write = [], head, False
        for _ in range(self.size):
            if i >= self.size:
                raise QueueError(f"descriptor {i} is outside a queue of {self.size}")
            addr, length, flags, nxt = DESC.unpack(self.memory.read(self.desc + 16 * i, 16))
            if flags & F_INDIRECT:
                raise QueueError("indirect descriptors were not offered")
            if length and not self.memory.is_ram(addr, length):
                raise QueueError(f"a buffer at {addr:#x}+{length:#x} is not in RAM")
            write = bool(flags & F_WRITE)
            if seen_write and not write:
                raise QueueError("a device-readable buffer after a device-writable one")
            seen_write |= write
            buffers.append(Buffer(addr, length, write))
            if not flags & F_NEXT:
                return buffers
            i = nxt
        raise QueueError(f"a descriptor chain longer than the queue ({self.size}): a loop?")

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver, ``written`` bytes written into it."""
        slot = self.used + 4 + 8 * (self.next_used % self.size)
        self.memory.write(slot, struct.pack("<II", head, written))
        self.next_used = (self.next_used + 1) & 0xFFFF
        self.memory.write(self.used + 2, struct.pack("<H", self.next_used))

    def wants_interrupt(self) -> bool:
        return not self._u16(self.avail) & AVAIL_F_NO_INTERRUPT

    # --- state ----------------------------------------------------------------------------
    def save_state(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def restore_state(self, state: dict) -> None:
        for name in self.FIELDS:
            setattr(self, name, state[name])
        self.ready = bool(self.ready)
