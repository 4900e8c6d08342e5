"""The GDB remote protocol's wire, with no I/O: bytes in, events out; payloads in,
packets out (h11's way: the stub owns the socket, this owns the framing).

A packet is ``$payload#xx`` (``xx`` the modulo-256 sum of the payload in hex); ``+`` and
``-`` acknowledge one (until gdb turns acks off); a lone ``\\x03`` is Ctrl-C. Binary
payloads escape ``#$}*`` as ``}`` + byte ^ 0x20. The decoder holds at most ``limit``
bytes of a packet not yet ended: gdb never sends more than the ``PacketSize`` the stub
advertises, so a longer one is a broken or hostile client (:class:`PacketTooLong`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

PACKET_SIZE = 0x4000            # advertised in qSupported: the longest packet either way
SLACK = 64                      # '$', '#', the checksum, acks sent beside a packet
_HEX = re.compile(rb"[0-9a-fA-F]+")


class PacketTooLong(ValueError):
    """More bytes than a packet may hold arrived without its end."""


@dataclass(frozen=True)
class Packet:
    payload: bytes
    good: bool                  # its checksum matched (answer '+'), or not ('-')


INTERRUPT = "interrupt"         # Ctrl-C
RESEND = "resend"               # a '-': the peer wants the last packet again


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def frame(payload: bytes) -> bytes:
    return b"$" + payload + b"#%02x" % checksum(payload)


def escape(data: bytes) -> bytes:
    """Binary data in a packet: '#', '$', '}' and '*' escaped as '}' + byte ^ 0x20."""
    out = bytearray()
    for b in data:
        if b in b"#$}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The bytes of an escaped binary payload; ValueError for a '}' that ends it."""
    out, it = bytearray(), iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                raise ValueError("a binary payload ends in its escape character")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def hexnum(text: str | bytes) -> int:
    """A number as gdb writes one: hex digits only (no sign, prefix, space or '_', all of
    which Python's int() would take)."""
    raw = text.encode("latin-1") if isinstance(text, str) else text
    if not _HEX.fullmatch(raw):
        raise ValueError(f"not a hex number: {raw[:32]!r}")
    return int(raw, 16)


class Decoder:
    """Feed it what the socket gave; it gives :class:`Packet`, INTERRUPT and RESEND
    events in order. Each byte is looked at once (no rescans)."""

    def __init__(self, limit: int = PACKET_SIZE + SLACK):
        self.limit = limit
        self.buf = bytearray()          # a packet begun, from its '$'
        self._hash = -1                 # where its '#' is in buf, once seen

    def feed(self, data: bytes) -> list:
        events: list = []
        pos, n = 0, len(data)
        while pos < n:
            if not self.buf:
                start = data.find(b"$", pos)
                for b in data[pos:n if start < 0 else start]:
                    if b == 0x03:
                        events.append(INTERRUPT)
                    elif b == 0x2D:             # '-'
                        events.append(RESEND)
                    # '+' and line noise between packets: nothing to do
                if start < 0:
                    break
                self.buf += b"$"
                self._hash = -1
                pos = start + 1
                continue
            if self._hash < 0:
                end = data.find(b"#", pos)
                if end < 0:
                    self.buf += data[pos:]
                    pos = n
                else:
                    self._hash = len(self.buf) + end - pos
                    self.buf += data[pos:end + 1]
                    pos = end + 1
            if self._hash >= 0:
                take = data[pos:pos + self._hash + 3 - len(self.buf)]
                self.buf += take
                pos += len(take)
                if len(self.buf) == self._hash + 3:
                    events.append(self._packet())
                    continue
            if len(self.buf) > self.limit:
                size = len(self.buf)
                self.buf.clear()
                raise PacketTooLong(f"{size} bytes of a packet without its end (gdb sends "
                                    f"at most {self.limit})")
        return events

    def _packet(self) -> Packet:
        payload = bytes(self.buf[1:self._hash])
        digits = bytes(self.buf[self._hash + 1:self._hash + 3])
        self.buf.clear()
        self._hash = -1
        try:
            good = hexnum(digits) == checksum(payload)
        except ValueError:
            good = False
        return Packet(payload, good)
