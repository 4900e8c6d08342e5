"""`kvmguest run|info`: the command line. Only this module prints."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .abi import Cap
from .boot.pvh import BootError
from .kvm import Kvm, KvmError, KvmUnavailable, backend_module
from .machine import GuestError, GuestTimeout, Machine
from .memory import GuestMemoryError
from .progress import Progress
from migrate.control import ControlError
from migrate.format import SnapshotError
from migrate.writer import SaveError

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


def _save_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--then", choices=("stop", "continue"), default="stop",
                   help="after the save: stop the guest (default) or let it run on")
    p.add_argument("--threads", type=int, default=1, help="writer threads (default 1)")
    p.add_argument("--direct-io", action="store_true", help="write pages with O_DIRECT")
    p.add_argument("--format", choices=("mapped", "stream"), default="mapped",
                   help="mapped-ram (default) or the append-only streaming baseline")
    p.add_argument("--downtime", type=float, default=50.0, metavar="MS",
                   help="downtime target in ms (default 50)")


def _finish(m: Machine, result, saved) -> int:
    if result.exit_code is None:
        if saved is not None and saved.then == "stop":
            return 0
        print("kvmguest: guest stopped without writing a result", file=sys.stderr)
        return 1
    return result.exit_code & 0xFF


def cmd_run(args) -> int:
    from migrate.control import ControlServer
    from migrate.precopy import live_save

    if (args.save is None) != (args.save_after is None):
        raise UsageError("--save and --save-after go together")
    saved = None

    def on_saved(report):
        nonlocal saved
        saved = report
        print(report.summary(), file=sys.stderr)

    with Machine(args.kernel, memory=args.memory, cmdline=args.cmdline,
                 stream=None if args.quiet else _stream_stdout) as m:
        control = ControlServer(args.control, m, on_saved) if args.control else None
        try:
            m.start()
            if args.save:
                if m._done.wait(args.save_after):
                    result = m.wait()
                    print(f"kvmguest: the guest finished before --save-after "
                          f"{args.save_after:g} s; nothing saved", file=sys.stderr)
                    return _finish(m, result, None)
                progress = Progress("saving")
                try:
                    on_saved(live_save(m, args.save, threads=args.threads,
                                       direct=args.direct_io, then=args.then,
                                       format=args.format, downtime_ms=args.downtime,
                                       progress=progress))
                finally:
                    progress.done()
            result = m.wait(args.timeout)
            if control:
                control.drain()       # a save over the socket may have stopped the guest
        finally:
            sys.stdout.flush()
            if control:
                control.close()
        return _finish(m, result, saved)


def cmd_save(args) -> int:
    from migrate.control import request
    reply = request(args.control, {"op": "save", "path": os.path.abspath(args.path),
                                   "threads": args.threads, "direct": args.direct_io,
                                   "then": args.then, "format": args.format,
                                   "downtime_ms": args.downtime})
    if not reply.get("ok"):
        raise SaveFailed(reply.get("error", "save failed"))
    print(reply["summary"])
    return 0


def cmd_restore(args) -> int:
    from migrate.reader import restore
    progress = Progress("restoring")
    m, report = restore(args.path, lazy=args.lazy, threads=args.threads,
                        stream=None if args.quiet else _stream_stdout)
    progress.done()
    with m:
        if args.verbose:
            print(report.summary(), file=sys.stderr)
        try:
            result = m.run(timeout=args.timeout)
        finally:
            sys.stdout.flush()
        return _finish(m, result, None)


def cmd_inspect(args) -> int:
    from migrate.inspect import describe
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(_inspect_text(info))
    return 0 if info["valid"] else 1


def _inspect_text(info: dict) -> str:
    if not info["valid"]:
        return f"{info['path']}: INVALID: {info['error']}"
    lines = [f"{info['path']}: valid, complete kvmguest snapshot ({info['format']}, "
             f"version {info['version']})",
             f"  file size {info['file_size']} bytes ({info['allocated']} allocated); "
             f"RAM {info['ram_size'] >> 20} MiB"]
    for b in info.get("blocks", []):
        lines.append(f"  block {b['name']:<10} slot {b['slot']} gpa {b['gpa']:#x} size "
                     f"{b['size'] >> 20} MiB: {b['pages_present']}/{b['pages']} pages present, "
                     f"page area at {b['pages_offset']:#x}")
    st = info.get("state", {})
    if st:
        lines.append(f"  vCPU: rip {st['rip']:#x} rsp {st['rsp']:#x} cr3 {st['cr3']:#x} "
                     f"mode {st['mode']}; {st['msrs']} MSRs")
        lines.append(f"  guest: {st.get('kernel')} cmdline {st.get('cmdline')!r}")
    return "\n".join(lines)


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


class UsageError(ValueError):
    """Options that do not fit together."""


class SaveFailed(RuntimeError):
    """A save asked for over the control socket failed."""


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
    run.add_argument("--save", metavar="PATH", help="live-save the guest to PATH")
    run.add_argument("--save-after", type=float, metavar="SECONDS",
                     help="start the live save this many seconds after boot")
    run.add_argument("--control", metavar="SOCK",
                     help="listen on a Unix socket for `kvmguest save --control SOCK PATH`")
    _save_args(run)
    run.set_defaults(func=cmd_run)

    save = sub.add_parser("save", help="live-save a guest started with --control")
    save.add_argument("--control", metavar="SOCK", required=True, help="the guest's socket")
    save.add_argument("path", help="snapshot file to write")
    _save_args(save)
    save.set_defaults(func=cmd_save)

    restore = sub.add_parser("restore", help="resume a saved guest and stream its console")
    restore.add_argument("path", help="snapshot file")
    restore.add_argument("--lazy", action="store_true",
                         help="map the page areas (MAP_PRIVATE) instead of reading them")
    restore.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
    restore.add_argument("--threads", type=int, default=2, help="reader threads (default 2)")
    restore.add_argument("--quiet", "-q", action="store_true", help="do not stream the console")
    restore.set_defaults(func=cmd_restore)

    inspect = sub.add_parser("inspect", help="show a snapshot's layout and check it")
    inspect.add_argument("path", help="snapshot file")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=cmd_inspect)

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
    except (SnapshotError, SaveError, SaveFailed, ControlError) as err:
        print(f"kvmguest: error: {err}", file=sys.stderr)
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
