"""What a host's KVM cannot do, in one place: a KVM that emulates guest kernel code (a
nested, software ``kvm_pvm``, DEVELOPERS.md) fails a few instructions at CPL0, and Linux
needs parameters and a CPU model there to step around them. One table from instruction
to what keeps a Linux guest from it (used to name a failure), and what kvmguest adds for
Linux on such a host (arch.x86.linux.with_workarounds)."""

from __future__ import annotations

# One row per way a Linux guest steps around what such a host cannot do at CPL0: how
# (a CPU model change, a kernel parameter, a CPUID flag for clearcpuid=, which Linux 6.1
# reads only 127 characters of) and the instructions it keeps Linux from (empty: a
# feature whose instructions Linux would use, none seen failing yet on its own).
QUIRKS = (
    ("cpu", "-cx16", ("cmpxchg16b",)),                 # SLUB's cmpxchg_double
    ("param", "noxsave", ("xsave", "xrstor", "xsaves", "xrstors", "xsaveopt")),
    ("clearcpuid", "smap", ("clac", "stac")),
    ("clearcpuid", "smep", ()),
    ("clearcpuid", "fsgsbase", ("rdfsbase", "wrfsbase", "rdgsbase", "wrgsbase")),
    ("clearcpuid", "avx", ("v",)),                     # every VEX-encoded instruction
    ("clearcpuid", "avx2", ()),
    ("clearcpuid", "umip", ()),
    ("clearcpuid", "popcnt", ("popcnt",)),
    ("clearcpuid", "movbe", ("movbe",)),
    ("clearcpuid", "ssse3", ("pshufb",)),
    ("clearcpuid", "sse4_1", ()),
    ("clearcpuid", "sse4_2", ()),
    ("clearcpuid", "aes", ("aesenc",)),
    ("clearcpuid", "pclmulqdq", ("pclmulqdq",)),
    ("clearcpuid", "rdrand", ("rdrand",)),
    ("clearcpuid", "rdseed", ("rdseed",)),
    ("clearcpuid", "erms", ()),
    ("clearcpuid", "fsrm", ()),
    ("clearcpuid", "bmi1", ()),
    ("clearcpuid", "bmi2", ()),
    ("clearcpuid", "sha_ni", ()),
)
# Time across a restore: such a host ignores a host-initiated IA32_TSC write (the guest's
# TSC is the host's; measured: KVM_SET_MSRS of 10^6 reads back the host's count), so a
# guest keeping time by the TSC sees the time between a save and its restore as a jump
# (Linux: RCU stall warnings, timers firing late). kvm-clock, which KVM_SET_CLOCK puts
# back, keeps time across it.
# And kernel code runs ~100x slower there: RCU's 21 s CPU-stall warning is 0.2 s of
# hardware time, and fires on plain boot work when two guests share the host's cores (seen:
# mark_rodata_ro after a restore); 300 s is the most it takes.
CLOCK = ("clocksource=kvm-clock", "rcupdate.rcu_cpu_stall_timeout=300")
# Boot-time work that stalls there rather than fails: ftrace's record check, the crypto
# self-tests; and a preemptible kernel, whose softirqs do not starve the emulated CPU.
STALLS = ("initcall_blacklist=ftrace_check_for_weak_functions", "preempt=full",
          "cryptomgr.notests")

# What kvmguest adds for Linux on such a host (Machine host_workarounds), from the table.
EMULATING_HOST_CPU = ",".join(v for how, v, _ in QUIRKS if how == "cpu")
EMULATING_HOST_CMDLINE = " ".join(
    [v for how, v, _ in QUIRKS if how == "param"]
    + ["clearcpuid=" + ",".join(v for how, v, _ in QUIRKS if how == "clearcpuid")]
    + list(CLOCK) + list(STALLS))


def avoided_by(mnemonic: str) -> str | None:
    """What keeps a Linux guest from ``mnemonic`` (a disassembler's), or None."""
    for how, value, insns in QUIRKS:
        if any(mnemonic.startswith(i) if i != "v" else len(mnemonic) > 3 and
               mnemonic.startswith("v") for i in insns):
            return {"cpu": f"--cpu host,{value}", "param": f"the kernel parameter {value}",
                    "clearcpuid": f"clearcpuid={value}"}[how]
    return None


def emulating_host() -> bool:
    """Does this host's KVM emulate guest kernel code (kvm_pvm)?"""
    from ...kvm import backend_module
    return "kvm_pvm" in backend_module()
