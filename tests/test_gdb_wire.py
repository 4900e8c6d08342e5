"""The gdb wire codec with bytes alone (no KVM, no socket): framing, acks, Ctrl-C,
checksums, escapes, numbers, and the bound on a packet that never ends."""

from __future__ import annotations

import time

import pytest

from kvmguest.front.gdb.wire import (INTERRUPT, PACKET_SIZE, RESEND, Decoder, Packet, PacketTooLong,
                              escape, frame, hexnum, unescape)


def test_packets_acks_and_ctrl_c_come_out_in_order_however_the_bytes_are_split():
    stream = frame(b"qSupported:swbreak+") + b"+\x03" + frame(b"m100000,10") + b"-" + frame(b"c")
    want = [Packet(b"qSupported:swbreak+", True), INTERRUPT, Packet(b"m100000,10", True),
            RESEND, Packet(b"c", True)]
    for size in (1, 2, 3, 7, len(stream)):
        d = Decoder()
        got = []
        for i in range(0, len(stream), size):
            got += d.feed(stream[i:i + size])
        assert got == want, size


def test_a_wrong_or_malformed_checksum_is_a_bad_packet():
    d = Decoder()
    assert d.feed(b"$g#00") == [Packet(b"g", False)]
    assert d.feed(b"$g#zz$g#67") == [Packet(b"g", False), Packet(b"g", True)]


def test_a_packet_longer_than_packet_size_is_refused_at_the_bound_and_quickly():
    d = Decoder()
    assert d.feed(b"$" + b"a" * PACKET_SIZE) == []          # still within the slack
    with pytest.raises(PacketTooLong):
        d.feed(b"a" * 1000)
    start = time.process_time()
    d = Decoder(limit=64 << 20)
    for _ in range(4096):                                    # 16 MiB in 4 KiB pieces
        d.feed(b"$" + b"b" * 4095 if not d.buf else b"b" * 4096)
    assert time.process_time() - start < 5                  # no rescans: linear
    assert d.feed(b"#00")[0].payload[:4] == b"bbbb"


def test_escapes_round_trip_and_a_dangling_escape_is_an_error():
    data = bytes(range(256))
    assert unescape(escape(data)) == data
    assert escape(b"#$}*") == b"}\x03}\x04}]}\x0a"
    with pytest.raises(ValueError):
        unescape(b"ab}")


@pytest.mark.parametrize("text", ["-1", "+10", " 10", "0x10", "1_0", "", "g"])
def test_numbers_are_hex_digits_only(text):
    with pytest.raises(ValueError):
        hexnum(text)


def test_hex_numbers_parse():
    assert hexnum("ffffffffffff") == 0xFFFFFFFFFFFF and hexnum(b"10") == 16
