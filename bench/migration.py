"""Save, restore, file size against passes, and dirty-log harvest, for our own code."""

from __future__ import annotations

import glob
import os
import time

import numpy as np

from kvmguest.abi import PAGE_SIZE
from kvmguest.machine import Machine
from migrate.precopy import live_save
from migrate.reader import restore

from . import disk
from .common import GUESTS, Figure, Report

MiB, GiB, PAGE = 1 << 20, 1 << 30, PAGE_SIZE
WS_BASE = 16 * MiB
WS_PAGES = 4096                      # the guest's own working set (16 MiB)
FILL_FROM = 32 * MiB                 # "full": the VMM fills RAM from here up


def label(nbytes: int) -> str:
    return f"{nbytes >> 30} GiB" if nbytes >= GiB else f"{nbytes >> 20} MiB"


def start_guest(ram: int, ws_pages: int = WS_PAGES, quiet: bool = True) -> Machine:
    m = Machine(str(GUESTS / "dirty.elf"), memory=ram,
                cmdline=f"pages={ws_pages} base={WS_BASE} passes=0" + (" quiet" if quiet else ""))
    m.start()
    deadline = time.monotonic() + 60
    while "dirty: range" not in m.serial.text():
        if time.monotonic() > deadline:
            raise RuntimeError("dirty guest did not start")
        time.sleep(0.01)
    time.sleep(0.3)
    return m


def fill_ram(m: Machine) -> int:
    """Non-zero data in every page from FILL_FROM up: a guest whose RAM is full."""
    filled = 0
    for r in m.memory.regions:
        start = max(0, FILL_FROM - r.gpa)
        if start >= r.size:
            continue
        words = r.array[start:].view(np.uint64)
        words[::512] = np.arange(1, len(words[::512]) + 1, dtype=np.uint64)
        filled += r.size - start
    return filled


def save_figures(report: Report, workdir: str, sizes: list[int], runs: int,
                 ceilings: dict, configs: list[tuple[bool, int]]) -> dict:
    """Live saves of a running guest, as checkpoints (the guest runs on between runs)."""
    snaps = {}
    for ram in sizes:
        for ws in ("full", "small"):
            m = start_guest(ram)
            try:
                if ws == "full":
                    fill_ram(m)
                for direct, threads in configs:
                    path = os.path.join(workdir, f"save-{ram >> 20}-{ws}.snap")
                    reports = []
                    for _ in range(runs):
                        if os.path.exists(path):
                            os.unlink(path)
                        reports.append(live_save(m, path, threads=threads, direct=direct,
                                                 then="continue"))
                    mode = "O_DIRECT" if direct else "buffered"
                    name = f"save {label(ram)} {ws} RAM, {mode}, {threads} thread(s)"
                    thr = [r.bytes_written / r.total_seconds / 1e9 for r in reports]
                    ceiling = ceilings.get(("write", direct, ram)) or ceilings.get(
                        ("write", direct, min(k[2] for k in ceilings if k[0] == "write")))
                    fig = Figure(name + ": throughput", "GB/s", thr, baseline=ceiling.name)
                    if ws == "full":
                        fig.target = ">= 90% of the ceiling"
                        fig.met = fig.median >= 0.9 * ceiling.median
                    report.add(fig)
                    last = reports[-1]
                    report.add(Figure(name + ": wall time", "ms",
                                      [r.total_seconds * 1e3 for r in reports],
                                      note=f"{np.median([len(r.passes) for r in reports]):.0f} "
                                           f"passes; file {last.file_size / MiB:.0f} MiB "
                                           f"apparent, {last.allocated / MiB:.0f} MiB allocated"))
                    down = report.add(Figure(name + ": downtime", "ms",
                                             [r.downtime_ms for r in reports],
                                             target="<= 50 ms"))
                    down.met = down.median <= 50
                    snaps[ram, ws] = path
            finally:
                m.close()
    return snaps


def restore_figures(report: Report, snaps: dict, sizes: list[int], runs: int,
                    ceilings: dict) -> None:
    for ram in sizes:
        path = snaps.get((ram, "full"))
        if path is None:
            continue
        for cold in (True, False):
            samples = []
            for _ in range(runs):
                if cold:
                    disk.drop_cache(path)
                else:
                    restore(path)[0].close()       # warm the cache
                t = time.perf_counter()
                m, rep = restore(path, threads=2)
                secs = time.perf_counter() - t
                m.close()
                samples.append(rep.bytes_loaded / secs / 1e9)
            ceiling = ceilings.get(("read", cold, ram)) or ceilings.get(
                ("read", cold, min(k[2] for k in ceilings if k[0] == "read")))
            fig = Figure(f"restore {label(ram)} full RAM, preadv, {'cold' if cold else 'warm'}",
                         "GB/s", samples, baseline=ceiling.name, target=">= 90% of the ceiling")
            fig.met = fig.median >= 0.9 * ceiling.median
            report.add(fig)


def lazy_figures(report: Report, workdir: str, sizes: list[int], runs: int) -> None:
    """Lazy restore: call to the vCPU's first KVM_RUN, flat in RAM size; then how long the
    guest takes to finish a pass over its working set (every page touched) from there."""
    first = None
    for ram in sizes:
        path = os.path.join(workdir, f"lazy-{ram >> 20}.snap")
        m = start_guest(ram, quiet=False)
        try:
            live_save(m, path, then="stop")
        finally:
            m.close()
        ready, touch, eager_touch = [], [], []
        for lazy in (True, False):
            for _ in range(runs):
                disk.drop_cache(path)
                t = time.perf_counter()
                r, _ = restore(path, lazy=lazy)
                r.start()
                while r.first_run_at is None and r.running:
                    time.sleep(0.0002)
                t_ready = r.first_run_at - t
                n = r.serial.text().count(" ok")
                while r.serial.text().count(" ok") == n:
                    time.sleep(0.001)
                t_touch = time.perf_counter() - t
                r.close()
                if lazy:
                    ready.append(t_ready * 1e3)
                    touch.append(t_touch * 1e3)
                else:
                    eager_touch.append(t_touch * 1e3)
        floor = report.add(Figure(f"floor {label(ram)}: KVM VM + memory slots of that size",
                                  "ms", [slot_floor(ram) for _ in range(runs)]))
        fig = Figure(f"lazy restore {label(ram)}: call to first guest instruction", "ms", ready,
                     baseline=floor.name, target="flat in RAM size; <= 20 ms",
                     note=f"vs {first}" if first else "")
        fig.met = fig.median <= 20
        first = first or fig.name
        report.add(fig)
        report.add(Figure(f"lazy restore {label(ram)}: call to working set touched (next pass "
                          "verified)", "ms", touch))
        report.add(Figure(f"eager restore {label(ram)}: call to working set touched", "ms",
                          eager_touch))
        os.unlink(path)


def slot_floor(ram: int) -> float:
    """ms to create a VM and register RAM of this size (the kernel's per-slot cost)."""
    from kvmguest.kvm import Kvm
    from kvmguest.memory import GuestMemory
    from kvmguest.arch.x86.layout import plan_regions
    with Kvm() as kvm:
        mem = GuestMemory.anonymous(plan_regions(ram))
        t = time.perf_counter()
        vm = kvm.create_vm()
        for r in mem.regions:
            vm.set_user_memory_region(r.slot, r.gpa, r.size, r.host_addr)
        secs = time.perf_counter() - t
        vm.close()
        mem.close()
    return secs * 1e3


def size_curve(workdir: str, ram: int, passes: int) -> dict:
    """File size after each pass, mapped-ram vs streaming (the README's picture)."""
    curves = {}
    for fmt_name in ("mapped", "stream"):
        m = start_guest(ram)
        path = os.path.join(workdir, f"curve-{fmt_name}.snap")
        sizes, alloc = [], []

        def sample(*_):
            tmp = glob.glob(os.path.join(workdir, f".curve-{fmt_name}.snap.*.tmp"))
            if tmp:
                st = os.stat(tmp[0])
                sizes.append(st.st_size)
                alloc.append(st.st_blocks * 512)
            time.sleep(0.02)           # a slower disk, in effect: the guest re-dirties pages

        try:
            live_save(m, path, format=fmt_name, min_passes=passes, max_passes=passes,
                      then="stop", progress=sample)
        finally:
            m.close()
        st = os.stat(path)
        sizes.append(st.st_size)
        alloc.append(st.st_blocks * 512)
        curves[fmt_name] = {"apparent": sizes, "allocated": alloc}
        os.unlink(path)
    return curves


def harvest_figures(report: Report, ram: int, runs: int) -> None:
    m = start_guest(ram)
    try:
        client = m.dirty.open("bench")
        raw, ours = [], []
        for _ in range(max(runs, 25)):
            time.sleep(0.02)
            t = time.perf_counter()
            for r in m.memory.regions:      # the backend's ioctls alone (GET, and CLEAR
                m.dirty.backend.harvest_kvm(r)  # when manual protect is on), no expansion
            raw.append((time.perf_counter() - t) * 1e3)
            time.sleep(0.02)
            t = time.perf_counter()
            client.take()
            ours.append((time.perf_counter() - t) * 1e3)
        base = report.add(Figure(f"dirty log {label(ram)}: raw GET+CLEAR_DIRTY_LOG ioctls", "ms",
                                 raw))
        fig = Figure(f"dirty log {label(ram)}: harvest() to page indices", "ms", ours,
                     baseline=base.name, target="<= 1.5x raw")
        fig.met = fig.median <= 1.5 * base.median
        report.add(fig)
    finally:
        m.close()
