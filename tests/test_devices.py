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


# --- the QEMU PC devices test kernels expect (kvm-unit-tests) ------------------------------
from kvmguest.devices import AcpiPm, Cmos, FwCfg, PcTestdev  # noqa: E402
from kvmguest.devices import acpi_pm, cmos, fw_cfg  # noqa: E402


def _fw_item(dev: FwCfg, key: int, n: int) -> bytes:
    dev.write(0, 2, key)
    return bytes(dev.read(1, 1) for _ in range(n))


def test_fw_cfg_gives_signature_cpus_ram_and_max_ram():
    dev = FwCfg(128 << 20, 3, ram_end=(4 << 30) + (32 << 20))
    assert _fw_item(dev, fw_cfg.SIGNATURE, 4) == b"QEMU"
    assert int.from_bytes(_fw_item(dev, fw_cfg.NB_CPUS, 2), "little") == 3
    assert int.from_bytes(_fw_item(dev, fw_cfg.RAM_SIZE, 8), "little") == 128 << 20
    assert int.from_bytes(_fw_item(dev, fw_cfg.MAX_RAM, 8), "little") == (4 << 30) + (32 << 20)
    assert _fw_item(dev, 0x1234, 4) == b"\0\0\0\0"            # unknown items read as zeros
    dev.write(0, 2, fw_cfg.SIGNATURE)
    dev.read(1, 1)
    state = dev.save_state()
    other = FwCfg(128 << 20, 3)
    other.restore_state(state)
    assert bytes(other.read(1, 1) for _ in range(3)) == b"EMU"  # a snapshot resumes mid-item


class _Memory:
    def is_ram(self, gpa, length):
        return False


def test_testdev_scratch_register_at_every_width_and_offset():
    dev = PcTestdev(_Memory())
    ports = {base: handler for base, _, handler in dev.ports()}
    scratch, byte_wise = ports[0xE0], ports[0xE8]
    scratch.write(0, 4, 0x11223344)
    assert scratch.read(0, 2) == 0x3344 and scratch.read(2, 2) == 0x1122
    scratch.write(1, 1, 0xAA)
    assert scratch.read(0, 4) == 0x1122AA44 and byte_wise.read(1, 1) == 0xAA
    lines = []
    dev.irq = lambda line, level: lines.append((line, level))
    ports[0x2000].write(11, 1, 5)
    ports[0x2000].write(11, 1, 0)
    assert lines == [(11, 1), (11, 0)]
    dev.mmio_write(4094, b"\x88\x99")
    restored = PcTestdev(_Memory())
    restored.restore_state(dev.save_state())
    assert restored.scratch == 0x1122AA44 and restored.mmio_read(4094, 2) == b"\x88\x99"


def _cmos(dev: Cmos, reg: int) -> int:
    dev.write(0, 1, reg)
    return dev.read(1, 1)


def test_cmos_clock_in_bcd_and_binary_and_settable():
    now = [1_764_158_400.25]                       # 2025-11-26 12:00:00.25 UTC
    dev = Cmos(128 << 20, clock=lambda: now[0])
    assert (_cmos(dev, cmos.HOUR), _cmos(dev, cmos.MIN), _cmos(dev, cmos.YEAR)) == (0x12, 0, 0x25)
    dev.write(0, 1, cmos.REG_B)
    dev.write(1, 1, cmos.B_24H | cmos.B_DM_BINARY)
    assert _cmos(dev, cmos.HOUR) == 12 and _cmos(dev, cmos.DAY) == 26
    dev.write(0, 1, cmos.HOUR)
    dev.write(1, 1, 7)
    assert _cmos(dev, cmos.HOUR) == 7 and _cmos(dev, cmos.MIN) == 0
    assert not _cmos(dev, cmos.REG_A) & cmos.A_UIP
    now[0] += 0.749                                # 1 ms before the next second
    assert _cmos(dev, cmos.REG_A) & cmos.A_UIP
    restored = Cmos(clock=lambda: now[0])
    restored.restore_state(dev.save_state())
    assert _cmos(restored, cmos.HOUR) == 7         # the guest's clock offset is saved
    assert int.from_bytes(bytes(_cmos(dev, r) for r in (0x34, 0x35)), "little") == 112 * 16


def test_acpi_pm_sleep_types_reset_and_a_timer_that_runs_on_across_a_restore():
    events = []
    pm = AcpiPm(events.append)
    ports = {base: handler for base, _, handler in pm.ports()}
    assert ports[acpi_pm.PM1_CNT].read(0, 2) & acpi_pm.SCI_EN
    ports[acpi_pm.PM1_CNT].write(0, 2, acpi_pm.SLP_EN | (acpi_pm.SLP_TYP_S3 << 10))
    ports[acpi_pm.PM1_CNT].write(0, 2, acpi_pm.SLP_EN)
    ports[acpi_pm.RESET_PORT].write(0, 1, acpi_pm.RESET_VALUE)
    assert events == ["suspend", "poweroff", "reset"]
    ports[acpi_pm.PM1_EVT].write(2, 2, acpi_pm.STS_RTC)           # PM1_EN: RTC wakes
    assert pm.wake(acpi_pm.STS_RTC)
    assert ports[acpi_pm.PM1_EVT].read(0, 2) & acpi_pm.STS_WAK
    ticks = [10_000_000_000]
    pm.timer = acpi_pm.PmTimer(clock=lambda: ticks[0])
    ticks[0] += 1_000_000_000
    assert pm.timer.count() == acpi_pm.PM_TIMER_HZ
    restored = AcpiPm(events.append)
    restored.timer = acpi_pm.PmTimer(clock=lambda: ticks[0] + 5)
    restored.restore_state(pm.save_state())
    assert abs(restored.timer.count() - acpi_pm.PM_TIMER_HZ) <= 1
