"""Kvm -> Vm -> Vcpu: thin wrappers over the three kinds of KVM file descriptor.

One method per ioctl, named after it. Policy (boot, devices, migration) lives above.
Every ioctl goes through :func:`ioctl`, the one choke point that turns -1/errno into a
:class:`KvmError` carrying the ioctl's name.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import grp
import mmap
import os
import stat
import struct
from pathlib import Path

from . import abi
from .abi import Cap, SysIoctl, VcpuIoctl, VmIoctl
from .errors import EXIT_BAD_INPUT, KvmguestError
from .exits import Exit, decode_exit

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

# The device to open; KVMGUEST_DEVICE points elsewhere (e.g. a second node, or, in the
# plugin's own tests, a path that does not exist).
KVM_PATH = os.environ.get("KVMGUEST_DEVICE", "/dev/kvm")


class KvmError(KvmguestError, OSError):
    """An ioctl failed: ``KvmError: KVM_SET_REGS failed: [Errno 22] Invalid argument``."""

    def __init__(self, name: str, err: int):
        super().__init__(err, os.strerror(err))
        self.ioctl = name

    def __str__(self) -> str:
        return f"{self.ioctl} failed: [Errno {self.errno}] {self.strerror}"


class KvmUnavailable(KvmguestError):
    """KVM cannot be used on this host; the message says why and how to fix it."""

    exit_code = EXIT_BAD_INPUT


_supported_cpuid = None          # KVM_GET_SUPPORTED_CPUID's answer, once per process


def ioctl(fd: int, request: abi.enum.IntEnum, arg=None) -> int:
    """Call ioctl(2); ``arg`` is an int, a ctypes object (passed by reference) or None."""
    if arg is None or isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret = _libc.ioctl(fd, int(request), ptr)
    if ret < 0:
        raise KvmError(request.name, ctypes.get_errno())
    return ret


def explain_open_error(err: OSError, path: str = KVM_PATH) -> str:
    """A one-line reason why ``path`` could not be opened, with the fix."""
    if err.errno == errno.ENOENT:
        return (f"{path} does not exist: load the KVM module (modprobe kvm_intel or kvm_amd), "
                "enable virtualization in the firmware, or enable nested virtualization "
                "for this VM")
    if err.errno in (errno.EACCES, errno.EPERM):
        acl = f"grant an ACL (sudo setfacl -m u:$USER:rw {path})"
        try:
            st = os.stat(path)
            group = grp.getgrgid(st.st_gid).gr_name if st.st_gid != 0 else None
            group_rw = st.st_mode & 0o060 == 0o060
        except (OSError, KeyError):
            group, group_rw = None, False
        if group and group_rw:     # a group that really opens the device, never root
            return (f"permission denied opening {path}: add your user to the '{group}' group "
                    f"(sudo usermod -aG {group} $USER, then log in again) or {acl}")
        return (f"permission denied opening {path}: no group may open it ("
                f"{_owner(path)}); {acl}, or install a udev rule giving a 'kvm' group rw "
                f"(KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\")")
    if err.errno == errno.ENXIO or err.errno == errno.ENODEV:
        return f"{path} exists but no KVM backend is loaded (modprobe kvm_intel or kvm_amd)"
    return f"cannot open {path}: {err.strerror}"


def _owner(path: str) -> str:
    try:
        st = os.stat(path)
        group = grp.getgrgid(st.st_gid).gr_name
    except (OSError, KeyError):
        return "unknown"
    return f"group {group}, mode {stat.S_IMODE(st.st_mode):04o}"


def backend_module() -> str:
    """The KVM backend module in use (``kvm_intel``, ``kvm_amd``, ``kvm_pvm``, ...)."""
    found = sorted(p.name for p in Path("/sys/module").glob("kvm_*")
                   if p.name not in ("kvm_common",))
    return ", ".join(found) if found else "unknown"


class _Fd:
    """Owns one fd; ``close()`` is idempotent; usable as a context manager."""

    fd: int = -1

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


_MSR_ENTRY = struct.Struct("<IIQ")          # struct kvm_msr_entry: index, reserved, data


@functools.lru_cache(maxsize=8)
def _msr_template(indices: tuple[int, ...]) -> bytes:
    """A KVM_GET_MSRS request for ``indices``, as bytes (built once per list)."""
    msrs = abi.flexible(abi.kvm_msrs, abi.kvm_msr_entry, len(indices))()
    msrs.hdr.nmsrs = len(indices)
    for e, index in zip(msrs.entries, indices):
        e.index = index
    return bytes(msrs)


def _msr_request(indices: tuple[int, ...]):
    """A fresh request (each caller its own buffer: two threads may read one vCPU)."""
    typ = abi.flexible(abi.kvm_msrs, abi.kvm_msr_entry, len(indices))
    return typ.from_buffer_copy(_msr_template(indices))


class _CapsFd(_Fd):
    """An fd that answers KVM_CHECK_EXTENSION (/dev/kvm, a VM)."""

    def check_extension(self, cap: int) -> int:
        """Asked once per cap: what /dev/kvm or a VM offers is fixed while its fd is
        open (a save asks inside its downtime)."""
        known = self.__dict__.setdefault("_caps", {})
        if cap not in known:
            known[cap] = ioctl(self.fd, SysIoctl.KVM_CHECK_EXTENSION, int(cap))
        return known[cap]


class Kvm(_CapsFd):
    """The ``/dev/kvm`` system fd."""

    def __init__(self, path: str | None = None):
        path = path or KVM_PATH
        try:
            st = os.stat(path)
        except OSError as err:
            raise KvmUnavailable(explain_open_error(err, path)) from err
        if not stat.S_ISCHR(st.st_mode):
            raise KvmUnavailable(f"{path} is not a character device")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise KvmUnavailable(explain_open_error(err, path)) from err
        version = self.get_api_version()
        if version != abi.KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(f"KVM API version {version} is not the supported "
                                 f"{abi.KVM_API_VERSION}")

    def get_api_version(self) -> int:
        return ioctl(self.fd, SysIoctl.KVM_GET_API_VERSION)

    def require(self, *caps: Cap) -> None:
        missing = [Cap(c).name for c in caps if self.check_extension(c) <= 0]
        if missing:
            raise KvmUnavailable("KVM lacks required capabilities: " + ", ".join(missing))

    def get_vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, SysIoctl.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID, asked once per process (~0.6 ms on a nested host, and
        the answer does not change): a fresh copy each call, for the caller to edit."""
        global _supported_cpuid
        if _supported_cpuid is None:
            cpuid = abi.flexible(abi.kvm_cpuid2, abi.kvm_cpuid_entry2,
                                 abi.KVM_MAX_CPUID_ENTRIES)()
            cpuid.hdr.nent = abi.KVM_MAX_CPUID_ENTRIES
            ioctl(self.fd, SysIoctl.KVM_GET_SUPPORTED_CPUID, cpuid)
            _supported_cpuid = cpuid
        return type(_supported_cpuid).from_buffer_copy(_supported_cpuid)

    def get_msr_index_list(self) -> list[int]:
        count = 64
        while True:
            lst = abi.flexible(abi.kvm_msr_list, abi.u32, count)()
            lst.hdr.nmsrs = count
            try:
                ioctl(self.fd, SysIoctl.KVM_GET_MSR_INDEX_LIST, lst)
            except KvmError as err:
                if err.errno == errno.E2BIG and lst.hdr.nmsrs > count:
                    count = lst.hdr.nmsrs
                    continue
                raise
            n = lst.hdr.nmsrs
            if n > count:  # the kernel must never report more than it wrote
                raise KvmError("KVM_GET_MSR_INDEX_LIST", errno.E2BIG)
            return list(lst.entries[:n])

    def create_vm(self) -> "Vm":
        return Vm(self, ioctl(self.fd, SysIoctl.KVM_CREATE_VM, 0))


class Vm(_CapsFd):
    """A VM fd."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm, self.fd = kvm, fd

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        region = abi.kvm_userspace_memory_region(slot, int(flags), gpa, size, host_addr)
        ioctl(self.fd, VmIoctl.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, VmIoctl.KVM_SET_TSS_ADDR, addr)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        ec = abi.kvm_enable_cap(cap=int(cap), flags=flags)
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, VmIoctl.KVM_ENABLE_CAP, ec)

    def get_dirty_log(self, slot: int, bitmap_addr: int) -> None:
        ioctl(self.fd, VmIoctl.KVM_GET_DIRTY_LOG, abi.kvm_dirty_log(slot, 0, bitmap_addr))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap_addr: int) -> None:
        ioctl(self.fd, VmIoctl.KVM_CLEAR_DIRTY_LOG,
              abi.kvm_clear_dirty_log(slot, num_pages, first_page, bitmap_addr))

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect the entries marked reset; returns how many."""
        return ioctl(self.fd, VmIoctl.KVM_RESET_DIRTY_RINGS)

    def create_irqchip(self) -> None:
        ioctl(self.fd, VmIoctl.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        ioctl(self.fd, VmIoctl.KVM_CREATE_PIT2, abi.kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, VmIoctl.KVM_IRQ_LINE, abi.kvm_irq_level(irq, level))

    def irqfd(self, fd: int, gsi: int, assign: bool = True) -> None:
        """KVM_IRQFD: a write to eventfd ``fd`` pulses interrupt ``gsi`` (an edge)."""
        ioctl(self.fd, VmIoctl.KVM_IRQFD,
              abi.kvm_irqfd(fd=fd, gsi=gsi, flags=0 if assign else abi.KVM_IRQFD_FLAG_DEASSIGN))

    def ioeventfd(self, fd: int, addr: int, length: int, assign: bool = True) -> None:
        """KVM_IOEVENTFD: a guest write of ``length`` bytes to MMIO ``addr`` signals
        eventfd ``fd`` in the kernel (no exit to the VMM)."""
        ioctl(self.fd, VmIoctl.KVM_IOEVENTFD, abi.kvm_ioeventfd(
            addr=addr, len=length, fd=fd,
            flags=0 if assign else abi.KVM_IOEVENTFD_FLAG_DEASSIGN))

    def get_irqchip(self, chip_id: int) -> abi.kvm_irqchip:
        chip = abi.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, VmIoctl.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: abi.kvm_irqchip) -> None:
        ioctl(self.fd, VmIoctl.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> abi.kvm_pit_state2:
        state = abi.kvm_pit_state2()
        ioctl(self.fd, VmIoctl.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: abi.kvm_pit_state2) -> None:
        ioctl(self.fd, VmIoctl.KVM_SET_PIT2, state)

    def get_clock(self) -> abi.kvm_clock_data:
        data = abi.kvm_clock_data()
        ioctl(self.fd, VmIoctl.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: abi.kvm_clock_data) -> None:
        ioctl(self.fd, VmIoctl.KVM_SET_CLOCK, data)

    def create_vcpu(self, index: int) -> "Vcpu":
        return Vcpu(self, index, ioctl(self.fd, VmIoctl.KVM_CREATE_VCPU, index))


class Vcpu(_Fd):
    """A vCPU fd and its mapped ``kvm_run`` page."""

    def __init__(self, vm: Vm, index: int, fd: int):
        self.vm, self.index, self.fd = vm, index, fd
        size = vm.kvm.get_vcpu_mmap_size()
        self._run_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = abi.kvm_run.from_buffer(self._run_map)
        self.run_addr = ctypes.addressof(self.run_struct)

    def close(self) -> None:
        if getattr(self, "_run_map", None) is not None:
            self.run_struct = None
            try:
                self._run_map.close()
            except BufferError:  # a caller still holds a view; freed with it
                pass
            self._run_map = None
        super().close()

    def run(self) -> Exit | None:
        """KVM_RUN once: the exit, as a typed record; None when it returned without an
        exit to handle: EINTR (a signal or immediate_exit), or EAGAIN (an AP waiting for
        INIT/SIPI just got it; the caller simply runs it again)."""
        ret = _libc.ioctl(self.fd, int(VcpuIoctl.KVM_RUN), None)
        if ret < 0:
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.EAGAIN):
                return None
            raise KvmError("KVM_RUN", err)
        return decode_exit(self.run_struct)

    def _get(self, request, struct_type):
        value = struct_type()
        ioctl(self.fd, request, value)
        return value

    def get_regs(self) -> abi.kvm_regs:
        return self._get(VcpuIoctl.KVM_GET_REGS, abi.kvm_regs)

    def set_regs(self, regs: abi.kvm_regs) -> None:
        ioctl(self.fd, VcpuIoctl.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        return self._get(VcpuIoctl.KVM_GET_SREGS, abi.kvm_sregs)

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        ioctl(self.fd, VcpuIoctl.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        return self._get(VcpuIoctl.KVM_GET_FPU, abi.kvm_fpu)

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        ioctl(self.fd, VcpuIoctl.KVM_SET_FPU, fpu)

    def set_cpuid2(self, cpuid) -> None:
        ioctl(self.fd, VcpuIoctl.KVM_SET_CPUID2, cpuid)

    def get_mp_state(self) -> abi.kvm_mp_state:
        return self._get(VcpuIoctl.KVM_GET_MP_STATE, abi.kvm_mp_state)

    def set_mp_state(self, state: abi.kvm_mp_state) -> None:
        ioctl(self.fd, VcpuIoctl.KVM_SET_MP_STATE, state)

    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        return self._get(VcpuIoctl.KVM_GET_VCPU_EVENTS, abi.kvm_vcpu_events)

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        ioctl(self.fd, VcpuIoctl.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self) -> abi.kvm_debugregs:
        return self._get(VcpuIoctl.KVM_GET_DEBUGREGS, abi.kvm_debugregs)

    def set_debugregs(self, regs: abi.kvm_debugregs) -> None:
        ioctl(self.fd, VcpuIoctl.KVM_SET_DEBUGREGS, regs)

    def set_guest_debug(self, control: int, debugreg=(0,) * 8) -> None:
        """KVM_SET_GUEST_DEBUG: ``control`` (abi.GuestDebug flags) and, with USE_HW_BP,
        DR0-3 and DR7 in ``debugreg``."""
        arg = abi.kvm_guest_debug(control=control)
        for i, v in enumerate(debugreg):
            arg.arch.debugreg[i] = v
        ioctl(self.fd, VcpuIoctl.KVM_SET_GUEST_DEBUG, arg)

    def get_xcrs(self) -> abi.kvm_xcrs:
        return self._get(VcpuIoctl.KVM_GET_XCRS, abi.kvm_xcrs)

    def set_xcrs(self, xcrs: abi.kvm_xcrs) -> None:
        ioctl(self.fd, VcpuIoctl.KVM_SET_XCRS, xcrs)

    def get_lapic(self) -> abi.kvm_lapic_state:
        return self._get(VcpuIoctl.KVM_GET_LAPIC, abi.kvm_lapic_state)

    def set_lapic(self, lapic: abi.kvm_lapic_state) -> None:
        ioctl(self.fd, VcpuIoctl.KVM_SET_LAPIC, lapic)

    def get_xsave(self, xsave2_size: int = 0) -> bytes:
        """KVM_GET_XSAVE2 into ``xsave2_size`` bytes (what KVM_CAP_XSAVE2 reports) when the
        kernel has it, else the legacy 4 KiB KVM_GET_XSAVE."""
        buf = (ctypes.c_uint8 * max(xsave2_size, ctypes.sizeof(abi.kvm_xsave)))()
        req = VcpuIoctl.KVM_GET_XSAVE2 if xsave2_size > 0 else VcpuIoctl.KVM_GET_XSAVE
        ioctl(self.fd, req, buf)
        return bytes(buf)

    def set_xsave(self, data: bytes) -> None:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        ioctl(self.fd, VcpuIoctl.KVM_SET_XSAVE, buf)

    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """KVM_GET_MSRS: (index, value) for the MSRs KVM read. KVM stops at the first MSR
        it cannot read, so the list may be shorter than ``indices``."""
        msrs = _msr_request(tuple(indices))
        got = ioctl(self.fd, VcpuIoctl.KVM_GET_MSRS, msrs)
        if got > len(indices):
            raise KvmError(f"KVM_GET_MSRS (returned {got} of {len(indices)})", errno.EINVAL)
        # Unpacked from the bytes at once: ~2x faster than reading each ctypes entry,
        # and a save reads every vCPU's MSRs inside its downtime.
        return [(i, d) for i, _, d in _MSR_ENTRY.iter_unpack(
            ctypes.string_at(ctypes.addressof(msrs) + 8, 16 * got))]

    def set_msrs(self, items: list[tuple[int, int]]) -> int:
        """KVM_SET_MSRS: how many of ``items`` KVM wrote (it stops at the first it refuses)."""
        msrs = abi.flexible(abi.kvm_msrs, abi.kvm_msr_entry, len(items))()
        msrs.hdr.nmsrs = len(items)
        for e, (index, data) in zip(msrs.entries, items):
            e.index, e.data = index, data
        return ioctl(self.fd, VcpuIoctl.KVM_SET_MSRS, msrs)
