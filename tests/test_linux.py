"""Linux kernels as users have them: Debian's stock cloud kernel (a bzImage with an LZ4
payload, fetched by package name: scripts/fetch-linux), and the vmlinux inside it, boot
on kvmguest through PVH with an initrd; damaged kernels are one-line errors."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from helpers import cli, cli_popen, guest, one_line_error, read_until
from kvmguest.arch.x86 import linux, quirks

# What Debian's kernel needs on this host (DEVELOPERS.md, "Linux guests"): the rest of
# the command line is the kernel's own early console.
CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0"


@pytest.fixture(scope="session")
def vmlinux(vmlinuz, tmp_path_factory) -> Path:
    """The ELF inside the bzImage, as a file of its own (what a kernel build leaves)."""
    out = tmp_path_factory.mktemp("linux") / "vmlinux"
    out.write_bytes(linux.vmlinux_from_bzimage(str(vmlinuz), vmlinuz.read_bytes()))
    return out


def boots_to_start_kernel(kernel, *args) -> str:
    """Run ``kernel`` until Linux prints its banner and its command line (start_kernel),
    then stop it; what it printed."""
    p = cli_popen("run", kernel, "--memory", "256M", "--cmdline", CMDLINE, *args)
    try:
        out = read_until(p.stdout, "Command line: ", timeout=180)
    finally:
        p.kill()
        p.communicate()
    return out


def test_debians_bzimage_boots_to_start_kernel(vmlinuz):
    out = boots_to_start_kernel(vmlinuz)
    assert "Linux version 6." in out and f"Command line: {CMDLINE}" in out, out[-2000:]


def test_the_vmlinux_inside_it_boots_too(vmlinux):
    out = boots_to_start_kernel(vmlinux)
    assert "Linux version 6." in out, out[-2000:]


def test_on_a_host_that_emulates_kernel_code_linux_gets_what_it_needs_unasked(
        minimal_kernel):
    """Where KVM emulates kernel code (kvm_pvm), a plain `kvmguest run bzImage` adds the
    CPU model and parameters Linux needs there, says so in one line, and boots past the
    instructions that host cannot emulate (SLUB's cmpxchg16b, the FPU's xrstor): Linux
    picks FXSAVE. --exact-cmdline boots with the command line as given; so does every
    run on a host that runs kernel code natively. (The minimal kernel for test guests:
    Debian's takes ~70 s longer to get there; `make linux` boots Debian's.)"""
    from kvmguest.kvm import backend_module
    emulating = "kvm_pvm" in backend_module()
    vmlinuz = minimal_kernel
    p = cli_popen("run", vmlinuz, "--memory", "256M", "--cmdline", CMDLINE)
    try:
        out = read_until(p.stdout, "x86/fpu: " if not emulating else
                         "x86/fpu: x87 FPU will use FXSAVE", timeout=600)
    finally:
        p.kill()
        err = p.communicate()[1]
    out = out.replace("\r", "")
    if emulating:
        assert "kvmguest: this host's KVM emulates kernel code (kvm_pvm); Linux boots here " \
            "with --cpu host,-cx16 noxsave clearcpuid clocksource " \
            "rcupdate.rcu_cpu_stall_timeout initcall_blacklist preempt cryptomgr.notests " \
            "added" in err, err
        assert f"Command line: {CMDLINE} noxsave clearcpuid=smap," in out, out[-2000:]
    else:
        assert "kvm_pvm" not in err and f"Command line: {CMDLINE}\n" in out, out[-2000:]
    exact = boots_to_start_kernel(vmlinuz, "--exact-cmdline")
    assert f"Command line: {CMDLINE}\n" in exact.replace("\r", ""), exact[-2000:]


def _patched(tmp_path, vmlinuz, name, at, data) -> Path:
    raw = bytearray(vmlinuz.read_bytes())
    raw[at:at + len(data)] = data
    out = tmp_path / name
    out.write_bytes(bytes(raw))
    return out


def test_damaged_bzimages_are_one_line_errors(tmp_path, vmlinuz):
    raw = vmlinuz.read_bytes()
    h = linux.setup_header(str(vmlinuz), raw)
    cases = {
        "boot-flag": (linux.BOOT_FLAG_AT, b"\0\0", "boot_flag is 0x0"),
        "old-protocol": (linux.VERSION_AT, struct.pack("<H", 0x204), "boot protocol 2.04"),
        "payload-past-end": (linux.PAYLOAD_AT, struct.pack("<II", len(raw), 100),
                             "does not fit the file"),
        "payload-not-compressed": (h["payload_offset"], b"JUNKJUNK", "not a compression"),
        "payload-block-past-end": (h["payload_offset"] + 4, b"\xff\xff\xff\x00",
                                   "runs past the payload"),
        "payload-damaged": (h["payload_offset"] + 4, b"\x10\x00\x00\x00",
                            "does not decompress"),
        "payload-trailer": (h["payload_offset"] + h["payload_length"] - 4, b"\x01\x00\x00\x00",
                            "where its trailer says 1"),
        "payload-huge": (h["payload_offset"] + h["payload_length"] - 4, b"\x00\x00\x00\x40",
                         "says it decompresses to 1024 MiB (limit 512 MiB)"),
    }
    for name, (at, data, fragment) in cases.items():
        one_line_error(cli("run", _patched(tmp_path, vmlinuz, name, at, data)), 2, fragment)
    short = tmp_path / "short"
    short.write_bytes(raw[:len(raw) // 2])
    one_line_error(cli("run", short), 2, "does not fit the file")


def test_a_linux_elf_without_the_pvh_note_says_what_it_needs(tmp_path, vmlinux):
    raw = bytearray(vmlinux.read_bytes())
    at = raw.find(b"Xen\0")
    while at >= 0:                                 # every Xen note loses its name
        raw[at:at + 4] = b"Nex\0"
        at = raw.find(b"Xen\0", at + 4)
    bad = tmp_path / "vmlinux-nopvh"
    bad.write_bytes(bytes(raw))
    one_line_error(cli("run", bad), 2, "a Linux kernel without the PVH entry note",
                   "CONFIG_PVH=y")


def test_pvh_modules_are_handed_to_the_guest_in_its_start_info(tmp_path):
    """Linux takes its initrd from PVH module 0; our hello guest lists what it got."""
    a, b = tmp_path / "initrd.img", tmp_path / "second"
    a.write_bytes(bytes(range(256)) * 64)          # 16 KiB, first page sums to 16 * 32640
    b.write_bytes(b"abc")
    p = cli("run", guest("hello"), "--initrd", a, "--initrd", b)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("module")]
    assert len(lines) == 2, p.stdout
    assert lines[0].startswith("module 0: 16384 bytes at 0x") and \
        lines[0].endswith(f"first page sums to {16 * 32640}"), lines
    assert lines[1].startswith("module 1: 3 bytes at 0x") and lines[1].endswith("294"), lines
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(8 << 20)
    one_line_error(cli("run", guest("hello"), "--initrd", big, "--memory", "4M"), 2,
                   "give the guest more memory")


@pytest.mark.parametrize("how,code,line", [
    ("panic", 122, "the guest kernel panicked: Kernel panic - not syncing: hello was asked to "
                   "panic"),
    ("reboot", 121, "the guest rebooted (reset the machine); kvmguest does not reboot"),
])
def test_a_panic_and_a_reboot_end_the_run_with_their_own_code(how, code, line):
    """Never a hang: a Linux kernel that panicked spins forever, so its panic line on the
    console ends the run; a reset ends it too (kvmguest does not reboot). hello-linux is
    hello with Linux's ELF note: kvmguest takes it for Linux."""
    p = cli("run", guest("hello-linux"), "--exact-cmdline", "--cmdline", how, timeout=120)
    assert p.returncode == code, (p.returncode, p.stderr)
    assert p.stderr == f"kvmguest: {line}\n", p.stderr


def test_only_a_linux_kernel_ends_its_run_with_the_panic_line():
    p = cli("run", guest("hello"), "--cmdline", "panicline")
    assert p.returncode == 0 and "Kernel panic - not syncing: hello only says so" in p.stdout
    assert p.stderr == "", p.stderr
    p = cli("run", guest("hello-linux"), "--exact-cmdline", "--cmdline", "panicline")
    assert p.returncode == 122 and "the guest kernel panicked" in p.stderr, p.stderr


def test_linux_is_told_by_its_structure_not_by_a_string_in_the_file(tmp_path):
    """hello with "Linux version " appended is not Linux: no parameters or CPU model are
    added for it; hello-linux (Linux's ELF note) gets them where this host needs them."""
    fake = tmp_path / "hello-says-linux.elf"
    fake.write_bytes(guest("hello").read_bytes() + b"Linux version 6.1.0 (fake)\0" * 4)
    p = cli("run", fake, "--cmdline", "mine")
    assert p.returncode == 0 and "cmdline: mine\n" in p.stdout and p.stderr == "", p
    p = cli("run", guest("hello-linux"), "--cmdline", "mine")
    assert p.returncode == 0, p.stderr
    if quirks.emulating_host():
        assert "cmdline: mine noxsave clearcpuid=" in p.stdout, p.stdout
        assert "Linux boots here with --cpu host,-cx16 noxsave" in p.stderr, p.stderr
    else:
        assert "cmdline: mine\n" in p.stdout and p.stderr == "", p


def test_a_linux_command_line_that_linux_would_cut_is_refused():
    """x86 Linux keeps 2047 bytes of its command line: a longer one is refused before
    boot, naming the limit and, where kvmguest adds parameters, how many bytes they are."""
    mine = "a" * 2000
    p = cli("run", guest("hello-linux"), "--cmdline", mine)
    if quirks.emulating_host():
        one_line_error(p, 2, "the command line is ", " bytes and Linux keeps 2047; "
                       "kvmguest adds ", "--exact-cmdline: without")
    else:
        assert p.returncode == 0, p.stderr
    one_line_error(cli("run", guest("hello-linux"), "--exact-cmdline", "--cmdline",
                       "b" * 2048), 2, "the command line is 2048 bytes and Linux keeps 2047")
    p = cli("run", guest("hello-linux"), "--exact-cmdline", "--cmdline", "c" * 2047)
    assert p.returncode == 0 and f"cmdline: {'c' * 2047}\n" in p.stdout, p.stderr
    p = cli("run", guest("hello"), "--cmdline", "d" * 3000)     # not Linux: its own limit
    assert p.returncode == 0 and f"cmdline: {'d' * 3000}\n" in p.stdout, p.stderr


def test_a_triple_fault_has_its_code_too():
    p = cli("run", guest("fault"))
    assert p.returncode == 123 and "triple-faulted" in p.stderr


def test_instructions_this_host_cannot_emulate_are_completed_or_named():
    """int3 (#BP must report the next instruction), fwait, ldmxcsr/stmxcsr with three
    addressing forms, and the CPU's checks for the last two: #GP for a non-canonical
    operand (#SS through rbp), #PF with CR2 and the error code where the walk faults
    (not present; read-only under CR0.WP), operands across pages mapped apart: the insns
    guest checks the results itself. Where KVM cannot do them (this kvm_pvm host),
    kvmguest did, and -v counts them; on hardware that can, it never has to."""
    p = cli("run", guest("insns"), "-v")
    assert p.returncode == 0 and "insns: int3 x5 (#BP at the next instruction), fwait, " \
        "ldmxcsr/stmxcsr x3: all ok" in p.stdout, (p.stdout[-1500:], p.stderr[-1500:])
    assert "insns: #GP, #SS, #PF (not present, read-only under WP), operands across " \
        "pages: all ok" in p.stdout, (p.stdout[-1500:], p.stderr[-1500:])
    if quirks.emulating_host():
        assert "kvmguest: completed for the guest: fwait x1, int3 x5, ldmxcsr x5, " \
            "ldmxcsr (#GP) x1, ldmxcsr (#PF) x1, stmxcsr x7, stmxcsr (#GP) x1, " \
            "stmxcsr (#PF) x3, stmxcsr (#SS) x1" in p.stderr, p.stderr[-1500:]


def test_a_completed_instruction_with_its_operand_in_mmio_is_named_so():
    p = cli("run", guest("insns"), "--cmdline", "mmio")
    assert "insns: stmxcsr into MMIO next" in p.stdout, (p.stdout[-1500:], p.stderr[-1500:])
    if quirks.emulating_host():      # elsewhere the CPU runs it, and KVM carries out the MMIO
        assert p.returncode == 1 and "kvmguest: the guest's stmxcsr has its operand at " \
            "0x3001000, which is MMIO (guest-physical 0xfec01000), not RAM" in p.stderr, \
            p.stderr[-1500:]
        assert "cannot emulate" not in p.stderr


def test_an_instruction_nobody_completes_is_named_with_what_avoids_it():
    from kvmguest.arch.x86.complete import describe
    text = describe(bytes.fromhex("f0480fc74d20"))        # what SLUB runs (Debian's kernel)
    assert text.startswith("lock cmpxchg16b xmmword ptr [rbp + 0x20]") and \
        text.endswith("a Linux guest avoids it with --cpu host,-cx16"), text
    assert "noxsave" in describe(bytes.fromhex("0fae2f"))     # xrstor [rdi]
