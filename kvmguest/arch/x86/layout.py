"""Every magic guest-physical address and boot constant, in one place, with why; and
how RAM is split into memory slots around the PC's MMIO hole."""

from __future__ import annotations

from ...abi import PAGE_SIZE
from ...memory import GuestMemoryError, RegionSpec, check_layout

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Boot GDT for the PVH start state (PVH wants flat 32-bit segments and a TSS), in the
# first page, past the real-mode IVT and BIOS data area (0x0-0x4FF) a PC keeps there.
BOOT_GDT = 0x500
# hvm_start_info (56 bytes), then its memory map right behind it in the same page.
START_INFO = 0x6000
MEMMAP = 0x6040
MEMMAP_MAX_ENTRIES = 16
# PVH modules (Linux's initrd is the first): their list (32 bytes an entry), then their
# names, NUL-terminated, up to the command line's page.
PVH_MODLIST = 0x6200
PVH_MODULE_NAMES = 0x6300
# The kernel command line: one page, NUL-terminated.
CMDLINE = 0x7000
CMDLINE_MAX = 4096
# Everything the VMM writes for boot sits below this address; ELF segments must not.
BOOT_STRUCTS_END = 0x8000

# Legacy PC holes reported in the memory map: the EBDA/VGA/BIOS area [640 KiB, 1 MiB).
LOW_RAM_END = 0xA0000
KERNEL_MIN_ADDR = 1 * MiB

# RAM above 3 GiB goes above 4 GiB, leaving the usual hole for MMIO (PCI, LAPIC, IOAPIC).
MMIO_HOLE_START = 3 * GiB
HIGH_RAM_START = 4 * GiB

# Required by KVM on Intel (real-mode emulation); three pages inside the MMIO hole.
TSS_ADDR = 0xFFFBD000

# PVH: the start_info magic and the ELF note type that carries the 32-bit entry.
HVM_START_MAGIC = 0x336EC578
XEN_ELFNOTE_PHYS32_ENTRY = 18

# Memory map entry types (e820).
E820_RAM = 1
E820_RESERVED = 2

# (The devices' ports are kvmguest/devices' own: COM1_PORT, DEBUG_EXIT_PORT, ...)

# ACPI tables, in the BIOS area [0xE0000, 0x100000) where an OS scans for the RSDP on a
# 16-byte boundary (and also passed in hvm_start_info.rsdp_paddr). The memory map
# reports [640 KiB, 1 MiB) reserved, so the tables stay out of the guest's RAM.
ACPI_RSDP = 0xE0000
ACPI_TABLES = 0xE0100          # XSDT, MADT, FADT, DSDT follow one another from here
ACPI_END = 0xF0000
# Real-mode interrupt stubs a BIOS would leave (boot/firmware.py, multiboot kernels only).
BIOS_STUBS = 0xF0000

# The in-kernel irqchip's MMIO windows (architectural defaults, inside the MMIO hole).
LAPIC_BASE = 0xFEE00000
IOAPIC_BASE = 0xFEC00000
# virtio-mmio devices: a 4 KiB window each from here (Firecracker's address), in the hole.
VIRTIO_MMIO_BASE = 0xD0000000

MIN_MEMORY = 4 * MiB


def plan_regions(ram_size: int) -> list[RegionSpec]:
    """Split ``ram_size`` bytes of RAM into slots: below the 3 GiB MMIO hole, then at 4 GiB."""
    if ram_size % PAGE_SIZE or ram_size <= 0:
        raise GuestMemoryError(f"memory size {ram_size} is not a positive multiple of 4 KiB")
    low = min(ram_size, MMIO_HOLE_START)
    specs = [RegionSpec(0, 0, low, "ram-low")]
    if ram_size > low:
        specs.append(RegionSpec(1, HIGH_RAM_START, ram_size - low, "ram-high"))
    check_layout(specs)
    return specs
