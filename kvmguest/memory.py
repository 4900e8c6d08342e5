"""Guest RAM: regions backed by anonymous mmap, numpy views, gpa translation and the
host-side dirty bitmap that records the VMM's own writes (KVM's log cannot see them)."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import stat
import threading
from dataclasses import dataclass

from .abi import KVM_MEM_MAX_NR_PAGES, PAGE_SIZE
from .errors import EXIT_BAD_INPUT, KvmguestError
from .lazy import lazy_numpy

np = lazy_numpy()

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
# Memory a device keeps for itself (a disk's copy-on-write overlay) is saved with RAM, as
# blocks of their own: they sit at "guest-physical" addresses from 2^52 up, beyond any
# x86 physical address, so that they can never be taken for RAM. KVM never sees them.
DEVICE_SPACE = 1 << 52
# /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
PM_PRESENT, PM_SWAPPED, PM_FILE = 1 << 63, 1 << 62, 1 << 61


class GuestMemoryError(KvmguestError, ValueError):
    """A guest-physical access outside RAM, or a bad memory size."""

    exit_code = EXIT_BAD_INPUT


@dataclass(frozen=True)
class RegionSpec:
    """Where a RAM block sits: KVM slot, guest-physical base, size in bytes, name."""
    slot: int
    gpa: int
    size: int
    name: str


@functools.lru_cache(maxsize=1)
def host_phys_bits() -> int:
    """The host CPU's physical address width (what KVM offers a guest at most)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("address sizes"):
                    return int(line.split(":")[1].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return 36       # the architectural minimum


def size_text(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} bytes"


def check_layout(specs) -> None:
    """The one policy for guest RAM, shared by ``run`` and ``restore``: every slot within
    KVM's per-slot limit and all RAM inside the guest-physical address space of this host.
    Whatever boots here can therefore be restored here; how much of it the host must
    really back is a separate question (present pages, see migrate.reader)."""
    bits = host_phys_bits()
    device = [s for s in specs if s.gpa >= DEVICE_SPACE]
    for s in device:
        if s.gpa + s.size > 1 << 63:
            raise GuestMemoryError(f"device memory {s.name} ends beyond {1 << 63:#x}")
    specs = [s for s in specs if s.gpa < DEVICE_SPACE]
    if not specs:
        raise GuestMemoryError("no guest RAM")
    end = max(s.gpa + s.size for s in specs)
    if end > 1 << bits:
        total = sum(s.size for s in specs)
        raise GuestMemoryError(
            f"{size_text(total)} of guest RAM would end at guest-physical {end:#x}, beyond "
            f"the {size_text(1 << bits)} ({bits}-bit) guest-physical address space of this host")
    for s in specs:
        if s.size // PAGE_SIZE > KVM_MEM_MAX_NR_PAGES:
            raise GuestMemoryError(
                f"guest RAM block {s.name} of {size_text(s.size)} exceeds KVM's limit of "
                f"{size_text(KVM_MEM_MAX_NR_PAGES * PAGE_SIZE)} per memory slot")


def close_mapping(m: mmap.mmap) -> None:
    """Close an mmap; where a caller still holds a view of it (a numpy array), it is
    unmapped when the last view goes instead."""
    try:
        m.close()
    except BufferError:
        pass


class Region:
    """One RAM block: an anonymous (or file-backed, private) mapping and its numpy view."""

    def __init__(self, spec: RegionSpec, mapping: mmap.mmap | None = None, memfd: int = -1):
        self.spec = spec
        self.slot, self.gpa, self.size, self.name = spec.slot, spec.gpa, spec.size, spec.name
        # Dropping pages of an anonymous mapping zeroes them; of a file mapping, it
        # brings the file's bytes back (of a memfd's shared mapping: they stay as they are).
        self.anonymous = mapping is None
        self.memfd = memfd          # shared memory (GuestMemory.shared): the memfd, owned
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
        try:
            self.map = mapping if mapping is not None else mmap.mmap(
                -1, spec.size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, OverflowError) as err:
            raise GuestMemoryError(f"cannot reserve {size_text(spec.size)} of address space for "
                                   f"guest RAM ({getattr(err, 'strerror', None) or err})") from err
        if mapping is None and hasattr(mmap, "MADV_HUGEPAGE"):
            # Transparent huge pages, as QEMU asks for guest RAM: far fewer page faults
            # when RAM is filled (a restore reads ~2x faster here); KVM splits them for
            # dirty logging as needed.
            self.map.madvise(mmap.MADV_HUGEPAGE)
        # The address without numpy (imported only when first needed: views, harvests).
        anchor = ctypes.c_char.from_buffer(self.map)
        self.host_addr = ctypes.addressof(anchor)
        del anchor
        self._array = None
        self.npages = spec.size // PAGE_SIZE
        # The VMM's own writes since the last harvest, as page ranges [first, last).
        self.host_marks: list[tuple[int, int]] = []

    @property
    def array(self):
        """The region as a flat uint8 numpy array (a view of the mapping, no copy)."""
        if self._array is None and self.map is not None:
            self._array = np.frombuffer(self.map, dtype=np.uint8)
        return self._array


    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end

    def pages(self) -> np.ndarray:
        """The region as a (npages, PAGE_SIZE) uint8 array (a view, no copy)."""
        return self.array.reshape(self.npages, PAGE_SIZE)

    def maybe_nonzero(self) -> np.ndarray:
        """bool per page: False where the page is certainly all zeros.

        For anonymous memory a page that is neither present nor swapped (per
        /proc/self/pagemap) was never written, or was dropped, so it reads as zeros.
        File-backed pages may hold data anywhere, so they are all "maybe"."""
        if self.memfd >= 0:
            return self._memfd_data()
        entries = self.pagemap() if self.anonymous else None
        if entries is None:
            return np.ones(self.npages, dtype=np.bool_)
        return (entries & np.uint64(PM_PRESENT | PM_SWAPPED)) != 0

    def _memfd_data(self) -> np.ndarray:
        """Shared memory: the pages in the memfd's data extents (a hole reads as zeros)."""
        out = np.zeros(self.npages, dtype=np.bool_)
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.memfd, pos, os.SEEK_DATA)
            except OSError:                     # ENXIO: no data beyond pos
                break
            end = min(os.lseek(self.memfd, start, os.SEEK_HOLE), self.size)
            out[start // PAGE_SIZE:-(-end // PAGE_SIZE)] = True
            pos = end
        return out

    def pagemap(self) -> np.ndarray | None:
        """This process's /proc/self/pagemap entries for the region (None if unreadable)."""
        try:
            with open("/proc/self/pagemap", "rb", buffering=0) as f:
                f.seek(self.host_addr // PAGE_SIZE * 8)
                raw = f.read(self.npages * 8)
        except OSError:
            return None
        if len(raw) != self.npages * 8:
            return None
        return np.frombuffer(raw, dtype=np.uint64)

    def private_pages(self) -> np.ndarray | None:
        """bool per page: backed by this process's own memory (written, or anonymous and
        faulted in), not by a file's page cache. None if pagemap is unreadable."""
        entries = self.pagemap()
        if entries is None:
            return None
        return ((entries & np.uint64(PM_PRESENT | PM_SWAPPED)) != 0) & \
            ((entries & np.uint64(PM_FILE)) == 0)

    def close(self) -> None:
        self._array = None
        if self.map is not None:
            close_mapping(self.map)
            self.map = None
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


def shared_region(spec: RegionSpec, memfd: int, fresh: bool = False) -> Region:
    """A region on ``memfd`` (which it then owns), mapped shared; ``fresh``: sized here.
    GuestMemoryError if the memfd is not of the region's size."""
    try:
        if fresh:
            os.ftruncate(memfd, spec.size)
        st = os.fstat(memfd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != spec.size:
            raise GuestMemoryError(f"{spec.name}: the memory handed over is {st.st_size} "
                                   f"bytes, not {spec.size}")
        mapping = mmap.mmap(memfd, spec.size, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as err:
        os.close(memfd)
        raise GuestMemoryError(f"{spec.name}: cannot map shared memory: {err.strerror}") \
            from None
    except BaseException:
        os.close(memfd)
        raise
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return Region(spec, mapping, memfd)


class GuestMemory:
    """All RAM of one VM: the regions, translation, and VMM writes with dirty tracking."""

    def __init__(self, regions: list[Region]):
        # Guest RAM (what KVM maps and the guest addresses) and device memory (saved
        # with it: see DEVICE_SPACE).
        self.regions = sorted((r for r in regions if r.gpa < DEVICE_SPACE), key=lambda r: r.gpa)
        self.device_regions = sorted((r for r in regions if r.gpa >= DEVICE_SPACE),
                                     key=lambda r: r.gpa)
        self._lock = threading.Lock()
        self._closers: list = []
        # A flush (flush_page) makes a page read-only for a moment. Reads of guest RAM
        # from any thread (a save's writer, a checkpoint) never fault on it; the VMM's own
        # writes take this lock, and a vCPU whose KVM_RUN met the window with EFAULT asks
        # fault_was_flush() whether to run again. protect_seq counts the windows.
        self.protect_lock = threading.Lock()
        self.protect_seq = 0
        # Some slots are split around read-only pages (a gdb write watchpoint, see
        # Platform.protect_pages): dirty logging, which works per region slot, waits.
        self.split_slots = False

    @classmethod
    def anonymous(cls, specs: list[RegionSpec]) -> "GuestMemory":
        """Fresh, zeroed RAM in the slots ``specs`` plans (arch.x86.layout.plan_regions)."""
        return cls([Region(s) for s in specs])

    @classmethod
    def shared(cls, specs: list[RegionSpec]) -> "GuestMemory":
        """Fresh RAM, each region a memfd mapped shared: another process given the memfd
        (a local migration, migrate/live.py) maps the same pages, none copied."""
        regions = []
        try:
            for s in specs:
                regions.append(shared_region(s, os.memfd_create(f"kvmguest-{s.name}",
                                                                os.MFD_CLOEXEC), fresh=True))
        except OSError as err:
            for r in regions:
                r.close()
            raise GuestMemoryError(f"cannot make shared guest memory: {err.strerror}") from None
        return cls(regions)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def saved_regions(self) -> list[Region]:
        """Every block a snapshot, checkpoint or reset carries: RAM, then device memory."""
        return self.regions + self.device_regions

    def add_device_region(self, region: Region) -> None:
        """Device memory created with the machine (before any dirty tracking starts)."""
        if region.gpa < DEVICE_SPACE:
            raise ValueError(f"device memory {region.name} below DEVICE_SPACE")
        self.device_regions = sorted(self.device_regions + [region], key=lambda r: r.gpa)

    def device_region(self, slot: int) -> Region | None:
        return next((r for r in self.device_regions if r.slot == slot), None)

    def region_at(self, gpa: int, length: int = 1) -> Region:
        for r in self.regions:
            if r.contains(gpa, length):
                return r
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{length:#x} is not in RAM")

    def region_of_slot(self, slot: int) -> Region:
        for r in self.saved_regions:
            if r.slot == slot:
                return r
        raise GuestMemoryError(f"no RAM region in slot {slot}")

    def is_ram(self, gpa: int, length: int = 1) -> bool:
        return any(r.contains(gpa, length) for r in self.regions)

    def view(self, gpa: int, length: int) -> np.ndarray:
        """A read-only-by-convention numpy view of guest memory (use write() to modify)."""
        r = self.region_at(gpa, length)
        off = gpa - r.gpa
        return r.array[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return self.view(gpa, length).tobytes()

    def _mark(self, r: Region, off: int, length: int) -> None:
        if length:
            with self._lock:
                r.host_marks.append((off // PAGE_SIZE, (off + length - 1) // PAGE_SIZE + 1))

    def device_write(self, r: Region, off: int, data) -> None:
        """Copy ``data`` into device memory ``r`` at ``off``, marked dirty as RAM is."""
        r.map[off:off + len(data)] = data
        self._mark(r, off, len(data))

    def device_fill(self, r: Region, off: int, fd: int, length: int, offset: int) -> int:
        """Read ``length`` bytes of ``fd`` into device memory ``r`` at ``off``."""
        return self._fill(r, off, fd, length, offset)

    def _fill(self, r: Region, off: int, fd: int, length: int, offset: int) -> int:
        """preadv ``length`` bytes of ``fd`` into ``r`` at ``off``, marked; the bytes read
        (fewer at end of file)."""
        view = memoryview(r.map)[off:off + length]
        done = 0
        try:
            while done < length:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    break
                done += n
        finally:
            view.release()
        self._mark(r, off, done)
        return done

    def write(self, gpa: int, data) -> None:
        """Copy ``data`` into guest RAM and mark the pages dirty for the VMM's bitmap."""
        buf = data if isinstance(data, (bytes, bytearray, memoryview)) else bytes(data)
        r = self.region_at(gpa, len(buf))
        off = gpa - r.gpa
        with self.protect_lock:
            r.map[off:off + len(buf)] = buf
        self._mark(r, off, len(buf))

    def fill_from(self, gpa: int, fd: int, length: int, offset: int = 0) -> int:
        """Read ``length`` bytes of ``fd`` (from ``offset``) straight into guest RAM at
        ``gpa`` (no copy held in the VMM); the bytes read (fewer at end of file)."""
        r = self.region_at(gpa, length)
        with self.protect_lock:
            return self._fill(r, gpa - r.gpa, fd, length, offset)

    def write_struct(self, gpa: int, struct: ctypes.Structure) -> None:
        self.write(gpa, bytes(struct))

    def zero(self, gpa: int, length: int) -> None:
        """Zero a range; whole pages are dropped (MADV_DONTNEED) so nothing gets resident."""
        r = self.region_at(gpa, length)
        off, end = gpa - r.gpa, gpa - r.gpa + length
        first_full = -(-off // PAGE_SIZE) * PAGE_SIZE
        last_full = end // PAGE_SIZE * PAGE_SIZE
        with self.protect_lock:
            if first_full < last_full and r.anonymous:
                r.map.madvise(mmap.MADV_DONTNEED, first_full, last_full - first_full)
                r.map[off:first_full] = bytes(first_full - off)
                r.map[last_full:end] = bytes(end - last_full)
            else:
                r.map[off:end] = bytes(end - off)
        self._mark(r, off, length)

    def flush_page(self, gpa: int) -> bool:
        """Make KVM drop its mapping of the RAM page at ``gpa`` (pc-testdev's flush):
        write-protect the host page and give write access back, so the MMU notifier
        fires. Read-only, never PROT_NONE as QEMU does: another thread may be reading
        guest RAM (a save's writer scanning for zero pages) and must not fault. False
        when ``gpa`` is not RAM or the kernel refused (nothing changed then)."""
        gpa &= ~(PAGE_SIZE - 1)
        if not self.is_ram(gpa, PAGE_SIZE):
            return False
        r = self.region_at(gpa, PAGE_SIZE)
        host = r.host_addr + gpa - r.gpa
        with self.protect_lock:
            self.protect_seq += 1
            if _libc.mprotect(host, PAGE_SIZE, mmap.PROT_READ) != 0:
                return False        # e.g. ENOMEM: too many mappings; the page is as it was
            # Giving write access back splits nothing new and cannot fail for want of
            # memory; if it ever did, the page would stay read-only: say so, loudly.
            for _ in range(3):
                if _libc.mprotect(host, PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE) == 0:
                    return True
            err = ctypes.get_errno()
            raise GuestMemoryError(f"cannot make guest page {gpa:#x} writable again after a "
                                   f"flush: {os.strerror(err)}")

    def fault_was_flush(self, seen: int | None) -> int | None:
        """After a KVM_RUN that failed with EFAULT: wait for any flush window to close;
        the window count if a flush may have caused the fault (it differs from ``seen``,
        what the caller got last time: run again), else None (a real fault)."""
        with self.protect_lock:
            seq = self.protect_seq
        return seq if seq != seen and seq else None

    def take_host_dirty_pages(self, r: Region) -> np.ndarray:
        """The pages the VMM wrote in ``r`` since the last call, sorted, and reset; cheap
        when nothing was written."""
        with self._lock:
            marks, r.host_marks = r.host_marks, []
        if not marks:
            return np.empty(0, dtype=np.int64)
        bits = np.zeros(r.npages, dtype=np.bool_)
        for first, last in marks:
            bits[first:last] = True
        return np.flatnonzero(bits)

    def on_close(self, fn) -> None:
        """Call ``fn()`` when this memory is closed (before it is unmapped)."""
        self._closers.append(fn)

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()
        for r in self.saved_regions:
            r.close()
