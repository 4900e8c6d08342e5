"""`kvmguest inspect`: a snapshot's layout, pages, state summary, and validity."""

from __future__ import annotations

import ctypes
import os

from kvmguest import abi

from . import format as fmt
from .format import SnapshotError
from .reader import validate


def _vcpu_summary(state: dict) -> dict:
    v = state["vcpus"][0]
    regs = abi.kvm_regs.from_buffer_copy(bytes.fromhex(v["regs"]))
    sregs = abi.kvm_sregs.from_buffer_copy(bytes.fromhex(v["sregs"]))
    if sregs.efer & (1 << 10):
        mode = "64-bit long mode"
    elif sregs.cr0 & 1:
        mode = "32-bit protected mode"
    else:
        mode = "real mode"
    guest = state.get("guest", {})
    return {"rip": regs.rip, "rsp": regs.rsp, "cr3": sregs.cr3, "mode": mode,
            "msrs": len(v["msrs"]), "kernel": guest.get("kernel"), "cmdline": guest.get("cmdline"),
            "xsave_bytes": len(v["xsave"]) // 2, "regs_bytes": ctypes.sizeof(abi.kvm_regs)}


def describe(path: str) -> dict:
    info: dict = {"path": path, "valid": False}
    try:
        st = os.stat(path)
        info["file_size"], info["allocated"] = st.st_size, st.st_blocks * 512
        with open(path, "rb") as f:
            if f.read(8) == b"KVMGSTRM":
                info["error"] = ("streaming-format file: inspect reads mapped-ram snapshots; "
                                 "`kvmguest restore` can replay it")
                return info
        snap = validate(path)
    except OSError as err:
        info["error"] = f"cannot read: {err.strerror}"
        return info
    except SnapshotError as err:
        info["error"] = str(err)
        return info
    info.update(valid=True, format="mapped-ram", version=fmt.VERSION, ram_size=snap.ram_size,
                pages_present=snap.pages_present,
                blocks=[{"name": b.name, "slot": b.slot, "gpa": b.gpa, "size": b.size,
                         "pages": b.npages, "pages_present": b.pages_present,
                         "pages_offset": b.pages_offset, "bitmap_offset": b.bitmap_offset}
                        for b in snap.layout.blocks],
                state=_vcpu_summary(snap.state), state_length=snap.state_length)
    return info
