"""Completing instructions the host's KVM reports it cannot emulate.

Some hosts (a nested, software ``kvm_pvm`` among them) cannot emulate a few instructions
in guest kernel mode and end KVM_RUN with an emulation failure carrying the instruction
bytes. Where the instruction's architectural effect is simple and safe, the VMM carries
it out and the guest goes on; this is not an emulator (DESIGN.md), and on hosts whose
KVM runs these instructions (VMX/SVM hardware) nothing here is ever reached:

- ``int3`` (``cc``): RIP past it, #BP delivered (KVM_SET_VCPU_EVENTS), as the CPU would;
- ``fwait`` (``9b``): no x87 exception is ever left pending by our guests' state, so it
  completes as a no-op;
- ``ldmxcsr m32`` / ``stmxcsr m32`` (``0f ae /2``, ``/3``): MXCSR in the vCPU's XSAVE
  image (KVM_GET/SET_XSAVE; KVM_GET_FPU read 0 here), the operand through the guest's
  page tables (64-bit mode).

Anything else is reported, named by a disassembler (capstone, when installed), with the
CPU feature or kernel parameter that keeps a Linux guest from using it."""

from __future__ import annotations

import collections
import logging
import struct
import threading

from ...abi import PAGE_SIZE
from ...errors import KvmguestError
from .quirks import avoided_by
from .regs import EFER_LMA, PageFault, canonical, translate_access

log = logging.getLogger(__name__)

BP_VECTOR, SS_VECTOR, GP_VECTOR, PF_VECTOR = 3, 12, 13, 14
VECTOR_NAMES = {BP_VECTOR: "#BP", SS_VECTOR: "#SS", GP_VECTOR: "#GP", PF_VECTOR: "#PF"}
RFLAGS_AC = 1 << 18
MXCSR_RESERVED = 0xFFFF0000                # setting these raises #GP: not ours to complete
MXCSR_AT = 24                              # in the XSAVE image's legacy (FXSAVE) area
XSTATE_BV_AT = 512                         # the XSAVE header's component bitmap
XFEATURE_FP, XFEATURE_SSE = 1 << 0, 1 << 1
_REGS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

class Refused(KvmguestError):
    """An instruction kvmguest completes, in a form it does not (the reason said)."""


class Completer:
    """Completes the instructions above for one machine; ``counts`` by kind."""

    def __init__(self, memory, xsave_size):
        """``xsave_size()``: KVM_CAP_XSAVE2's size (0: the 4 KiB KVM_GET_XSAVE)."""
        self.memory, self.xsave_size = memory, xsave_size
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def complete(self, vcpu, insn: bytes) -> bool:
        """Carry out the instruction at the vCPU's RIP (``insn``: the bytes KVM reported),
        or deliver the exception the CPU would raise instead; False when it is not one
        kvmguest completes (the guest then stops), Refused when it is, in a form it does
        not complete."""
        if not insn:
            return False
        if insn[0] == 0xCC:
            kind = self.deliver_bp(vcpu)
        elif insn[0] == 0x9B:
            kind = self._skip(vcpu, 1, "fwait")
        else:
            kind = self._mxcsr(vcpu, insn)
        if kind is None:
            return False
        with self._lock:
            self.counts[kind] += 1
            first = self.counts[kind] == 1
        if first:
            log.info("completed %s for the guest (this host's KVM cannot emulate it); "
                     "further ones are counted", kind)
        return True

    def summary(self) -> str:
        return ", ".join(f"{k} x{n}" for k, n in sorted(self.counts.items()))

    @staticmethod
    def _skip(vcpu, length: int, kind: str) -> str:
        regs = vcpu.get_regs()
        regs.rip += length
        vcpu.set_regs(regs)
        return kind

    @staticmethod
    def deliver_bp(vcpu) -> str:
        """The int3 at the vCPU's RIP, carried out: #BP delivered to the guest."""
        regs = vcpu.get_regs()
        regs.rip += 1                 # #BP is a trap: it reports the next instruction
        vcpu.set_regs(regs)
        inject_exception(vcpu, BP_VECTOR)
        return "int3"

    def _mxcsr(self, vcpu, insn: bytes) -> str | None:
        """ldmxcsr/stmxcsr with the CPU's checks: #GP(0) (#SS(0) through rsp or rbp) for
        a non-canonical operand or reserved MXCSR bits, #PF (CR2, error code) where the
        page walk faults, an operand crossing a page carried out on both; an operand in
        MMIO is refused by name (Refused)."""
        op = decode_mxcsr(insn)
        if op is None:
            return None
        kind, length, operand, stack = op
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        if not (sregs.efer & EFER_LMA and sregs.cs.l):
            return None                        # 64-bit code only
        vaddr = operand(regs, sregs, regs.rip + length)
        if not canonical(vaddr, sregs):
            return self._fault(vcpu, kind, SS_VECTOR if stack else GP_VECTOR, 0)
        write = kind == "stmxcsr"
        pieces = []                            # (guest-physical, bytes) per page touched
        try:
            for at, n in _split(vaddr, 4):
                gpa = translate_access(self.memory, at, sregs, write, sregs.cs.selector & 3,
                                       bool(regs.rflags & RFLAGS_AC))
                if gpa is None:
                    return None                # no 4-level walk: not ours to decide
                pieces.append((gpa, n))
        except PageFault as pf:
            return self._fault(vcpu, kind, PF_VECTOR, pf.code, cr2=pf.cr2)
        for gpa, n in pieces:
            if not self.memory.is_ram(gpa, n):
                raise Refused(f"the guest's {kind} has its operand at {vaddr:#x}, which is "
                              f"MMIO (guest-physical {gpa:#x}), not RAM: kvmguest completes "
                              f"{kind} for RAM operands only")
        image = bytearray(vcpu.get_xsave(self.xsave_size()))
        if kind == "ldmxcsr":
            value = struct.unpack("<I", b"".join(self.memory.read(g, n) for g, n in pieces))[0]
            if value & MXCSR_RESERVED:
                return self._fault(vcpu, kind, GP_VECTOR, 0)
            struct.pack_into("<I", image, MXCSR_AT, value)
            bv = struct.unpack_from("<Q", image, XSTATE_BV_AT)[0]
            if not bv & (XFEATURE_FP | XFEATURE_SSE):
                # KVM takes MXCSR with the FP or SSE component; SSE's (XMM registers)
                # is at its initial value (zeros) in the image when its bit is clear.
                struct.pack_into("<Q", image, XSTATE_BV_AT, bv | XFEATURE_SSE)
            vcpu.set_xsave(bytes(image))
        else:
            value = struct.pack("<I", struct.unpack_from("<I", image, MXCSR_AT)[0])
            for gpa, n in pieces:
                self.memory.write(gpa, value[:n])
                value = value[n:]
        regs.rip += length
        vcpu.set_regs(regs)
        return kind

    @staticmethod
    def _fault(vcpu, kind: str, vector: int, code: int, cr2: int | None = None) -> str:
        """Deliver the exception the CPU raises instead (a fault: RIP stays at the
        instruction); the completion's kind names it."""
        if cr2 is not None:
            sregs = vcpu.get_sregs()
            sregs.cr2 = cr2
            vcpu.set_sregs(sregs)
        inject_exception(vcpu, vector, code)
        return f"{kind} ({VECTOR_NAMES[vector]})"


def inject_exception(vcpu, vector: int, code: int | None = None) -> None:
    """Exception ``vector`` delivered to the guest at its next entry (with ``code``, for
    the exceptions that push one)."""
    events = vcpu.get_vcpu_events()
    events.exception.injected = 1
    events.exception.nr = vector
    events.exception.has_error_code = int(code is not None)
    events.exception.pending = 0
    events.exception.error_code = code or 0
    vcpu.set_vcpu_events(events)


def _split(vaddr: int, length: int) -> list[tuple[int, int]]:
    """(address, bytes) of each page an access of ``length`` bytes at ``vaddr`` touches."""
    first = min(length, PAGE_SIZE - (vaddr & (PAGE_SIZE - 1)))
    out = [(vaddr, first)]
    if first < length:
        out.append(((vaddr + first) & (1 << 64) - 1, length - first))
    return out


def decode_mxcsr(insn: bytes):
    """(kind, length, operand(regs, sregs, next_rip) -> address, through the stack
    segment) of ``ldmxcsr`` or ``stmxcsr`` with a memory operand in 64-bit mode, or
    None."""
    pos, rex, seg = 0, 0, None
    while pos < len(insn) and insn[pos] in (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65):
        seg = insn[pos] if insn[pos] in (0x64, 0x65) else seg
        pos += 1
    if pos < len(insn) and 0x40 <= insn[pos] <= 0x4F:
        rex = insn[pos]
        pos += 1
    if insn[pos:pos + 2] != b"\x0f\xae" or pos + 2 >= len(insn):
        return None
    modrm = insn[pos + 2]
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3 or reg not in (2, 3):
        return None
    pos += 3
    base = index = None
    scale = 1
    if rm == 4:                                    # SIB
        if pos >= len(insn):
            return None
        sib = insn[pos]
        pos += 1
        scale = 1 << (sib >> 6)
        idx = ((sib >> 3) & 7) | (8 if rex & 2 else 0)
        index = None if idx == 4 else idx
        b = (sib & 7) | (8 if rex & 1 else 0)
        base = None if (sib & 7) == 5 and mod == 0 else b
        disp_len = 4 if (sib & 7) == 5 and mod == 0 else (0, 1, 4)[mod]
        rip_relative = False
    elif rm == 5 and mod == 0:
        rip_relative, disp_len = True, 4
    else:
        base, rip_relative = rm | (8 if rex & 1 else 0), False
        disp_len = (0, 1, 4)[mod]
    if pos + disp_len > len(insn):
        return None
    disp = int.from_bytes(insn[pos:pos + disp_len], "little", signed=True) if disp_len else 0
    length = pos + disp_len

    def operand(regs, sregs, next_rip: int) -> int:
        addr = disp + (next_rip if rip_relative else 0)
        if base is not None:
            addr += getattr(regs, _REGS[base])
        if index is not None:
            addr += getattr(regs, _REGS[index]) * scale
        if seg == 0x64:
            addr += sregs.fs.base
        elif seg == 0x65:
            addr += sregs.gs.base
        return addr & (1 << 64) - 1

    stack = base in (4, 5)                         # rsp or rbp: the stack segment's #SS
    return ("ldmxcsr" if reg == 2 else "stmxcsr"), length, operand, stack


def describe(insn: bytes) -> str:
    """The instruction, disassembled where capstone is installed, and what avoids it."""
    text = insn.hex(" ")
    try:
        import capstone
        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        i = next(md.disasm(insn, 0), None)
    except ImportError:
        i = None
    if i is None:
        return text
    text = f"{i.mnemonic} {i.op_str}".strip() + f" ({text})"
    hint = avoided_by(i.mnemonic.split()[-1])
    return f"{text}; a Linux guest avoids it with {hint}" if hint else text
