"""Small QEMU migration files made by hand, as hostile input: the fields migrate/formats/qemu.py
reads, in QEMU's layout (big-endian; migration/savevm.c and ram.c), nothing more."""

from __future__ import annotations

import json
import os
import struct

PAGE = 4096


def _name(text: str) -> bytes:
    raw = text.encode()
    return bytes([len(raw)]) + raw


def qemu_file(path, blocks, *, pages=(), mapped_bitmaps=None, page_bits: int = 12,
              pages_offset: int | None = None) -> None:
    """Write a complete QEMU file at ``path``.

    ``blocks``: [(name, size)]. ``pages``: stream records [(block, page index, data or
    None for a zero page)]. ``mapped_bitmaps``: for a mapped-ram file, per block the
    bitmap bytes to write (its page area is left a hole: the file is sparse)."""
    ps = 1 << page_bits
    mapped = mapped_bitmaps is not None
    caps = ["mapped-ram"] if mapped else []
    head = b"QEVM" + struct.pack(">I", 3) + b"\x07"
    head += struct.pack(">I", 2) + b"pc"
    head += b"\x05" + _name("configuration/target-page-bits") + struct.pack(">II", 1, page_bits)
    head += b"\x05" + _name("configuration/capabilities") + struct.pack(">II", 1, len(caps))
    head += b"".join(_name(c) for c in caps)
    head += b"\x01" + struct.pack(">I", 2) + _name("ram") + struct.pack(">II", 0, 4)
    total = sum(size for _, size in blocks)
    pieces = [(0, head + struct.pack(">Q", total | 0x04))]       # (offset, bytes)
    cur = len(pieces[0][1])
    for i, (name, size) in enumerate(blocks):
        rec = _name(name) + struct.pack(">Q", size)
        if mapped:        # QEMU's stream carries on after each block's page area
            bitmap = mapped_bitmaps[i]
            bitmap_at = _up(cur + len(rec) + 28)
            need = -(-(size // ps) // 64) * 8                      # the bitmap QEMU reserves
            area = pages_offset if pages_offset is not None else _up(bitmap_at + max(len(bitmap), need))
            rec += struct.pack(">IQQQ", 1, ps, bitmap_at, area)
            pieces += [(cur, rec), (bitmap_at, bitmap)]
            cur = area + size
        else:
            pieces.append((cur, rec))
            cur += len(rec)
    tail = bytearray()
    if not mapped:
        for block, index, data in pages:
            word = index * ps | (0x02 if data is None else 0x08)
            tail += struct.pack(">Q", word) + _name(block)
            tail += b"\0" if data is None else data.ljust(ps, b"\0")
    tail += struct.pack(">Q", 0x10)                                   # EOS
    tail += b"\x03" + struct.pack(">I", 2) + struct.pack(">Q", 0x10)   # SECTION_END, EOS
    desc = json.dumps({"page_size": ps, "devices": []}).encode()
    tail += b"\x00\x06" + struct.pack(">I", len(desc)) + desc
    pieces.append((cur, bytes(tail)))
    with open(path, "wb") as f:            # what is not written stays a hole
        for at, data in pieces:
            f.seek(at)
            f.write(data)
    os.chmod(path, 0o600)


def _up(n: int, align: int = 1 << 20) -> int:
    return -(-n // align) * align
