"""`kvmguest inspect`: a snapshot's layout, pages, state summary, and validity.

Every format is described (mapped-ram, the streaming baseline, checkpoint files, and
QEMU's migration files: their RAM blocks, mapped-ram or not); a file that cannot
be read at all is said to be unreadable, with why, not called invalid."""

from __future__ import annotations

import os

from kvmguest.errors import EXIT_BAD_INPUT, EXIT_FAILED
from kvmguest.memory import PAGE_SIZE
from kvmguest.state import vcpu_summary

from .format import SnapshotError
from .reader import validate
from .snapshot import open_snapshot, reader_for


def describe_mapped(info: dict, path: str, fd: int) -> None:
    snap = validate(path, fd)
    info.update(valid=True, format="mapped-ram", version=snap.version, ram_size=snap.ram_size,
                pages_present=snap.pages_present,
                blocks=[{"name": b.name, "slot": b.slot, "gpa": b.gpa, "size": b.size,
                         "pages": b.npages, "pages_present": b.pages_present,
                         "pages_offset": b.pages_offset, "bitmap_offset": b.bitmap_offset}
                        for b in snap.layout.blocks],
                state=vcpu_summary(snap.state), state_length=snap.state_length,
                vcpus=len(snap.state["vcpus"]), irqchip="irqchip" in snap.state.get("vm", {}))


def describe_stream(info: dict, path: str, fd: int) -> None:
    from .stream import VERSION, page_census, validate_stream
    s = validate_stream(path, fd)
    present, records = page_census(s, fd)
    info.update(valid=True, format="stream", version=VERSION,
                ram_size=sum(b.size for b in s.blocks), pages_present=int(sum(present)),
                page_records=s.pages, zero_records=s.zero_records,
                blocks=[{"name": b.name, "slot": b.slot, "gpa": b.gpa, "size": b.size,
                         "pages": b.npages, "pages_present": int(n), "records": int(r)}
                        for b, n, r in zip(s.blocks, present, records)],
                state=vcpu_summary(s.state), vcpus=len(s.state["vcpus"]),
                irqchip="irqchip" in s.state.get("vm", {}))


def describe_checkpoint(info: dict, path: str, fd: int) -> None:
    from .checkpoint import COMMITTED, VERSION, validated_checkpoint
    ck = validated_checkpoint(path, fd)
    r = ck.record
    info.update(valid=True, format="checkpoint", version=VERSION,
                ram_size=sum(b["size"] for b in ck.layout.blocks),
                blocks=[{"name": b["name"], "slot": b["slot"], "gpa": b["gpa"],
                         "size": b["size"], "pages": b["size"] // PAGE_SIZE,
                         "pages_offset": b["pages_offset"]} for b in ck.layout.blocks],
                checkpoints=r.generation, checkpoint_time_ns=r.time_ns,
                journal_pending=r.kind == COMMITTED and r.journal_pages > 0,
                history=ck.history, state=vcpu_summary(ck.state),
                vcpus=len(ck.state["vcpus"]), irqchip="irqchip" in ck.state.get("vm", {}))


def describe_qemu(info: dict, path: str, fd: int) -> None:
    from .qemu import read_qemu
    q = read_qemu(fd)
    blocks = []
    for b in q.blocks:
        d = {"name": b.name, "size": b.size, "pages": b.npages, "pages_present": b.pages_present}
        if q.mapped_ram:
            d.update(pages_offset=b.pages_offset, bitmap_offset=b.bitmap_offset)
        else:
            d.update(records=b.records, zero_records=b.zero_records)
        blocks.append(d)
    info.update(valid=True, format="qemu mapped-ram" if q.mapped_ram else "qemu stream",
                version=q.version, machine=q.machine, capabilities=q.capabilities,
                page_size=q.page_size, ram_size=q.ram_size,
                pages_present=sum(b["pages_present"] for b in blocks), blocks=blocks,
                vmdesc_length=q.vmdesc_length)


def describe(path: str) -> dict:
    """What ``path`` is: ``valid`` with its layout, or a ``verdict`` (INVALID, UNREADABLE)
    and the ``error``; ``exit_code`` for the CLI."""
    info: dict = {"path": path, "valid": False}
    try:
        fd = open_snapshot(path)
    except SnapshotError as err:
        info.update(verdict="UNREADABLE", error=str(err), exit_code=EXIT_BAD_INPUT)
        return info
    try:
        st = os.fstat(fd)
        info["file_size"], info["allocated"] = st.st_size, st.st_blocks * 512
        try:
            reader_for(path, fd).describe(info)
        except OSError as err:
            info.update(verdict="UNREADABLE", error=f"cannot read: {err.strerror}",
                        exit_code=EXIT_BAD_INPUT)
        except SnapshotError as err:
            info.update(verdict="INVALID", error=str(err), exit_code=EXIT_FAILED)
    finally:
        os.close(fd)
    return info
