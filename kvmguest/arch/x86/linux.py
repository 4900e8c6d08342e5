"""Linux kernels as users have them: a bzImage (a distribution's vmlinuz) or a vmlinux.

A vmlinux with ``CONFIG_PVH`` is an ELF carrying the PVH entry note, and boots as any PVH
kernel does. A bzImage is a real-mode setup stub, a decompressor, and the vmlinux ELF as
a compressed payload; kvmguest reads the setup header (Documentation/arch/x86/boot.rst),
decompresses the payload on the host with a well-kept library and boots the ELF inside
through PVH. (Booting the bzImage's own 64-bit entry would run its decompressor as guest
code: on a host that emulates kernel code, ~200 ns an instruction, that is minutes for a
Debian kernel, against 0.25 s here.) Header fields are input: anything off is a
BootError naming the field.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib

from .kernel import MAX_KERNEL, BootError
from .quirks import EMULATING_HOST_CMDLINE, EMULATING_HOST_CPU

SETUP_HEADER = 0x1F1
BOOT_FLAG_AT, BOOT_FLAG = 0x1FE, 0xAA55
HDRS_AT, HDRS = 0x202, b"HdrS"
VERSION_AT = 0x206
PAYLOAD_AT = 0x248                   # payload_offset, payload_length (boot protocol 2.08+)
MIN_VERSION = 0x208
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_BLOCK = 8 << 20                  # the legacy format's uncompressed block size

# Payload formats by their magic (arch/x86/boot/compressed: the kernel's own list).
FORMATS = [(b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x5d\x00\x00", "lzma"),
           (b"BZh", "bzip2"), (struct.pack("<I", LZ4_LEGACY_MAGIC), "lz4"),
           (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x89LZO", "lzo")]


COMMAND_LINE_SIZE = 2048            # x86 Linux keeps 2047 bytes of its command line


def check_cmdline(path: str, cmdline: str, added: list[str]) -> None:
    """BootError when Linux would cut ``cmdline`` (``added``: what kvmguest put after the
    user's words, which are what it would lose)."""
    size = len(cmdline.encode())
    if size < COMMAND_LINE_SIZE:
        return
    extra = [w for w in added if not w.startswith("--")]
    ours = f"; kvmguest adds {len(' '.join(extra)) + 1} bytes of it on this host " \
        f"({' '.join(w.split('=', 1)[0] for w in extra)}; --exact-cmdline: without)" \
        if extra else ""
    raise BootError(f"{path}: the command line is {size} bytes and Linux keeps "
                    f"{COMMAND_LINE_SIZE - 1}{ours}")


def with_workarounds(cmdline: str, cpu_model: str | None) -> tuple[str, str, list[str]]:
    """``cmdline`` and ``cpu_model`` with what an emulating host needs added, and what
    was added. A parameter the user gave (by its name) is theirs and stays as given; so
    is a CPU model that already says anything about cx16."""
    given = {word.split("=", 1)[0] for word in cmdline.split()}
    added = [w for w in EMULATING_HOST_CMDLINE.split() if w.split("=", 1)[0] not in given]
    model = cpu_model or "host"
    if "cx16" not in model:
        model += "," + EMULATING_HOST_CPU
        added.insert(0, f"--cpu {model}")
    return " ".join([cmdline, *[w for w in added if not w.startswith("--")]]).strip(), \
        model, added


def is_bzimage(head: bytes) -> bool:
    return len(head) >= HDRS_AT + 4 and head[HDRS_AT:HDRS_AT + 4] == HDRS


def setup_header(path: str, raw: bytes) -> dict:
    """The setup header fields kvmguest reads, checked against the file."""
    if len(raw) < PAYLOAD_AT + 8:
        raise BootError(f"{path}: a bzImage shorter than its setup header: truncated")
    boot_flag = struct.unpack_from("<H", raw, BOOT_FLAG_AT)[0]
    if boot_flag != BOOT_FLAG:
        raise BootError(f"{path}: bzImage boot_flag is {boot_flag:#x}, not 0xaa55: damaged?")
    version = struct.unpack_from("<H", raw, VERSION_AT)[0]
    if version < MIN_VERSION:
        raise BootError(f"{path}: Linux boot protocol {version >> 8}.{version & 0xFF:02d}; "
                        "kvmguest needs 2.08 or later (a kernel from 2008 on)")
    setup_sects = raw[SETUP_HEADER] or 4
    start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", raw, PAYLOAD_AT)
    if start > len(raw) or offset == 0 or length == 0 \
            or start + offset + length > len(raw):
        raise BootError(f"{path}: bzImage payload at {start:#x}+{offset:#x} ({length} bytes) "
                        f"does not fit the file ({len(raw)} bytes): truncated or damaged?")
    return {"version": version, "setup_sects": setup_sects, "payload_offset": start + offset,
            "payload_length": length}


def payload_format(data: bytes) -> str | None:
    for magic, name in FORMATS:
        if data.startswith(magic):
            return name
    return None


def vmlinux_from_bzimage(path: str, raw: bytes) -> bytearray:
    """The vmlinux ELF inside a bzImage, decompressed into a buffer of the size its
    trailer gives (at most MAX_KERNEL): memory never exceeds that plus one chunk."""
    h = setup_header(path, raw)
    data = memoryview(raw)[h["payload_offset"]:h["payload_offset"] + h["payload_length"]]
    kind = payload_format(bytes(data[:6]))
    if kind is None:
        raise BootError(f"{path}: bzImage payload starts {bytes(data[:6]).hex()}: not a "
                        "compression format Linux uses")
    size = struct.unpack_from("<I", data, len(data) - 4)[0]   # the build appends it
    if size > MAX_KERNEL:
        raise BootError(f"{path}: the bzImage's payload says it decompresses to "
                        f"{size >> 20} MiB (limit {MAX_KERNEL >> 20} MiB)")
    out = _Output(size)
    try:
        _DECOMPRESS[kind](data, out)
    except BootError as err:
        raise BootError(f"{path}: the bzImage's {kind} payload: {err}") from None
    except Exception as err:   # noqa: BLE001 - each library raises its own error types
        raise BootError(f"{path}: the bzImage's {kind} payload does not decompress: "
                        f"{err}") from None
    if out.pos != size:
        raise BootError(f"{path}: the bzImage's {kind} payload decompresses to {out.pos} "
                        f"bytes where its trailer says {size}: damaged?")
    if not out.buf.startswith(b"\x7fELF"):
        raise BootError(f"{path}: the bzImage's payload is not an ELF vmlinux")
    return out.buf


CHUNK = 1 << 20              # bytes decompressed at a time


class _Output:
    """The decompressed vmlinux: exactly the size the payload's trailer gives."""

    def __init__(self, size: int):
        self.buf, self.pos = bytearray(size), 0

    def add(self, piece: bytes) -> None:
        end = self.pos + len(piece)
        if end > len(self.buf):
            raise BootError(f"it decompresses past {len(self.buf)} bytes, where its trailer "
                            f"says {len(self.buf)}")
        self.buf[self.pos:end] = piece
        self.pos = end


def _zlib(data, out: _Output) -> None:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pending = data
    while True:
        piece = d.decompress(pending, CHUNK)
        out.add(piece)
        pending = d.unconsumed_tail
        if d.eof or not piece and not pending:
            return


def _stream(decompressor, data, out: _Output) -> None:
    """An lzma/bz2-style decompressor, CHUNK bytes at a time."""
    out.add(decompressor.decompress(data, CHUNK))
    while not decompressor.eof and not decompressor.needs_input:
        out.add(decompressor.decompress(b"", CHUNK))


def _xz(data, out: _Output) -> None:
    _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), data, out)


def _lzma(data, out: _Output) -> None:
    _stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), data, out)


def _bzip2(data, out: _Output) -> None:
    _stream(bz2.BZ2Decompressor(), data, out)


def _lz4(data, out: _Output) -> None:
    """LZ4's legacy frame, as the kernel writes it: the magic, then blocks of (u32
    compressed size, block), each at most 8 MiB uncompressed; then the uncompressed size
    (4 bytes), which the kernel's build appends to every payload."""
    block = _library("lz4.block", "lz4", "lz4")
    pos, end = 4, len(data) - 4      # the size trailer is not a block
    while pos < end:
        n = struct.unpack_from("<I", data, pos)[0]
        if n == LZ4_LEGACY_MAGIC:                 # concatenated streams
            pos += 4
            continue
        if pos + 4 + n > end:
            raise BootError(f"an lz4 block at payload offset {pos} runs past the payload")
        out.add(block.decompress(bytes(data[pos + 4:pos + 4 + n]),
                                 uncompressed_size=LZ4_BLOCK))
        pos += 4 + n


def _zstd(data, out: _Output) -> None:
    zstandard = _library("zstandard", "zstd", "zstandard")
    reader = zstandard.ZstdDecompressor().stream_reader(bytes(data))
    while piece := reader.read(CHUNK):
        out.add(piece)


def _lzo(data, out: _Output) -> None:
    raise BootError("an LZO-compressed kernel: kvmguest reads gzip, xz, lzma, bzip2, lz4 "
                    "and zstd payloads (boot its vmlinux instead)")


def _library(module: str, kind: str, package: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BootError(f"this kernel's payload is {kind}-compressed, which needs the Python "
                        f"package {package} (pip install 'kvmguest[linux]')") from None


_DECOMPRESS = {"gzip": _zlib, "xz": _xz, "lzma": _lzma, "bzip2": _bzip2, "lz4": _lz4,
               "zstd": _zstd, "lzo": _lzo}
