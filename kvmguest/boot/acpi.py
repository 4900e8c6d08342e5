"""ACPI tables for the in-kernel irqchip: RSDP, XSDT, MADT, FADT (and an empty DSDT).

A guest finds its CPUs as Linux does: the RSDP in the BIOS area (a 16-byte-aligned
signature scan of 0xE0000-0xFFFFF finds it) and in ``hvm_start_info.rsdp_paddr``. The
MADT lists one enabled local APIC per vCPU (APIC ID = vCPU index), the IOAPIC, and the
ISA interrupt overrides; the FADT is the minimum a parser expects (hardware-reduced is
not claimed: there is a PIC, and the SCI is IRQ 9).
"""

from __future__ import annotations

import struct

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


def fadt(dsdt: int) -> bytes:
    """A revision-6 FADT (276 bytes): the DSDT, the SCI, no PM blocks yet."""
    body = bytearray(276 - 36)
    struct.pack_into("<II", body, 0, 0, dsdt)                  # FIRMWARE_CTRL, DSDT
    struct.pack_into("<H", body, 46 - 36, SCI_IRQ)              # SCI_INT
    struct.pack_into("<H", body, 109 - 36, 0x0003)              # IAPC_BOOT_ARCH: legacy, 8042
    struct.pack_into("<B", body, 131 - 36, 5)                   # FADT minor version
    struct.pack_into("<Q", body, 140 - 36, dsdt)                # X_DSDT
    return _sdt(b"FACP", 6, bytes(body))


def write_tables(memory, vcpus: int) -> int:
    """Write the tables into guest memory; return the RSDP's address."""
    at = layout.ACPI_TABLES
    dsdt_addr = at
    dsdt = _sdt(b"DSDT", 2, b"")
    at = -(-(at + len(dsdt)) // 16) * 16
    fadt_addr, fadt_t = at, fadt(dsdt_addr)
    at = -(-(at + len(fadt_t)) // 16) * 16
    madt_addr, madt_t = at, madt(vcpus)
    at = -(-(at + len(madt_t)) // 16) * 16
    xsdt_addr = at
    xsdt = _sdt(b"XSDT", 1, struct.pack("<QQ", madt_addr, fadt_addr))
    if xsdt_addr + len(xsdt) > layout.ACPI_END:
        raise ValueError(f"ACPI tables for {vcpus} vCPUs do not fit below {layout.ACPI_END:#x}")
    for addr, table in ((dsdt_addr, dsdt), (fadt_addr, fadt_t), (madt_addr, madt_t),
                        (xsdt_addr, xsdt)):
        memory.write(addr, table)
    rsdp = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 2, 0)
                     + struct.pack("<IQB3s", 36, xsdt_addr, 0, b"\0\0\0"))
    rsdp[8] = checksum(bytes(rsdp[:20]))
    rsdp[32] = checksum(bytes(rsdp))
    memory.write(layout.ACPI_RSDP, bytes(rsdp))
    return layout.ACPI_RSDP
