"""`kvmguest run|info`: the command line. Only this module prints."""

from __future__ import annotations

import argparse
import os
import re
import sys

from .abi import Cap
from .boot.pvh import BootError
from .kvm import Kvm, KvmError, KvmUnavailable, backend_module
from .machine import GuestError, GuestTimeout, Machine
from .memory import GuestMemoryError

_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'64M', '1G', '512MiB', '1048576B' -> bytes (a bare number means MiB, like QEMU)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 64M, 1G)")
    number, unit, suffix = m.groups()
    if suffix == "b" and not unit:
        return int(number)
    return int(number) * _UNITS[unit]


def _stream_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    if data == b"\n":
        sys.stdout.buffer.flush()


def cmd_run(args) -> int:
    with Machine(args.kernel, memory=args.memory, cmdline=args.cmdline,
                 stream=None if args.quiet else _stream_stdout) as m:
        try:
            result = m.run(timeout=args.timeout)
        finally:
            sys.stdout.flush()
        if result.exit_code is None:
            print("kvmguest: guest stopped without writing a result", file=sys.stderr)
            return 1
        return result.exit_code & 0xFF


def cmd_info(args) -> int:
    with Kvm() as kvm:
        print(f"KVM API version: {kvm.get_api_version()}")
        print(f"backend module:  {backend_module()}")
        print(f"vCPU mmap size:  {kvm.get_vcpu_mmap_size()} bytes")
        print("capabilities:")
        for cap in Cap:
            value = kvm.check_extension(cap)
            print(f"  {cap.name:<38} {value if value else 'no'}")
        print(f"MSRs to save:    {len(kvm.get_msr_index_list())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmguest", description="Run tiny PVH guests on /dev/kvm.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug information")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a PVH ELF kernel, stream its console, exit with "
                                     "its result")
    run.add_argument("kernel", help="PVH ELF kernel (e.g. guests/build/hello.elf)")
    run.add_argument("--memory", "-m", type=parse_size, default=64 << 20,
                     help="guest RAM (default 64M; bare numbers are MiB)")
    run.add_argument("--cmdline", default="", help="kernel command line")
    run.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
    run.add_argument("--quiet", "-q", action="store_true", help="do not stream the console")
    run.set_defaults(func=cmd_run)

    info = sub.add_parser("info", help="show KVM's version, backend and capabilities")
    info.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        import logging
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except GuestTimeout as err:
        print(f"\nkvmguest: {err}", file=sys.stderr)
        return 124
    except GuestError as err:
        print(f"\nkvmguest: {err}", file=sys.stderr)
        return 1
    except (KvmUnavailable, BootError, GuestMemoryError, KvmError, ValueError) as err:
        print(f"kvmguest: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nkvmguest: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
