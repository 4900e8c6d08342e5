"""CPU models: QEMU-style ``-cpu`` strings mapped onto the CPUID our vCPUs get.

    model[,+feature|-feature|feature=on|off|vendor=...|phys-bits=N|host-phys-bits=on|off]

``host`` and ``max`` give everything the host's KVM supports (KVM_GET_SUPPORTED_CPUID);
``qemu64`` restricts it to QEMU's qemu64 model (SSE2-era features, no leaf 7, no XSAVE;
x2APIC on, as QEMU enables it under KVM). A feature can be added only when the host
supports it. What cannot be honoured raises :class:`CpuModelError` with the reason (a
test runner reports it as a SKIP): a named model we do not describe, a feature unknown
here or missing on this host, Hyper-V enlightenments."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import EXIT_BAD_INPUT, KvmguestError

EAX, EBX, ECX, EDX = "eax", "ebx", "ecx", "edx"

# name -> (leaf, subleaf, register, bit), QEMU's feature names.
FEATURES = {
    "fpu": (1, 0, EDX, 0), "vme": (1, 0, EDX, 1), "de": (1, 0, EDX, 2), "pse": (1, 0, EDX, 3),
    "tsc": (1, 0, EDX, 4), "msr": (1, 0, EDX, 5), "pae": (1, 0, EDX, 6), "mce": (1, 0, EDX, 7),
    "cx8": (1, 0, EDX, 8), "apic": (1, 0, EDX, 9), "sep": (1, 0, EDX, 11),
    "mtrr": (1, 0, EDX, 12), "pge": (1, 0, EDX, 13), "mca": (1, 0, EDX, 14),
    "cmov": (1, 0, EDX, 15), "pat": (1, 0, EDX, 16), "pse36": (1, 0, EDX, 17),
    "clflush": (1, 0, EDX, 19), "mmx": (1, 0, EDX, 23), "fxsr": (1, 0, EDX, 24),
    "sse": (1, 0, EDX, 25), "sse2": (1, 0, EDX, 26), "ss": (1, 0, EDX, 27),
    "sse3": (1, 0, ECX, 0), "pclmulqdq": (1, 0, ECX, 1), "monitor": (1, 0, ECX, 3),
    "vmx": (1, 0, ECX, 5), "ssse3": (1, 0, ECX, 9), "fma": (1, 0, ECX, 12),
    "cx16": (1, 0, ECX, 13), "pdcm": (1, 0, ECX, 15), "pcid": (1, 0, ECX, 17),
    "sse4.1": (1, 0, ECX, 19), "sse4.2": (1, 0, ECX, 20), "x2apic": (1, 0, ECX, 21),
    "movbe": (1, 0, ECX, 22), "popcnt": (1, 0, ECX, 23), "tsc-deadline": (1, 0, ECX, 24),
    "aes": (1, 0, ECX, 25), "xsave": (1, 0, ECX, 26), "avx": (1, 0, ECX, 28),
    "f16c": (1, 0, ECX, 29), "rdrand": (1, 0, ECX, 30), "hypervisor": (1, 0, ECX, 31),
    "fsgsbase": (7, 0, EBX, 0), "tsc-adjust": (7, 0, EBX, 1), "bmi1": (7, 0, EBX, 3),
    "hle": (7, 0, EBX, 4), "avx2": (7, 0, EBX, 5), "smep": (7, 0, EBX, 7),
    "bmi2": (7, 0, EBX, 8), "erms": (7, 0, EBX, 9), "invpcid": (7, 0, EBX, 10),
    "rtm": (7, 0, EBX, 11), "mpx": (7, 0, EBX, 14), "avx512f": (7, 0, EBX, 16),
    "rdseed": (7, 0, EBX, 18), "adx": (7, 0, EBX, 19), "smap": (7, 0, EBX, 20),
    "clflushopt": (7, 0, EBX, 23), "clwb": (7, 0, EBX, 24), "sha-ni": (7, 0, EBX, 29),
    "umip": (7, 0, ECX, 2), "pku": (7, 0, ECX, 3), "waitpkg": (7, 0, ECX, 5),
    "la57": (7, 0, ECX, 16), "rdpid": (7, 0, ECX, 22), "pks": (7, 0, ECX, 31),
    "arch-capabilities": (7, 0, EDX, 29), "spec-ctrl": (7, 0, EDX, 26),
    "ibt": (7, 0, EDX, 20), "shstk": (7, 0, ECX, 7), "lam": (7, 1, EAX, 26),
    "syscall": (0x80000001, 0, EDX, 11), "nx": (0x80000001, 0, EDX, 20),
    "pdpe1gb": (0x80000001, 0, EDX, 26), "rdtscp": (0x80000001, 0, EDX, 27),
    "lm": (0x80000001, 0, EDX, 29), "lahf-lm": (0x80000001, 0, ECX, 0),
    "svm": (0x80000001, 0, ECX, 2), "abm": (0x80000001, 0, ECX, 5),
    "sse4a": (0x80000001, 0, ECX, 6), "skinit": (0x80000001, 0, ECX, 12),
    "npt": (0x8000000A, 0, EDX, 0),
}
ALIASES = {"tsc_deadline": "tsc-deadline", "lahf_lm": "lahf-lm", "sse4_1": "sse4.1",
           "sse4_2": "sse4.2", "tsc_adjust": "tsc-adjust", "pclmuldq": "pclmulqdq"}
# Subleaves that only exist with their feature: cleared features drop their leaf.
LEAF_OF = {"xsave": 0xD, "svm": 0x8000000A}

# QEMU's qemu64 model, as QEMU enables it with KVM (x2apic on, hypervisor bit).
QEMU64 = frozenset({
    "fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge",
    "mca", "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2",
    "sse3", "cx16", "x2apic", "hypervisor",
    "syscall", "nx", "lm", "lahf-lm", "svm", "abm", "sse4a"})
QEMU64_VENDOR = "AuthenticAMD"
MODELS = ("host", "max", "qemu64")
VENDORS = ("GenuineIntel", "AuthenticAMD")
OPTIONS = {"host-phys-bits"}       # on/off options, not features
IGNORED = {"migratable", "host-cache-info", "check", "enforce", "l3-cache", "pmu"}


class CpuModelError(KvmguestError, ValueError):
    """A -cpu string this host or kvmguest cannot honour (a test runner's SKIP reason)."""

    exit_code = EXIT_BAD_INPUT


@dataclass
class CpuModel:
    model: str = "host"
    add: set = field(default_factory=set)
    remove: set = field(default_factory=set)
    vendor: str | None = None
    phys_bits: int | None = None
    text: str = "host"

    def check_host(self, supported) -> None:
        """CpuModelError if a feature to add is not in the host's supported CPUID."""
        missing = [n for n in sorted(self.add)
                   if not feature_in(supported.entries[:supported.hdr.nent], n)]
        if missing:
            raise CpuModelError(f"-cpu {self.text}: this host's KVM does not offer "
                                f"{', '.join(missing)}")

    def apply(self, cpuid, supported=None) -> None:
        """Change one vCPU's kvm_cpuid2 in place (after kvmguest.arch.x86.cpuid.setup_cpuid).
        ``supported`` (the host's KVM_GET_SUPPORTED_CPUID) is checked for added features."""
        entries = cpuid.entries[:cpuid.hdr.nent]
        if supported is not None:
            self.check_host(supported)
        keep = None if self.model in ("host", "max") else QEMU64
        if keep is not None:
            for name in FEATURES:
                if name not in keep:
                    _set(entries, name, False)
            for e in entries:                  # qemu64 has no structured leaf 7 features
                if e.function == 7:
                    e.ebx = e.ecx = e.edx = 0
                    if e.index:
                        e.eax = 0
        for name in self.remove:
            _set(entries, name, False)
        for name in self.add:
            _set(entries, name, True)
        vendor = self.vendor or (QEMU64_VENDOR if self.model == "qemu64" else None)
        if vendor:
            raw = vendor.encode()
            regs = [int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8)]
            for e in entries:
                if e.function in (0, 0x80000000):
                    e.ebx, e.edx, e.ecx = regs
        if self.phys_bits:
            for e in entries:
                if e.function == 0x80000008:
                    e.eax = (e.eax & ~0xFF) | self.phys_bits
        gone = {LEAF_OF[n] for n in LEAF_OF if not feature_in(entries, n)}
        if gone:
            kept = [e for e in entries if e.function not in gone]
            for i, e in enumerate(kept):
                cpuid.entries[i] = e
            cpuid.hdr.nent = len(kept)


def _find(entries, leaf: int, sub: int):
    for e in entries:
        if e.function == leaf and (e.index == sub or not e.flags & 1):
            return e
    return None


def feature_in(entries, name: str) -> bool:
    """Whether CPUID ``entries`` have feature ``name`` (a key of FEATURES)."""
    leaf, sub, reg, bit = FEATURES[name]
    e = _find(entries, leaf, sub)
    return e is not None and bool(getattr(e, reg) >> bit & 1)


def _set(entries, name: str, on: bool) -> None:
    leaf, sub, reg, bit = FEATURES[name]
    e = _find(entries, leaf, sub)
    if e is not None:
        value = getattr(e, reg)
        setattr(e, reg, value | (1 << bit) if on else value & ~(1 << bit))


def parse(text: str) -> CpuModel:
    """A QEMU ``-cpu`` string as a CpuModel; CpuModelError names what cannot be honoured."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise CpuModelError("-cpu needs a model name")
    model = parts[0]
    if model not in MODELS:
        raise CpuModelError(f"CPU model {model!r} is not modelled by kvmguest (only "
                            f"{', '.join(MODELS)})")
    m = CpuModel(model=model, text=text)
    for p in parts[1:]:
        if p.startswith("hv_") or p.startswith("hv-"):
            raise CpuModelError(f"-cpu {text}: Hyper-V enlightenments ({p}) are not modelled "
                                "by kvmguest")
        if p[0] in "+-":
            name, on = p[1:], p[0] == "+"
        elif "=" in p:
            name, value = p.split("=", 1)
            if name == "vendor":
                if value not in VENDORS:
                    raise CpuModelError(f"-cpu {text}: vendor {value!r} is not one of "
                                        f"{', '.join(VENDORS)}")
                m.vendor = value
                continue
            if name == "phys-bits":
                if not value.isdigit() or not 32 <= int(value) <= 52:
                    raise CpuModelError(f"-cpu {text}: phys-bits must be 32 to 52")
                m.phys_bits = int(value)
                continue
            if name in OPTIONS or name in IGNORED:
                continue                      # host-phys-bits is what we do anyway
            if value not in ("on", "off", "true", "false"):
                raise CpuModelError(f"-cpu {text}: option {name}={value} is not supported")
            on = value in ("on", "true")
        elif p in OPTIONS:
            continue                          # host-phys-bits: what we do anyway
        else:
            name, on = p, True
        name = ALIASES.get(name, name)
        if name in IGNORED:
            continue
        if name not in FEATURES:
            raise CpuModelError(f"-cpu {text}: feature {name!r} is not mapped by kvmguest")
        (m.add if on else m.remove).add(name)
        (m.remove if on else m.add).discard(name)
    return m
