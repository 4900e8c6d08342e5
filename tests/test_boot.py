"""Booting every guest on real KVM, and the errors for kernels that cannot boot."""

import re
import struct

import pytest

from helpers import guest, rss_bytes
from kvmguest import GuestCrashed, Machine
from kvmguest.arch.x86.kernel import BootError


def test_hello_prints_and_exits_zero(boot_guest):
    result = boot_guest(guest("hello"), cmdline="greeting=yes n=42")
    assert result.exit_code == 0
    assert result.console == ("Hello from a kvmguest guest!\n"
                              "cmdline: greeting=yes n=42\n")


def test_dirty_guest_verifies_its_working_set(boot_guest):
    result = boot_guest(guest("dirty"), cmdline="pages=128 passes=3")
    assert result.exit_code == 0, result.console
    assert "dirty: pass 3 ok" in result.console
    assert "dirty: verified 128 pages over 3 passes" in result.console


def test_cpustate_guest_keeps_registers(boot_guest):
    result = boot_guest(guest("cpustate"), cmdline="iters=20000")
    assert result.exit_code == 0, result.console
    assert "all 12 GPRs and 16 XMM registers intact" in result.console


def test_triple_fault_reports_registers_and_instruction_bytes(machine_factory):
    m = machine_factory(guest("fault"))
    with pytest.raises(GuestCrashed) as info:
        m.run(timeout=10)
    message = str(info.value)
    assert "triple-faulted" in message
    assert re.search(r"rip=0x[0-9a-f]{16}", message)
    assert "code at rip: 0f 0b" in message        # ud2
    assert "loading an empty IDT" in info.value.console


def test_sixteen_gib_guest_is_resident_only_where_touched(machine_factory):
    before = rss_bytes()
    m = machine_factory(guest("dirty"), memory=16 << 30, cmdline="pages=256 passes=1")
    result = m.run(timeout=60)
    assert result.exit_code == 0, result.console
    assert [r.slot for r in m.memory.regions] == [0, 1]
    assert m.memory.regions[1].gpa == 4 << 30
    grown = rss_bytes() - before
    assert grown < 64 << 20, f"RSS grew by {grown >> 20} MiB for a 16 GiB guest"


# --- kernels that must not boot -------------------------------------------------------
def _patched(tmp_path, name: str, patch) -> str:
    data = bytearray(guest("hello").read_bytes())
    patch(data)
    out = tmp_path / name
    out.write_bytes(bytes(data))
    return str(out)


def _phdr_offsets(data: bytes):
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return [phoff + i * phentsize for i in range(phnum)]


def _set_load_paddr(data: bytearray, which: int, paddr: int) -> None:
    loads = [o for o in _phdr_offsets(data) if struct.unpack_from("<I", data, o)[0] == 1]
    struct.pack_into("<QQ", data, loads[which] + 0x10, paddr, paddr)


def _kill_note(data: bytearray) -> None:
    for o in _phdr_offsets(data):
        if struct.unpack_from("<I", data, o)[0] == 4:  # PT_NOTE
            noff, = struct.unpack_from("<Q", data, o + 8)
            struct.pack_into("<I", data, noff + 8, 99)  # note type 18 -> 99


BAD_KERNELS = {
    "not-elf": (lambda d: d.__setitem__(slice(0, 4), b"MZ\0\0"), "not an ELF file"),
    "wrong-machine": (lambda d: struct.pack_into("<H", d, 0x12, 183), "not x86"),  # EM_AARCH64
    "no-pvh-note": (_kill_note, "no PVH entry note"),
    "outside-ram": (lambda d: _set_load_paddr(d, 1, 0x40000000), "outside guest RAM"),
    "overlaps-boot": (lambda d: _set_load_paddr(d, 0, 0x6000), "overlaps the boot structures"),
    "truncated": (lambda d: d.__delitem__(slice(len(d) // 2, None)), "truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD_KERNELS))
def test_bad_kernel_is_refused_before_any_vm_exists(tmp_path, case, monkeypatch):
    patch, message = BAD_KERNELS[case]
    path = _patched(tmp_path, case, patch)
    created = []
    import kvmguest.kvm as kvm_mod
    real = kvm_mod.Kvm.create_vm
    monkeypatch.setattr(kvm_mod.Kvm, "create_vm", lambda self: created.append(1) or real(self))
    with pytest.raises(BootError, match=message):
        Machine(path, memory=64 << 20)
    assert created == []


def test_missing_kernel_file_is_a_boot_error(tmp_path):
    with pytest.raises(BootError, match="cannot read kernel"):
        Machine(str(tmp_path / "nope.elf"))


def test_oversized_command_line_is_refused():
    with pytest.raises(BootError, match="command line is 5000 bytes"):
        Machine(str(guest("hello")), cmdline="x" * 5000)


def test_unmapped_mmio_access_is_a_clear_error(machine_factory):
    m = machine_factory(guest("mmio"))
    with pytest.raises(GuestCrashed, match=r"guest read from unmapped guest-physical address "
                                           r"0x3f000000 \(4 bytes\)"):
        m.run(timeout=10)
