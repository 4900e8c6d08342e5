"""kvmguest.abi against the kernel's own headers, compiled with the system gcc."""

import ctypes
import shutil
import subprocess

import pytest

from kvmguest import abi

# ctypes field names that differ from a C member path.
C_MEMBER = {
    ("kvm_vcpu_events", "triple_fault_pending"): "triple_fault.pending",
    ("kvm_run", "exit"): "hw",
}
# Nested members checked too, where the exit handlers read them.
NESTED = {
    "kvm_run": ["io.direction", "io.size", "io.port", "io.count", "io.data_offset",
                "mmio.phys_addr", "mmio.data", "mmio.len", "mmio.is_write",
                "fail_entry.hardware_entry_failure_reason", "fail_entry.cpu",
                "internal.suberror", "internal.ndata", "internal.data",
                "emulation_failure.flags", "emulation_failure.insn_size",
                "emulation_failure.insn_bytes", "system_event.type", "debug.arch.exception",
                "debug.arch.pc", "debug.arch.dr6", "debug.arch.dr7"],
    "kvm_sregs": ["cs.selector", "tr.type", "gdt.limit", "efer", "apic_base"],
}


def _py_offset(struct, path: str) -> int:
    off, typ = 0, struct
    for part in path.split("."):
        for ctype_name, ctype in ((n, t) for n, t in typ._fields_):
            if ctype_name == part:
                off += getattr(typ, part).offset
                typ = ctype
                break
        else:  # anonymous-union member of kvm_run
            off += getattr(typ, "exit").offset
            typ = abi._run_exit
            off += getattr(typ, part).offset
            typ = dict(typ._fields_)[part]
    return off


def _expected():
    rows = []  # (key, C expression, our value)
    for name, struct in abi.STRUCTS.items():
        rows.append((f"sizeof {name}", f"sizeof(struct {name})", ctypes.sizeof(struct)))
        for field, _ in struct._fields_:
            member = C_MEMBER.get((name, field), field)
            rows.append((f"offsetof {name}.{field}", f"offsetof(struct {name}, {member})",
                         getattr(struct, field).offset))
        for path in NESTED.get(name, []):
            rows.append((f"offsetof {name}.{path}", f"offsetof(struct {name}, {path})",
                         _py_offset(struct, path)))
    for name, value in abi.IOCTLS.items():
        rows.append((f"ioctl {name}", f"(unsigned long)({name})", value))
    for name, value in abi.CONSTANTS.items():
        rows.append((f"const {name}", f"(unsigned long)({name})", value))
    return rows


@pytest.fixture(scope="module")
def c_values(tmp_path_factory):
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed for the ABI test (apt-get install gcc)"
    rows = _expected()
    src = ["#include <stddef.h>", "#include <stdio.h>", "#include <linux/kvm.h>",
           "int main(void) {"]
    src += [f'  printf("%lu\\n", (unsigned long)({expr}));' for _, expr, _ in rows]
    src += ["  return 0;", "}"]
    d = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text("\n".join(src) + "\n")
    subprocess.run([gcc, "-o", str(d / "abi"), str(d / "abi.c")], check=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    values = [int(v) for v in out.split()]
    assert len(values) == len(rows)
    return {key: c for (key, _, _), c in zip(rows, values)}


def test_every_struct_size_offset_ioctl_and_constant_matches_kernel_headers(c_values):
    mismatches = [f"{key}: ours {ours}, kernel {c_values[key]}"
                  for key, _, ours in _expected() if c_values[key] != ours]
    assert not mismatches, "\n".join(mismatches)
    # Guard against the check itself going vacuous.
    assert len(c_values) > 300


def test_ioctl_number_encodes_struct_size():
    assert abi.VcpuIoctl.KVM_GET_REGS == 0x8090AE81
    assert (abi.VcpuIoctl.KVM_GET_SREGS >> 16) & 0x3FFF == ctypes.sizeof(abi.kvm_sregs) == 312
