"""x86-64 registers as GDB's remote protocol carries them: the target description gdb
reads (qXfer:features:read:target.xml) and the packing of one vCPU's registers in that
order (the ``g``/``G``/``p``/``P`` packets), from and to KVM's structures.

The order is GDB's own amd64 one (features org.gnu.gdb.i386.core, .sse, .segments), then
the system registers QEMU's stub also shows (cr0, cr2, cr3, cr4, cr8, efer)."""

from __future__ import annotations

import struct

from ... import abi

GP = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
      "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
SYSTEM = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")

# (name, size in bytes, gdb type, feature) in register-number order.
REGISTERS = (
    [(n, 8, "data_ptr" if n in ("rbp", "rsp") else "int64", "core") for n in GP]
    + [("rip", 8, "code_ptr", "core"), ("eflags", 4, "int32", "core")]
    + [(n, 4, "int32", "core") for n in SEGMENTS]
    + [(f"st{i}", 10, "i387_ext", "core") for i in range(8)]
    + [(n, 4, "int", "core") for n in X87_CONTROL]
    + [(f"xmm{i}", 16, "vec128", "sse") for i in range(16)]
    + [("mxcsr", 4, "int", "sse")]
    + [("fs_base", 8, "int64", "segments"), ("gs_base", 8, "int64", "segments")]
    + [(n, 8, "int64", "sys") for n in SYSTEM])
NUMBER = {name: i for i, (name, *_) in enumerate(REGISTERS)}
OFFSETS = []
_off = 0
for _name, _size, *_ in REGISTERS:
    OFFSETS.append(_off)
    _off += _size
G_SIZE = _off
del _off, _name, _size

FEATURES = {"core": "org.gnu.gdb.i386.core", "sse": "org.gnu.gdb.i386.sse",
            "segments": "org.gnu.gdb.i386.segments", "sys": "org.kvmguest.x86.sys"}
_VEC128 = """  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>
"""


def target_xml() -> bytes:
    """The target description: architecture i386:x86-64 and every register above."""
    out = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
           "<target>", "<architecture>i386:x86-64</architecture>"]
    for key, feature in FEATURES.items():
        out.append(f'<feature name="{feature}">')
        if key == "sse":
            out.append(_VEC128)
        for i, (name, size, typ, where) in enumerate(REGISTERS):
            if where == key:
                out.append(f'  <reg name="{name}" bitsize="{size * 8}" type="{typ}" '
                           f'regnum="{i}"/>')
        out.append("</feature>")
    out.append("</target>")
    return "\n".join(out).encode()


def _full_tag(ftwx: int) -> int:
    """FXSAVE's abridged tag byte (1 = valid) as the x87 tag word (00 valid, 11 empty)."""
    return sum((0 if ftwx >> i & 1 else 3) << (2 * i) for i in range(8))


def _abridged_tag(ftag: int) -> int:
    return sum(1 << i for i in range(8) if (ftag >> (2 * i)) & 3 != 3)


def values(regs: abi.kvm_regs, sregs: abi.kvm_sregs, fpu: abi.kvm_fpu) -> list[bytes]:
    """Every register, in order, as the little-endian bytes gdb expects."""
    q, d = struct.Struct("<Q").pack, struct.Struct("<I").pack
    out = [q(getattr(regs, n)) for n in GP]
    out += [q(regs.rip), d(regs.rflags & 0xFFFFFFFF)]
    out += [d(getattr(sregs, n).selector) for n in SEGMENTS]
    out += [bytes(fpu.fpr[i])[:10] for i in range(8)]
    out += [d(v) for v in (fpu.fcw, fpu.fsw, _full_tag(fpu.ftwx), (fpu.last_ip >> 32) & 0xFFFF,
                           fpu.last_ip & 0xFFFFFFFF, (fpu.last_dp >> 32) & 0xFFFF,
                           fpu.last_dp & 0xFFFFFFFF, fpu.last_opcode)]
    out += [bytes(fpu.xmm[i]) for i in range(16)]
    out += [d(fpu.mxcsr), q(sregs.fs.base), q(sregs.gs.base)]
    out += [q(getattr(sregs, n)) for n in SYSTEM]
    return out


def write(number: int, raw: bytes, regs: abi.kvm_regs, sregs: abi.kvm_sregs,
          fpu: abi.kvm_fpu) -> str:
    """Put register ``number``'s new value ``raw`` into the structure that holds it;
    which one changed ("regs", "sregs" or "fpu"). ValueError for a register that cannot
    be written this way (a segment selector: its descriptor would not follow)."""
    name, size, *_ = REGISTERS[number]
    if len(raw) != size:
        raise ValueError(f"{name} takes {size} bytes")
    v = int.from_bytes(raw, "little")
    if name in GP or name == "rip":
        setattr(regs, name, v)
        return "regs"
    if name == "eflags":
        regs.rflags = v
        return "regs"
    if name in SYSTEM:
        setattr(sregs, name, v)
        return "sregs"
    if name in ("fs_base", "gs_base"):
        getattr(sregs, name[:2]).base = v
        return "sregs"
    if name.startswith("st"):
        i = int(name[2:])
        fpu.fpr[i][:10] = list(raw)
    elif name.startswith("xmm"):
        fpu.xmm[int(name[3:])][:] = list(raw)
    elif name == "mxcsr":
        fpu.mxcsr = v
    elif name in ("fctrl", "fstat", "fop"):
        setattr(fpu, {"fctrl": "fcw", "fstat": "fsw", "fop": "last_opcode"}[name], v)
    elif name == "ftag":
        fpu.ftwx = _abridged_tag(v)
    elif name in ("fioff", "fiseg"):
        lo, hi = fpu.last_ip & 0xFFFFFFFF, fpu.last_ip >> 32
        fpu.last_ip = (hi << 32 | v) if name == "fioff" else (v << 32 | lo)
    elif name in ("fooff", "foseg"):
        lo, hi = fpu.last_dp & 0xFFFFFFFF, fpu.last_dp >> 32
        fpu.last_dp = (hi << 32 | v) if name == "fooff" else (v << 32 | lo)
    else:
        raise ValueError(f"{name} cannot be written from gdb")
    return "fpu"
