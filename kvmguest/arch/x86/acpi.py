"""ACPI tables for the in-kernel irqchip: RSDP, XSDT, MADT, FADT, FACS, and a DSDT that
describes the virtio-mmio devices (LNRO0005, as Firecracker's).

A guest finds its CPUs as Linux does: the RSDP in the BIOS area (a 16-byte-aligned
signature scan of 0xE0000-0xFFFFF finds it) and in ``hvm_start_info.rsdp_paddr``. The
MADT lists one enabled local APIC per vCPU (APIC ID = vCPU index), the IOAPIC, and the
ISA interrupt overrides; the FADT points at the FACS and advertises the PM1 blocks, the
PM timer and the reset register of kvmguest.devices.acpi_pm (hardware-reduced is not
claimed: there is a PIC, and the SCI is IRQ 9).
"""

from __future__ import annotations

import struct

from ...devices import acpi_pm
from . import layout

OEM_ID = b"KVMGST"
OEM_TABLE_ID = b"KVMGUEST"
MADT_PCAT_COMPAT = 1
SCI_IRQ = 9
# ISA IRQs whose line differs from the default (edge, active high, IRQ n -> GSI n): the
# SCI is level-triggered, active high (as on PCs with an ACPI chipset).
ISA_OVERRIDES = [(SCI_IRQ, SCI_IRQ, 0x000D)]     # (irq, gsi, flags: level, active high)


def checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A table with the standard 36-byte header and a correct checksum."""
    length = 36 + len(body)
    head = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                       1, b"KVMG", 1)
    table = bytearray(head + body)
    table[9] = checksum(bytes(table))
    return bytes(table)


def madt(vcpus: int) -> bytes:
    body = struct.pack("<II", layout.LAPIC_BASE, MADT_PCAT_COMPAT)
    for i in range(vcpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)          # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, 0, 0, layout.IOAPIC_BASE, 0)   # IOAPIC 0, GSI 0
    for irq, gsi, flags in ISA_OVERRIDES:
        body += struct.pack("<BBBBIH", 2, 10, 0, irq, gsi, flags)
    return _sdt(b"APIC", 4, body)


def _gas_io(port: int, bits: int) -> bytes:
    """A Generic Address Structure for a port in system I/O space."""
    return struct.pack("<BBBBQ", 1, bits, 0, {8: 1, 16: 2, 32: 3}[bits], port)


FADT_TMR_VAL_EXT, FADT_RESET_REG_SUP = 1 << 8, 1 << 10


def fadt(dsdt: int, facs: int) -> bytes:
    """A revision-6 FADT (276 bytes): DSDT, FACS, the SCI, the PM1a event and control
    blocks, a 32-bit PM timer and the reset register (kvmguest.devices.acpi_pm)."""
    body = bytearray(276 - 36)

    def put(fmt, offset, *values):                 # offsets as the ACPI spec numbers them
        struct.pack_into(fmt, body, offset - 36, *values)

    put("<II", 36, facs, dsdt)                      # FIRMWARE_CTRL, DSDT
    put("<H", 46, SCI_IRQ)                          # SCI_INT (SMI_CMD 0: ACPI always on)
    put("<III", 56, acpi_pm.PM1_EVT, 0, acpi_pm.PM1_CNT)    # PM1a/b EVT, PM1a CNT
    put("<I", 76, acpi_pm.PM_TMR)
    put("<BBBB", 88, acpi_pm.PM1_EVT_LEN, acpi_pm.PM1_CNT_LEN, 0, acpi_pm.PM_TMR_LEN)
    put("<H", 109, 0x0003)                          # IAPC_BOOT_ARCH: legacy devices, 8042
    put("<I", 112, FADT_TMR_VAL_EXT | FADT_RESET_REG_SUP)
    put("<12sB", 116, _gas_io(acpi_pm.RESET_PORT, 8), acpi_pm.RESET_VALUE)
    put("<B", 131, 5)                               # FADT minor version
    put("<QQ", 132, facs, dsdt)                     # X_FIRMWARE_CTRL, X_DSDT
    put("<12s", 148, _gas_io(acpi_pm.PM1_EVT, 32))
    put("<12s", 172, _gas_io(acpi_pm.PM1_CNT, 16))
    put("<12s", 208, _gas_io(acpi_pm.PM_TMR, 32))
    return _sdt(b"FACP", 6, bytes(body))


FACS_LENGTH = 64
FACS_ADDR = layout.ACPI_TABLES    # first of the tables: a FACS must be 64-byte aligned
FACS_WAKING_VECTOR = 12           # offset of the 32-bit firmware waking vector


def facs() -> bytes:
    """The FACS (no header checksum): where an OS leaves its S3 waking vector."""
    return struct.pack("<4sIIIII", b"FACS", FACS_LENGTH, 0, 0, 0, 0) + struct.pack(
        "<QB", 0, 2).ljust(FACS_LENGTH - 24, b"\0")


# --- the DSDT: virtio-mmio devices, as Firecracker describes them ------------------------
def _pkg(body: bytes) -> bytes:
    """AML PkgLength (the length counts its own bytes) followed by ``body``."""
    n = len(body) + 1
    if n < 0x40:
        return bytes((n,)) + body
    n += 1
    assert n < 0x1000
    return bytes((0x40 | (n & 0xF), n >> 4)) + body


def _name(seg: str, value: bytes) -> bytes:
    return b"\x08" + seg.encode() + value                      # NameOp NameSeg DataObject


def _virtio_device(i: int, base: int, irq: int) -> bytes:
    """Device (VRnn) { _HID "LNRO0005", _UID i, _CRS: its window and edge interrupt }."""
    resources = (struct.pack("<BHBII", 0x86, 9, 1, base, 0x1000)        # Memory32Fixed, RW
                 + struct.pack("<BHBBI", 0x89, 6, 0x03, 1, irq)           # Interrupt: consumer,
                 + b"\x79\x00")                                         # edge, high; end tag
    crs = b"\x11" + _pkg(b"\x0a" + bytes((len(resources),)) + resources)   # Buffer
    body = (f"VR{i:02X}".encode()
            + _name("_HID", b"\x0dLNRO0005\x00") + _name("_UID", b"\x0a" + bytes((i,)))
            + _name("_CRS", crs))
    return b"\x5b\x82" + _pkg(body)                                     # DeviceOp


def dsdt(virtio=()) -> bytes:
    """The DSDT: the virtio-mmio devices (``(base, irq)`` each) in \\_SB, found by Linux's
    virtio_mmio driver through ACPI (LNRO0005)."""
    if not virtio:
        return _sdt(b"DSDT", 2, b"")
    devices = b"".join(_virtio_device(i, base, irq) for i, (base, irq) in enumerate(virtio))
    return _sdt(b"DSDT", 2, b"\x10" + _pkg(b"\\_SB_" + devices))      # Scope (\_SB)


def write_tables(memory, vcpus: int, virtio=()) -> int:
    """Write the tables into guest memory; return the RSDP's address. ``virtio``: the
    (base, irq) of each virtio-mmio device, described in the DSDT."""
    at = FACS_ADDR
    facs_addr, facs_t = at, facs()
    at += len(facs_t)
    dsdt_addr = at
    dsdt_t = dsdt(virtio)
    at = -(-(at + len(dsdt_t)) // 16) * 16
    fadt_addr, fadt_t = at, fadt(dsdt_addr, facs_addr)
    at = -(-(at + len(fadt_t)) // 16) * 16
    madt_addr, madt_t = at, madt(vcpus)
    at = -(-(at + len(madt_t)) // 16) * 16
    xsdt_addr = at
    xsdt = _sdt(b"XSDT", 1, struct.pack("<QQ", madt_addr, fadt_addr))
    if xsdt_addr + len(xsdt) > layout.ACPI_END:
        raise ValueError(f"ACPI tables for {vcpus} vCPUs do not fit below {layout.ACPI_END:#x}")
    for addr, table in ((facs_addr, facs_t), (dsdt_addr, dsdt_t), (fadt_addr, fadt_t),
                        (madt_addr, madt_t),
                        (xsdt_addr, xsdt)):
        memory.write(addr, table)
    rsdp = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 2, 0)
                     + struct.pack("<IQB3s", 36, xsdt_addr, 0, b"\0\0\0"))
    rsdp[8] = checksum(bytes(rsdp[:20]))
    rsdp[32] = checksum(bytes(rsdp))
    memory.write(layout.ACPI_RSDP, bytes(rsdp))
    return layout.ACPI_RSDP
