"""What a PC BIOS leaves behind when it starts a multiboot kernel (SeaBIOS under QEMU),
for kernels that rely on it, such as kvm-unit-tests' real-mode test:

- the 8259 PICs initialised with the BIOS's vectors (IRQ 0-7 -> 0x08-0x0F, IRQ 8-15 ->
  0x70-0x77), everything masked but the timer and the cascade;
- the PIT's channel 0 ticking at 18.2 Hz (mode 3, count 65536);
- a real-mode interrupt vector table whose hardware-IRQ entries acknowledge the PIC and
  return, and whose other entries just return (IRET).

PVH kernels get none of this: they start with the PICs as KVM creates them, which
they mask."""

from __future__ import annotations

import ctypes
import struct

from ...abi import IrqChip
from . import layout

MASTER_BASE, SLAVE_BASE = 0x08, 0x70
MASTER_IMR, SLAVE_IMR = 0xFA, 0xFF            # IRQ 0 (timer) and 2 (cascade) unmasked
# kvm_pic_state: one byte each, in this order (linux/kvm.h).
PIC_FIELDS = ("last_irr", "irr", "imr", "isr", "priority_add", "irq_base",
              "read_reg_select", "poll", "special_mask", "init_state", "auto_eoi",
              "rotate_on_auto_eoi", "special_fully_nested_mode", "init4", "elcr", "elcr_mask")
PIT_MODE3, PIT_RW_WORD, PIT_COUNT_MAX = 3, 3, 0x10000

BIOS_SEGMENT = layout.BIOS_STUBS >> 4
STUB_IRET = b"\xCF"
# push ax; mov al, 0x20; out 0x20, al; pop ax; iret
STUB_EOI_MASTER = b"\x50\xB0\x20\xE6\x20\x58\xCF"
# push ax; mov al, 0x20; out 0xa0, al; out 0x20, al; pop ax; iret
STUB_EOI_SLAVE = b"\x50\xB0\x20\xE6\xA0\xE6\x20\x58\xCF"
STUBS = ((0x00, STUB_IRET), (0x10, STUB_EOI_MASTER), (0x20, STUB_EOI_SLAVE))
IVT_VECTORS = 256


def _pic(vm, chip: int, base: int, imr: int) -> None:
    state = vm.get_irqchip(chip)
    at = ctypes.addressof(state) + type(state).chip.offset
    raw = bytearray(ctypes.string_at(at, len(PIC_FIELDS)))
    raw[PIC_FIELDS.index("irq_base")] = base
    raw[PIC_FIELDS.index("imr")] = imr
    raw[PIC_FIELDS.index("init4")] = 1
    raw[PIC_FIELDS.index("init_state")] = 0
    ctypes.memmove(at, bytes(raw), len(raw))
    vm.set_irqchip(state)


def apply(memory, vm, pit: bool) -> None:
    """Write the vector table and stubs into guest memory; set the PICs and the PIT."""
    base = layout.BIOS_STUBS
    for offset, code in STUBS:
        memory.write(base + offset, code)
    ivt = []
    for vector in range(IVT_VECTORS):
        if MASTER_BASE <= vector < MASTER_BASE + 8:
            offset = STUBS[1][0]
        elif SLAVE_BASE <= vector < SLAVE_BASE + 8:
            offset = STUBS[2][0]
        else:
            offset = STUBS[0][0]
        ivt.append(struct.pack("<HH", offset, BIOS_SEGMENT))
    memory.write(0, b"".join(ivt))
    _pic(vm, IrqChip.KVM_IRQCHIP_PIC_MASTER, MASTER_BASE, MASTER_IMR)
    _pic(vm, IrqChip.KVM_IRQCHIP_PIC_SLAVE, SLAVE_BASE, SLAVE_IMR)
    if pit:
        state = vm.get_pit2()
        ch = state.channels[0]
        ch.mode, ch.rw_mode, ch.read_state, ch.write_state = (PIT_MODE3, PIT_RW_WORD,
                                                               PIT_RW_WORD, PIT_RW_WORD)
        ch.count, ch.gate = PIT_COUNT_MAX, 1
        vm.set_pit2(state)

