"""Device models, without KVM: the 16550 register model and the port bus."""

from kvmguest.devices import DebugExit, PortBus, Serial
from kvmguest.devices import serial as uart


def test_serial_polling_driver_sees_thre_and_output_is_captured():
    s = Serial()
    assert s.read(uart.LSR, 1) & uart.LSR_THRE
    for b in b"hi\r\n":
        s.write(uart.RBR_THR, 1, b)
    assert s.output == b"hi\r\n" and s.text() == "hi\n"


def test_serial_divisor_latch_does_not_print():
    s = Serial()
    s.write(uart.LCR, 1, 0x83)
    s.write(uart.RBR_THR, 1, 0x01)
    s.write(uart.IER, 1, 0x00)
    assert s.read(uart.RBR_THR, 1) == 0x01 and s.output == b""
    s.write(uart.LCR, 1, 0x03)
    s.write(uart.RBR_THR, 1, ord("x"))
    assert s.output == b"x"


def test_serial_input_queue_sets_data_ready():
    s = Serial()
    assert not s.read(uart.LSR, 1) & uart.LSR_DR
    s.feed(b"ok")
    assert s.read(uart.LSR, 1) & uart.LSR_DR
    assert bytes([s.read(0, 1), s.read(0, 1)]) == b"ok"
    assert not s.read(uart.LSR, 1) & uart.LSR_DR


def test_serial_buffer_is_bounded_and_counts_what_it_dropped():
    s = Serial(capacity=10)
    for b in b"0123456789abcdef":
        s.write(0, 1, b)
    assert s.output == b"6789abcdef" and s.dropped == 6


def test_bus_unknown_ports_read_all_ones_and_writes_are_ignored():
    bus = PortBus()
    d = DebugExit()
    bus.register(0xF4, 4, d)
    assert bus.read(0x80, 1) == 0xFF and bus.read(0x80, 2) == 0xFFFF
    bus.write(0x80, 1, 5)
    assert bus.unknown_accesses == 3
    bus.write(0xF4, 4, 7)
    assert d.result == 7 and d.fired.is_set()
