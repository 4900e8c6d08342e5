"""kvm-unit-tests' x86 suite on kvmguest: the tests that pass here keep passing, our
migration-protocol test passes through a live save and a restore in a new process, and
bad multiboot images, modules and CPU models are one-line errors.

The pinned suite is built once, outside the tree, by scripts/build-kut (about 10 s).
`make kut` runs the whole suite; here only the set that passes on this kind of host."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from helpers import MARGIN, ROOT, cli, guest, one_line_error, wait_until

from kvmguest.front import kut
from kvmguest.arch.x86 import cpumodel, multiboot

# Every test of unittests.cfg that passes on kvmguest on this host (kvm_pvm, AMD); the
# table in docs/kvm-unit-tests.md gives the rest with the reason. Keep in step with it.
PASSING = [
    "smptest", "smptest3", "vmexit_cpuid", "vmexit_mov_from_cr8", "vmexit_mov_to_cr8",
    "vmexit_inl_pmtimer", "vmexit_ipi", "vmexit_ipi_halt", "vmexit_ple_round_robin",
    "vmexit_tscdeadline", "vmexit_tscdeadline_immed", "vmexit_cr0_wp", "vmexit_cr4_pge",
    "idt_test", "realmode", "s3", "setjmp", "rmap_chain", "la57", "lam",
]


@pytest.fixture(scope="session")
def kut_results(kut_tree) -> dict:
    """One `kvmguest kut --json` run of the passing set, two at a time."""
    p = cli("kut", kut_tree, *PASSING, "--jobs", "2", "--json", timeout=1800)
    assert p.stdout, p.stderr
    results = json.loads(p.stdout)["results"]
    return {r["name"]: r["kvmguest"] for r in results}


@pytest.mark.parametrize("name", PASSING)
def test_kvm_unit_test_passes_on_kvmguest(kut_results, name):
    r = kut_results[name]
    log = Path(r["log"]).read_text()[-3000:] if r.get("log") else ""
    assert r["status"] == "PASS", f"{name}: {r['summary']}\n{log}"


def test_migration_protocol_passes_through_a_live_save_and_a_restore(kut_tree):
    """kvmguest_migrate (guests/kut) checks memory, registers, MSRs, timers, device state
    and its second vCPU across migrate_once(); the runner saved, restored in a new process
    and sent the key."""
    p = cli("kut", kut_tree, "--cfg", ROOT / "guests" / "kut" / "unittests.cfg", "--json",
            timeout=300)
    r = json.loads(p.stdout)["results"][0]["kvmguest"]
    log = Path(r["log"]).read_text()
    assert r["status"] == "PASS" and p.returncode == 0, log[-3000:]
    assert r["migrations"] == 1 and r["summary"] == "11 tests", r
    assert "# restore in a new process" in log and "Migration complete" in log
    before, after = log.split("Now migrate the VM", 1)
    assert "PASS: vCPU 1 runs before migration" in before
    assert "PASS: 1 MiB of memory survives migration" in after


def test_a_failing_test_makes_the_runner_fail_with_its_reason(kut_tree, tmp_path):
    """A test that cannot finish in time is a FAIL line with the reason and a non-zero
    exit; one for another architecture is a SKIP saying so."""
    cfg = tmp_path / "unittests.cfg"
    cfg.write_text("[too-slow]\nfile = realmode.flat\ntimeout = 1\n"
                   "[other-arch]\nfile = smptest.flat\narch = i386\n")
    p = cli("kut", kut_tree, "--cfg", cfg, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("FAIL too-slow (timeout; duration=1s)"), lines
    assert lines[1] == "SKIP other-arch (i386 only)", lines
    assert lines[2] == "kvmguest: 0 passed, 1 failed, 1 skipped of 2", lines


# --- loader and option errors -----------------------------------------------------------
def _patched_header(tmp_path, kut_tree, name, change) -> Path:
    data = bytearray((Path(kut_tree) / "x86" / "smptest.flat").read_bytes())
    off = next(o for o in range(0, 8192, 4)
               if struct.unpack_from("<I", data, o)[0] == multiboot.HEADER_MAGIC)
    magic, flags, _ = struct.unpack_from("<III", data, off)
    flags, fix = change(data, flags)
    struct.pack_into("<II", data, off + 4, flags, (-(magic + flags) & 0xFFFFFFFF) if fix else 0)
    out = tmp_path / f"{name}.flat"
    out.write_bytes(bytes(data))
    return out


BAD_IMAGES = {
    "video-mode": (lambda d, f: (f | 4, True), "asks for a video mode"),
    "unknown-requirement": (lambda d, f: (f | 0x20, True), "requires features 0x20"),
    "bad-checksum": (lambda d, f: (f, False), "no PVH entry note"),
    "not-elf-no-addresses": (lambda d, f: (d.__setitem__(slice(0, 4), b"JUNK"), f)[1:] + (True,),
                             "gives no load addresses"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_a_bad_multiboot_image_is_one_clear_error(tmp_path, kut_tree, case):
    change, message = BAD_IMAGES[case]
    path = _patched_header(tmp_path, kut_tree, case, change)
    one_line_error(cli("run", path, "--timeout", "10"), 2, message)


def test_module_errors_are_one_line_before_boot(tmp_path, kut_tree):
    flat = Path(kut_tree) / "x86" / "smptest.flat"
    big = tmp_path / "big"
    big.write_bytes(b"x" * (40 << 20))
    one_line_error(cli("run", guest("hello"), "--initrd", big, "--memory", "32M"), 2,
                   "give the guest more memory")
    one_line_error(cli("run", flat, "--initrd", tmp_path), 2, "is a directory")
    one_line_error(cli("run", flat, "--initrd", big, "--memory", "32M"), 2,
                   "give the guest more memory")


def test_cpu_models_kvmguest_cannot_honour_are_one_line_errors(kut_tree):
    flat = Path(kut_tree) / "x86" / "smptest.flat"
    one_line_error(cli("run", flat, "--cpu", "Opteron_G1"), 2, "'Opteron_G1' is not modelled")
    one_line_error(cli("run", flat, "--cpu", "host,+nosuchfeature"), 2,
                   "'nosuchfeature' is not mapped")
    one_line_error(cli("run", flat, "--cpu", "host,hv_passthrough"), 2, "Hyper-V")


@pytest.mark.nokvm
def test_unittests_cfg_is_read_as_kvm_unit_tests_reads_it(tmp_path):
    cfg = tmp_path / "unittests.cfg"
    cfg.write_text('# comment\n[a]\nfile = a.flat\nsmp = 3\ntest_args = "x `echo y`"\n'
                   'qemu_params = """-cpu qemu64,-x2apic\n-m 2g"""\ngroups = g1 nodefault\n'
                   'timeout = 2m\n[b]\nfile = b.flat\nextra_params = -machine pit=off\n')
    a, b = kut.parse_cfg(str(cfg))
    assert (a.name, a.file, a.smp, a.groups, a.timeout) == ("a", "a.flat", 3,
                                                             ["g1", "nodefault"], 120.0)
    assert kut.expand_args(a.test_args) == ["x y"]     # one -append word, as bash makes it
    assert kut.plan(a).skip == "test marked as manual run only"
    pa = kut.plan(a, selected=True)
    assert (pa.cpu, pa.memory_mb, pa.vcpus, pa.args, pa.skip) == ("qemu64,-x2apic", 2048, 3,
                                                                 ["x y"], None)
    assert kut.plan(b).pit is False


@pytest.mark.nokvm
@pytest.mark.parametrize("params,reason", [
    ("-M q35,kernel-irqchip=split -device intel-iommu,intremap=on -device edu", "IOMMU"),
    ("-cpu host,hv_passthrough -device hyperv-testdev", "Hyper-V devices"),
    ("-cpu IvyBridge,phys-bits=36", "'IvyBridge' is not modelled"),
    ("-machine vmport=on -cpu max", "VMware backdoor"),
    ("-cpu max -overcommit cpu-pm=on", "-overcommit"),
])
def test_what_kvmguest_cannot_honour_is_a_skip_with_its_reason(params, reason):
    assert reason in kut.plan(kut.KutTest("t", params=params)).skip


def test_features_the_host_lacks_are_a_skip_with_its_reason():
    supported = kut.host_cpuid()
    entries = supported.entries[:supported.hdr.nent]
    lacking = [n for n in cpumodel.FEATURES if not cpumodel.feature_in(entries, n)]
    assert lacking, "this host's KVM offers every feature kvmguest maps"
    skip = kut.plan(kut.KutTest("t", params=f"-cpu max,+{lacking[0]}")).skip
    assert skip == f"-cpu max,+{lacking[0]}: this host's KVM does not offer {lacking[0]}"


@pytest.mark.nokvm
def test_cpu_model_strings_parse_as_qemu_writes_them():
    m = cpumodel.parse("qemu64,+x2apic,-pcid,tsc_deadline=on,vendor=GenuineIntel")
    assert (m.model, m.add, m.remove, m.vendor) == ("qemu64", {"x2apic", "tsc-deadline"},
                                                    {"pcid"}, "GenuineIntel")
    with pytest.raises(cpumodel.CpuModelError, match="vendor 'Cyrix'"):
        cpumodel.parse("max,vendor=Cyrix")


def test_ctrl_c_on_the_runner_leaves_no_guest_running(kut_tree):
    """Each test runs in its own session (its signals stay its own); interrupting the
    runner kills them all and exits 130 in one line."""
    import signal
    import sys
    p = subprocess.Popen([sys.executable, "-m", "kvmguest", "kut", kut_tree, "sieve",
                          "realmode", "--jobs", "2"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)

    def guests() -> int:
        out = subprocess.run(["pgrep", "-f", f"{kut_tree}/x86/(sieve|realmode).flat"],
                             capture_output=True, text=True).stdout
        return len(out.split())

    wait_until(lambda: guests() == 2 or p.poll() is not None, what="both tests started")
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=MARGIN)
    assert p.returncode == 130 and err == "kvmguest: interrupted by SIGINT\n", (out, err)
    assert guests() == 0


def test_a_test_that_migrates_in_a_loop_keeps_one_snapshot_at_a_time(kut_tree, tmp_path):
    """A guest that asks to migrate after every key: each snapshot is deleted once the
    guest runs from it, so there is never more than the one being restored from when the
    next is saved: none (it was every one of them: 2.6 GB in 42 s)."""
    cfg = tmp_path / "unittests.cfg"
    cfg.write_text("[migrator]\nfile = kvmguest_migrate_loop.flat\ntest_args = 6\n"
                   "groups = migration\n")
    p = cli("kut", kut_tree, "--cfg", cfg, "--json", env={"TMPDIR": str(tmp_path)},
            timeout=300)
    r = json.loads(p.stdout)["results"][0]["kvmguest"]
    log = Path(r["log"]).read_text()
    assert r["status"] == "PASS" and r["migrations"] == 6, log[-3000:]
    assert "migrator: migration 6 done" in log and r["summary"] == "1 tests", r
    kept = [int(n) for n in re.findall(r"snapshots kept before it: (\d+)", log)]
    assert kept == [0] * 6, kept        # each was gone once the guest ran from it
    assert [n for n in os.listdir(tmp_path) if n.startswith("kvmguest-kut-")] == []


@pytest.mark.parametrize("name,expected", [("/abs/path", "_abs_path-0.log"),
                                            ("../../x", "_.._x-0.log"), ("..", "test-0.log"),
                                            ("ok_name", "ok_name.log")])
def test_test_names_never_leave_the_log_folder(kut_tree, tmp_path, name, expected):
    cfg = tmp_path / "unittests.cfg"
    cfg.write_text(f"[{name}]\nfile = kvmguest_migrate_loop.flat\ntest_args = 0\n")
    logs = tmp_path / "logs"
    p = cli("kut", kut_tree, "--cfg", cfg, "--json", env={"TMPDIR": str(tmp_path)},
            cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout)["results"][0]["kvmguest"]
    assert r["status"] == "PASS" and Path(r["log"]).name == expected, r
    assert Path(r["log"]).parent == Path(kut_tree) / "logs" / "kvmguest"
    assert not logs.exists() and not Path("/abs/path.log").exists()
