"""`kvmguest run|save|restore|inspect|info`: the command line. Only this module prints.

Every error kvmguest means to report is a KvmguestError carrying its exit code; main()
catches that one type, prints one line (terminal controls escaped) and exits with the
code. Options are checked before anything boots or is read. SIGINT, SIGTERM and SIGHUP
cancel what is in progress cleanly (a save removes its temporary file, a control socket
is removed); a second signal during that clean-up is noted, not obeyed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import time

from kvmguest import __version__
from kvmguest.errors import (EXIT_FAILED, EXIT_GUEST_LOST, EXIT_INTERRUPTED, EXIT_PANIC,
                             EXIT_REBOOT, Handover, Interrupted, KvmguestError, UsageError,
                             printable)
from kvmguest.front.progress import Progress

_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
MAX_SECONDS = 10 ** 7          # ~115 days: longer waits are a typo, not a plan


def parse_size(text: str) -> int:
    """'64M', '1G', '512MiB', '1048576B' -> bytes (a bare number means MiB, like QEMU)."""
    m = re.fullmatch(r"\s*(\d{1,20})\s*([kmgtp]?)(i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 64M, 1G)")
    number, unit, suffix = m.groups()
    size = int(number) if suffix == "b" and not unit else int(number) * _UNITS[unit]
    if size >= 1 << 64:
        raise argparse.ArgumentTypeError(f"size {text!r} is larger than any address space")
    return size


def _seconds(allow_zero: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        low_ok = value >= 0 if allow_zero else value > 0
        if not (math.isfinite(value) and low_ok and value <= MAX_SECONDS):
            bound = ">= 0" if allow_zero else "> 0"
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds "
                                             f"{bound} and at most {MAX_SECONDS}")
        return value
    return parse


def _duration(text: str) -> float:
    """'500ms', '2s', '0.5' (seconds) -> seconds, > 0."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 500ms, 2s)")
    value = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and at most "
                                         f"{MAX_SECONDS} s")
    return value


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS * 1000):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of ms > 0")
    return value


def _whole(what: str, high: int | None = None, low: int = 1):
    """An argparse type: a whole number from ``low`` (to ``high``), named ``what`` in
    errors."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"{low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} {what}: use {bound}")
        return value
    return parse


def _threads(text: str) -> int:
    from migrate.pageio import MAX_THREADS
    return _whole("threads", MAX_THREADS)(text)


DISK_FORM = "PATH[,readonly|,overlay]"


def _disk(text: str):
    """``PATH[,readonly|,overlay]``: a virtio-blk disk (checked when the machine is
    made)."""
    from kvmguest.devices import DeviceSpec
    path, _, opts = text.partition(",")
    flags = {"readonly": False, "overlay": False}
    for opt in filter(None, opts.split(",")):
        opt = {"ro": "readonly"}.get(opt, opt)
        if opt not in flags:
            raise argparse.ArgumentTypeError(f"unknown disk option {opt!r} ({DISK_FORM})")
        flags[opt] = True
    if not path:
        raise argparse.ArgumentTypeError(f"a disk needs a path ({DISK_FORM})")
    if flags["readonly"] and flags["overlay"]:
        raise argparse.ArgumentTypeError("a disk is readonly or overlay, not both (an overlay "
                                         "takes the guest's writes)")
    return DeviceSpec("blk", {"path": path, **flags})


def _device(text: str):
    from kvmguest.devices import DeviceSpec
    if text not in ("console", "rng"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (console or rng; disks "
                                         "are --disk)")
    return DeviceSpec(text)


def _net(text: str):
    """``tap=IFNAME[,mac=MAC]``: a virtio-net device on a host tap."""
    from kvmguest.devices import DeviceSpec
    from kvmguest.devices.virtio import NetError, parse_mac
    options = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in ("tap", "mac") or key in options:
            raise argparse.ArgumentTypeError(f"{part!r}: a network is tap=IFNAME[,mac=MAC]")
        options[key] = value
    if "tap" not in options:
        raise argparse.ArgumentTypeError("a network needs tap=IFNAME")
    try:
        mac = parse_mac(options["mac"]) if "mac" in options else None
    except NetError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return DeviceSpec("net", {"ifname": options["tap"], "mac": mac})


def _moved_disk(text: str) -> tuple[str | None, str]:
    """``[NAME=]PATH``: where a restored guest's disk is now (NAME: virtio-blkN; without
    it, the disks in order)."""
    name, sep, path = text.partition("=")
    if sep and name.startswith("virtio-blk"):
        return name, path
    return None, text


def _cmdline(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("the command line is not valid UTF-8") from None
    return text


def _stream_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    if data == b"\n":
        sys.stdout.buffer.flush()


def _err(message: str) -> None:
    print(f"kvmguest: {message}", file=sys.stderr)


def _show(text: str) -> None:
    print(text, file=sys.stderr)


# --- signals ---------------------------------------------------------------------------
class _Signals:
    """SIGINT/SIGTERM/SIGHUP -> Interrupted in the main thread, once. Later signals, which
    arrive while that first one is being cleaned up after, are counted and ignored, so
    that clean-up (removing a temporary file, stopping vCPU threads) always completes."""

    def __init__(self):
        self.first: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.first is not None:
            return
        self.first = signum
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}", signum)


# --- commands --------------------------------------------------------------------------
def _completed(m, args) -> None:
    """With -v: the instructions kvmguest completed for the guest (this host's KVM could
    not emulate them; kvmguest/arch/x86/complete.py)."""
    if args.verbose and m.completer.counts:
        print(f"kvmguest: completed for the guest: {m.completer.summary()}", file=sys.stderr)


def _finish(result, saved, m, args) -> int:
    """The run's exit status, saying how it ended (and, with -v, what was completed)."""
    _completed(m, args)
    if result.exit_code is None:
        if saved is not None and saved.then == "stop":
            return 0
        if result.event == "poweroff":
            _err("the guest powered the machine off")
            return 0
        if result.event == "reset":
            _err("the guest rebooted (reset the machine); kvmguest does not reboot")
            return EXIT_REBOOT
        if result.event == "killed":
            _err("gdb killed the guest")
            return EXIT_FAILED
        if result.event == "lost":
            _err("the guest is lost: its migration's post-copy broke off (see above)")
            return EXIT_GUEST_LOST
        if result.event == "panic":
            _err(f"the guest kernel panicked: {printable(result.panic)}")
            return EXIT_PANIC
        _err("guest stopped without writing a result")
        return EXIT_FAILED
    return result.exit_code & 0xFF


def _max_migrations_arg(parser) -> None:
    parser.add_argument("--max-migrations", type=_whole("migrations", 1_000_000, low=0),
                        default=None, metavar="N",
                        help="with --guest-migrate: carry the guest on at most N times "
                             "(default 16); later requests are refused and it runs on")


def _check_guest_migrate(args) -> None:
    if args.max_migrations is not None and not args.guest_migrate:
        raise UsageError("--max-migrations goes with --guest-migrate")


def _check_checkpoint(args) -> None:
    if args.every is not None and args.checkpoint is None:
        raise UsageError("--every goes with --checkpoint")
    if args.checkpoint is not None:
        from migrate.errors import check_save_target
        check_save_target(args.checkpoint, what="checkpoint")
        for option, path in (("--save", args.save), ("--control", args.control)):
            if path and os.path.abspath(path) == os.path.abspath(args.checkpoint):
                raise UsageError(f"{option} and --checkpoint name the same path")


def cmd_run(args) -> int:
    # migrate.* (and numpy with it) only when the run saves or listens: a plain run of a
    # small guest starts in a fraction of the time.
    from kvmguest.machine import Machine
    from kvmguest.front.session import Session

    _check_guest_migrate(args)
    if (args.save is None) != (args.save_after is None):
        raise UsageError("--save and --save-after go together")
    if args.control:
        from kvmguest.front.control import check_socket_path
        check_socket_path(args.control)
    if args.save is not None:
        from migrate.errors import check_save_target
        target = check_save_target(args.save)
        if args.control and os.path.abspath(args.control) == target:
            raise UsageError("--save and --control name the same path")
    _check_checkpoint(args)
    _check_gdb(args)
    session = Session(args, note=_err, show=_show)
    # The socket exists before the guest boots; it is closed (saves in progress cancelled,
    # our socket removed) before the machine goes away, and also if the boot fails.
    control = session.listen()
    try:
        with Machine.boot(args.kernel, memory=args.memory, cmdline=args.cmdline,
                          vcpus=args.vcpus, irqchip=not args.no_irqchip,
                          modules=args.initrd, cpu_model=args.cpu, pit=not args.no_pit,
                          dirty_log=args.dirty_log, host_workarounds=not args.exact_cmdline,
                          virtio=args.disk + args.net + args.device,
                          shared_memory=args.shared_memory,
                          stream=None if args.quiet else _stream_stdout) as m:
            if m.workarounds:
                names = " ".join(w.split("=", 1)[0] for w in m.workarounds)
                _err(f"this host's KVM emulates kernel code (kvm_pvm); Linux boots here with "
                     f"{names} added (docs/linux.md; --exact-cmdline: without)")
            result = session.run(m, control)
            return _finish(result, session.saved, m, args)
    finally:
        if control:
            control.close()


def cmd_save(args) -> int:
    from kvmguest.front.control import SaveFailed, request_save

    progress = Progress("saving")
    try:
        reply = request_save(args.control, {"path": os.path.abspath(args.path),
                                            "threads": args.threads, "direct": args.direct_io,
                                            "then": args.then, "format": args.format,
                                            "downtime_ms": args.downtime}, progress=progress)
    finally:
        progress.done()
    if reply.get("interrupted"):
        if reply["ok"]:
            print(printable(reply["summary"], keep_newlines=True))
            raise Interrupted("interrupted, but the save had already completed (above)")
        raise Interrupted("interrupted: the save was cancelled; the guest keeps running and "
                          "nothing was written")
    if not reply["ok"]:
        raise SaveFailed(f"the guest could not save: {printable(reply['error'])}")
    print(printable(reply["summary"], keep_newlines=True))
    return 0


def _tls(args):
    """--tls-cert, --tls-key, --tls-ca: all three or none (migrate.live.Tls)."""
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if not any(given):
        return None
    if not all(given):
        raise UsageError("TLS takes --tls-cert, --tls-key and --tls-ca together")
    from migrate.live import Tls
    return Tls(*(os.path.abspath(p) for p in given))


def _tls_args(p) -> None:
    p.add_argument("--tls-cert", metavar="PEM", help="this side's certificate (mutual TLS "
                   "over TCP; required beyond loopback)")
    p.add_argument("--tls-key", metavar="PEM", help="this side's private key")
    p.add_argument("--tls-ca", metavar="PEM", help="the CA the other side's certificate "
                   "must be signed by")


def cmd_migrate(args) -> int:
    from kvmguest.front.control import SaveFailed, request
    progress = Progress("migrating")
    try:
        req = {"op": "migrate", "address": args.address, "downtime_ms": args.downtime,
               "postcopy": "now" if args.postcopy else "off" if args.no_postcopy else "auto",
               "local": args.local, "threads": args.threads}
        tls = _tls(args)
        if tls:
            req["tls"] = [tls.cert, tls.key, tls.ca]
        reply = request(args.control, req, progress=progress)
    finally:
        progress.done()
    if reply.get("interrupted"):
        raise Interrupted("interrupted: the migration was cancelled; the guest runs on here")
    if not reply["ok"]:
        failed = SaveFailed(f"the guest could not migrate: {printable(reply['error'])}")
        if reply.get("exit_code") == EXIT_GUEST_LOST:
            failed.exit_code = EXIT_GUEST_LOST
        raise failed
    print(printable(reply["summary"], keep_newlines=True))
    return 0


def cmd_checkpoint(args) -> int:
    from kvmguest.front.control import SaveFailed, request_checkpoint
    reply = request_checkpoint(args.control)
    if not reply["ok"]:
        raise SaveFailed(f"the guest could not take a checkpoint: {printable(reply['error'])}")
    print(printable(reply["summary"]))
    return 0


def cmd_restore(args) -> int:
    from migrate.reader import restore


    _check_guest_migrate(args)
    if args.control:
        from kvmguest.front.control import check_socket_path
        check_socket_path(args.control)
    _check_checkpoint(args)
    _check_gdb(args)
    if (args.path is None) == (args.incoming is None):
        raise UsageError("restore takes a snapshot file or --incoming ADDRESS (one of them)")
    disks = {name or f"virtio-blk{i}": path for i, (name, path) in enumerate(args.disk)}
    if args.incoming:
        from kvmguest.front.control import listen_for_migration
        from migrate.live import restore_incoming
        tls = _tls(args)
        server = listen_for_migration(args.incoming, tls is not None)
        try:
            if not args.quiet:
                _err(f"waiting for a guest on {args.incoming}")
            m, report = restore_incoming(server, stream=None if args.quiet
                                         else _stream_stdout, disks=disks or None, tls=tls,
                                         on_lost=_guest_lost)
        finally:
            server.close()
            if args.incoming.startswith("unix:"):
                try:
                    os.unlink(args.incoming[5:])
                except OSError:
                    pass
        return _run_restored(args, m, report)
    progress = Progress("restoring")
    progress("reading", 0.0)
    try:
        m, report = restore(args.path, lazy=args.lazy, threads=args.threads,
                            stream=None if args.quiet else _stream_stdout, progress=progress,
                            disks=disks or None)
    finally:
        progress.done()
        from kvmguest.front.guest_migrate import DIR_ENV, remove_inherited_snapshot
        if DIR_ENV in os.environ:        # the file of a guest-requested migration
            remove_inherited_snapshot(args.path)
    return _run_restored(args, m, report)


def _guest_lost(why: str) -> None:
    """A migration's source went away during post-copy: the pages the guest had not yet
    got are nowhere now. Its vCPUs wait on them; the process ends at once."""
    _err(f"the guest is lost: post-copy broke off ({why}); some of its memory never "
         "arrived")
    sys.stderr.flush()
    os._exit(EXIT_GUEST_LOST)


def _run_restored(args, m, report) -> int:
    from kvmguest.front.session import Session
    session = Session(args, note=_err, show=_show)
    with m:
        if args.verbose:
            print(report.summary(), file=sys.stderr)
        result = session.run(m, session.listen())     # the restored guest can be saved
        if m.postcopy is not None:      # the source exits once it has sent every page
            m.postcopy.done.wait(600)
        return _finish(result, session.saved, m, args)


def cmd_inspect(args) -> int:
    from migrate.inspect import describe
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(_inspect_text(info))
    return 0 if info["valid"] else info.get("exit_code", 1)


def cmd_export_ram(args) -> int:
    from migrate.export import export_ram
    for src, target, pages in export_ram(args.path, args.output, args.block):
        print(printable(f"{src.name}: {src.size} bytes, {pages} pages of data -> {target}"))
    return 0


def _inspect_text(info: dict) -> str:
    p = printable
    if not info["valid"]:
        return f"{p(info['path'])}: {info['verdict']}: {p(info['error'])}"
    if info["format"].startswith("qemu"):
        lines = [f"{p(info['path'])}: valid, complete QEMU migration file ({info['format']}, "
                 f"machine {p(info['machine'])}, capabilities "
                 f"{p(', '.join(info['capabilities']) or 'none')})",
                 f"  file size {info['file_size']} bytes ({info['allocated']} allocated); "
                 f"RAM {info['ram_size'] >> 20} MiB in {len(info['blocks'])} blocks; "
                 f"{info['pages_present']} pages of data; device state not read"]
        for b in info["blocks"]:
            where = (f"page area at {b['pages_offset']:#x}, bitmap at {b['bitmap_offset']:#x}"
                     if "pages_offset" in b else
                     f"{b['records']} page records, {b['zero_records']} zero-page records")
            lines.append(f"  block {p(b['name']):<22} size {b['size']:#x}: "
                         f"{b['pages_present']}/{b['pages']} pages present, {where}")
        return "\n".join(lines)
    lines = [f"{p(info['path'])}: valid, complete kvmguest snapshot ({info['format']}, "
             f"version {info['version']})",
             f"  file size {info['file_size']} bytes ({info['allocated']} allocated); "
             f"RAM {info['ram_size'] >> 20} MiB; {info['vcpus']} vCPU(s), "
             f"{'in-kernel irqchip' if info['irqchip'] else 'no irqchip'}"]
    if info["format"] == "checkpoint":
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(
            info["checkpoint_time_ns"] / 1e9))
        lines.append(f"  {info['checkpoints']} checkpoints, the latest at {when}"
                     + (" (its journal is replayed on restore)" if info["journal_pending"]
                        else ""))
        for h in info["history"][-5:]:
            lines.append(f"    checkpoint {h['generation']}: {h['pages']} pages")
    for b in info.get("blocks", []):
        if "pages_present" not in b:
            lines.append(f"  block {p(b['name']):<10} slot {b['slot']} gpa {b['gpa']:#x} size "
                         f"{b['size'] >> 20} MiB, page area at {b['pages_offset']:#x}")
            continue
        where = (f"page area at {b['pages_offset']:#x}" if "pages_offset" in b
                 else f"{b['records']} page records")
        lines.append(f"  block {p(b['name']):<10} slot {b['slot']} gpa {b['gpa']:#x} size "
                     f"{b['size'] >> 20} MiB: {b['pages_present']}/{b['pages']} pages present, "
                     f"{where}")
    st = info.get("state", {})
    if st:
        lines.append(f"  vCPU 0: rip {st['rip']:#x} rsp {st['rsp']:#x} cr3 {st['cr3']:#x} "
                     f"mode {st['mode']}; {st['msrs']} MSRs")
        if st.get("pv_msrs"):
            lines.append("  paravirtual MSRs the guest set: " + ", ".join(
                f"{name} {value:#x}" for name, value in st["pv_msrs"].items()))
        lines.append(f"  guest: {p(st.get('kernel'))} cmdline {p(repr(st.get('cmdline')))}")
    return "\n".join(lines)


def _kut_cell(o) -> str:
    return f"{o.status} ({o.summary})" if o.summary else o.status


def cmd_kut(args) -> int:
    from kvmguest.front import kut

    def show(r):
        if args.json:
            return
        if r.qemu is None:
            line = f"{r.kvmguest.status} {r.name}" + (f" ({r.kvmguest.summary})"
                                                      if r.kvmguest.summary else "")
        else:
            line = f"{r.name:<28} kvmguest {_kut_cell(r.kvmguest):<48} qemu {_kut_cell(r.qemu)}"
        if r.kvmguest.status == kut.FAIL and r.kvmguest.log:
            line += f"  [log: {r.kvmguest.log}]"
        print(printable(line), flush=True)

    results = kut.run_suite(args.dir, args.tests, args.group, args.jobs, args.compare_qemu,
                            run_all=args.all, on_result=show, cfg=args.cfg)
    counts = {s: sum(r.kvmguest.status == s for r in results) for s in (kut.PASS, kut.FAIL,
                                                                        kut.SKIP)}
    if args.json:
        print(json.dumps({"results": [r.to_json() for r in results], "totals": counts},
                         indent=2))
    else:
        total = (f"kvmguest: {counts[kut.PASS]} passed, {counts[kut.FAIL]} failed, "
                 f"{counts[kut.SKIP]} skipped of {len(results)}")
        if args.compare_qemu:
            q = {s: sum(r.qemu.status == s for r in results) for s in (kut.PASS, kut.FAIL,
                                                                       kut.SKIP)}
            total += f"; qemu: {q[kut.PASS]} passed, {q[kut.FAIL]} failed, {q[kut.SKIP]} skipped"
        print(total)
    return EXIT_FAILED if counts[kut.FAIL] else 0


def cmd_info(args) -> int:
    from kvmguest.abi import Cap
    from kvmguest.kvm import Kvm, backend_module
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


# --- parser ----------------------------------------------------------------------------
def _save_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--then", choices=("stop", "continue"), default="stop",
                   help="after the save: stop the guest (default) or let it run on")
    p.add_argument("--threads", type=_threads, default=1, help="writer threads (default 1)")
    p.add_argument("--direct-io", action="store_true", help="write pages with O_DIRECT")
    p.add_argument("--format", choices=("mapped", "stream"), default="mapped",
                   help="mapped-ram (default) or the append-only streaming baseline")
    p.add_argument("--downtime", type=_positive_ms, default=50.0, metavar="MS",
                   help="downtime target in ms (default 50)")


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="PATH",
                   help="keep PATH a crash-consistent checkpoint of the running guest")
    p.add_argument("--every", type=_duration, default=None, metavar="DURATION",
                   help="with --checkpoint: how often (e.g. 500ms, 2s; default 1s)")


def _gdb_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gdb", metavar="[HOST:]PORT|SOCK",
                   help="serve gdb (`target remote`) on a localhost port or a private Unix "
                        "socket; the guest waits for it, stopped at its first instruction")
    p.add_argument("--gdb-wait", choices=("yes", "no"), default="yes",
                   help="with --gdb: wait for gdb before running (default yes), or run and "
                        "let gdb attach later")


def _check_gdb(args) -> None:
    if args.gdb is None:
        if args.gdb_wait != "yes":
            raise UsageError("--gdb-wait goes with --gdb")
        return
    from kvmguest.front.gdb.connection import parse_address
    parse_address(args.gdb)
    if args.guest_migrate:
        raise UsageError("--gdb and --guest-migrate do not go together (gdb would lose the "
                         "guest when it moves to a new process)")
    if args.control and os.path.abspath(args.control) == os.path.abspath(args.gdb):
        raise UsageError("--gdb and --control name the same path")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log debug information; show the traceback of unexpected errors")
    p = argparse.ArgumentParser(prog="kvmguest", parents=[common],
                                description="Run tiny guest kernels on /dev/kvm; save and "
                                            "restore them live.")
    p.add_argument("--version", action="version", version=f"kvmguest {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common],
                         help="boot a PVH or multiboot kernel, stream its console, exit with "
                              "its result")
    run.add_argument("kernel", help="PVH ELF or multiboot kernel (e.g. guests/build/hello.elf)")
    run.add_argument("--memory", "-m", type=parse_size, default=64 << 20,
                     help="guest RAM (default 64M; bare numbers are MiB)")
    run.add_argument("--shared-memory", action="store_true",
                     help="guest RAM in memfds, which `migrate --local` hands to another "
                          "process on this host instead of copying")
    run.add_argument("--cmdline", type=_cmdline, default="", help="kernel command line")
    run.add_argument("--vcpus", type=_whole("vCPUs"), default=1,
                     help="vCPUs (default 1); the others start on INIT/SIPI from the first")
    run.add_argument("--no-irqchip", action="store_true",
                     help="no in-kernel irqchip and PIT: a polling-only machine, one vCPU")
    run.add_argument("--no-pit", action="store_true",
                     help="no PIT (QEMU's -machine pit=off); the irqchip stays")
    run.add_argument("--dirty-log", choices=("auto", "bitmap", "ring"), default="auto",
                     help="dirty tracking: KVM's bitmap log, its dirty ring, or auto "
                          "(the ring from 32 GiB of RAM, where the host has it)")
    run.add_argument("--initrd", action="append", default=[], metavar="FILE",
                     help="a module, as QEMU's -initrd: Linux's initrd (PVH module 0), or "
                          "a multiboot kernel's module (repeatable)")
    run.add_argument("--disk", action="append", default=[], type=_disk,
                     metavar=DISK_FORM,
                     help="a virtio-blk disk backed by the image PATH (/dev/vda, /dev/vdb, "
                          "...; repeatable); readonly: the device refuses writes; overlay: "
                          "the guest's writes go to a copy-on-write overlay saved with RAM "
                          "in snapshots and checkpoints, the image is never written")
    run.add_argument("--net", action="append", default=[], type=_net,
                     metavar="tap=IFNAME[,mac=MAC]",
                     help="a virtio-net device on the host's tap IFNAME (repeatable)")
    run.add_argument("--device", action="append", default=[], type=_device,
                     metavar="KIND", help="a virtio device: console (hvc0, its output on "
                                          "the console) or rng (the host's getrandom)")
    run.add_argument("--exact-cmdline", action="store_true",
                     help="boot a Linux kernel with --cmdline and --cpu exactly as given, "
                          "even where the host needs more (kvm_pvm)")
    run.add_argument("--cpu", metavar="MODEL",
                     help="QEMU-style CPU model: host (default), max, qemu64, with "
                          "+feature/-feature and vendor=")
    run.add_argument("--timeout", type=_seconds(False), default=None,
                     help="seconds before giving up")
    run.add_argument("--quiet", "-q", action="store_true", help="do not stream the console")
    run.add_argument("--console-input", action="store_true",
                     help="send standard input to COM1 even when it is not a terminal")
    run.add_argument("--guest-migrate", action="store_true",
                     help="when the guest asks (MIGRATE on the kvmguest port), live-save it "
                          "and carry it on in a new `kvmguest restore` process")
    _max_migrations_arg(run)
    run.add_argument("--save", metavar="PATH", help="live-save the guest to PATH")
    run.add_argument("--save-after", type=_seconds(True), metavar="SECONDS",
                     help="start the live save this many seconds after boot")
    _checkpoint_args(run)
    run.add_argument("--control", metavar="SOCK",
                     help="listen on a Unix socket for `kvmguest save --control SOCK PATH`")
    _save_args(run)
    _gdb_args(run)
    run.set_defaults(func=cmd_run)

    save = sub.add_parser("save", parents=[common],
                          help="live-save a guest started with --control")
    save.add_argument("--control", metavar="SOCK", required=True, help="the guest's socket")
    save.add_argument("path", help="snapshot file to write")
    _save_args(save)
    save.set_defaults(func=cmd_save)

    migrate = sub.add_parser("migrate", parents=[common],
                             help="move a guest started with --control to a `restore "
                                  "--incoming` (live: pre-copy, post-copy, or local)")
    migrate.add_argument("--control", metavar="SOCK", required=True, help="the guest's socket")
    migrate.add_argument("address", help="the destination: unix:PATH or tcp:HOST:PORT")
    migrate.add_argument("--downtime", type=float, default=50.0, metavar="MS",
                         help="the downtime to aim for (default 50 ms)")
    migrate.add_argument("--threads", type=_whole("threads", 16), default=1, metavar="N",
                         help="send pre-copy's pages over N connections (default 1)")
    when = migrate.add_mutually_exclusive_group()
    when.add_argument("--postcopy", action="store_true",
                      help="switch to post-copy after the first pass: the guest runs on the "
                           "destination at once, its last pages fetched as it touches them")
    when.add_argument("--no-postcopy", action="store_true",
                      help="never switch to post-copy (by default it does when pre-copy "
                           "stops converging)")
    when.add_argument("--local", action="store_true",
                      help="to a process on this host (unix:PATH) of a guest run with "
                           "--shared-memory: its RAM is handed over, not copied")
    _tls_args(migrate)
    migrate.set_defaults(func=cmd_migrate)

    checkpoint = sub.add_parser("checkpoint", parents=[common],
                                help="take a checkpoint now, of a guest run with --checkpoint "
                                     "and --control")
    checkpoint.add_argument("--control", metavar="SOCK", required=True,
                            help="the guest's socket")
    checkpoint.set_defaults(func=cmd_checkpoint)

    restore = sub.add_parser("restore", parents=[common],
                             help="resume a saved guest and stream its console")
    restore.add_argument("path", nargs="?", help="snapshot file")
    restore.add_argument("--incoming", metavar="ADDRESS",
                         help="wait for one guest migrated to ADDRESS (unix:PATH or "
                              "tcp:HOST:PORT) instead of reading a file, and run it")
    _tls_args(restore)
    restore.add_argument("--disk", action="append", default=[], type=_moved_disk,
                         metavar="[NAME=]PATH",
                         help="where a disk of the snapshot is now (NAME virtio-blkN; "
                              "without it, the disks in order); it must be the same image")
    restore.add_argument("--lazy", action="store_true",
                         help="map the page areas (MAP_PRIVATE) instead of reading them")
    restore.add_argument("--timeout", type=_seconds(False), default=None,
                         help="seconds before giving up")
    restore.add_argument("--threads", type=_threads, default=2,
                         help="reader threads (default 2)")
    restore.add_argument("--quiet", "-q", action="store_true", help="do not stream the console")
    restore.add_argument("--console-input", action="store_true",
                         help="send standard input to COM1 even when it is not a terminal")
    restore.add_argument("--guest-migrate", action="store_true",
                         help="when the guest asks (MIGRATE on the kvmguest port), migrate "
                              "it on to a new process again")
    _max_migrations_arg(restore)
    restore.add_argument("--control", metavar="SOCK",
                         help="listen on a Unix socket for `kvmguest save` of the restored guest")
    _checkpoint_args(restore)
    _gdb_args(restore)
    restore.set_defaults(func=cmd_restore, save=None)

    inspect = sub.add_parser("inspect", parents=[common],
                             help="show a snapshot's layout and check it")
    inspect.add_argument("path", help="snapshot file")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=cmd_inspect)

    export = sub.add_parser("export-ram", parents=[common],
                            help="write a RAM block of a snapshot (ours or QEMU's mapped-ram "
                                 "file) as a plain, sparse file")
    export.add_argument("path", help="snapshot file (kvmguest's, or QEMU's `migrate file:`)")
    export.add_argument("--block", metavar="NAME",
                        help="the block to write to OUT (a file); without it every block is "
                             "written into the directory OUT, named as QEMU's "
                             "analyze-migration.py -x names them")
    export.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output file (with --block) or directory")
    export.set_defaults(func=cmd_export_ram)

    kut_p = sub.add_parser("kut", parents=[common],
                           help="run kvm-unit-tests' x86 suite (a built tree) on kvmguest")
    kut_p.add_argument("dir", help="a built kvm-unit-tests tree (./configure && make)")
    kut_p.add_argument("tests", nargs="*", metavar="TEST", help="tests to run (default: all)")
    kut_p.add_argument("--group", "-g", help="only the tests of this group")
    kut_p.add_argument("--jobs", "-j", type=_whole("jobs", 64), default=1,
                       help="tests run at once (default 1)")
    kut_p.add_argument("--json", action="store_true", help="machine-readable results")
    kut_p.add_argument("--compare-qemu", action="store_true",
                       help="also run each test under qemu-system-x86_64 -accel kvm")
    kut_p.add_argument("--cfg", metavar="FILE",
                       help="tests from FILE instead of DIR/x86/unittests.cfg")
    kut_p.add_argument("--all", "-a", action="store_true",
                       help="include tests marked nodefault, as run_tests.sh -a")
    kut_p.set_defaults(func=cmd_kut)

    info = sub.add_parser("info", parents=[common],
                          help="show KVM's version, backend and capabilities")
    info.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:      # `kut DIR --jobs 2 TEST...`: test names may follow the options too
        if getattr(args, "command", None) == "kut" and not any(e.startswith("-") for e in extra):
            args.tests += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.verbose = getattr(args, "verbose", False)
    if args.verbose:
        import logging
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    signals = _Signals()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM,
                                                       signal.SIGHUP)}
    signals.install()
    try:
        return _run(args)
    finally:
        for sig, handler in previous.items():      # main() may be called in-process
            signal.signal(sig, handler)


def _run(args) -> int:
    try:
        return args.func(args)
    except Handover as handover:       # everything is closed: the new image takes over
        try:
            handover.exec()
        except OSError as err:
            _err(f"error: cannot carry the guest on in a new process ({err.strerror}); its "
                 f"snapshot is {printable(handover.snapshot)}")
            return EXIT_FAILED
    except Interrupted as err:
        _err(f"{err}" if str(err) != "interrupted" else "interrupted")
        return err.exit_code
    except KvmguestError as err:
        from kvmguest.machine import GuestError
        if isinstance(err, GuestError):   # registers and code bytes: our own multi-line text
            print(f"\nkvmguest: {printable(err, keep_newlines=True)}", file=sys.stderr)
        else:
            _err(f"error: {printable(err)}")
        return err.exit_code
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as err:  # noqa: BLE001 - a bug: one line, the traceback with -v
        if args.verbose:
            import traceback
            traceback.print_exc()
        _err(f"internal error: {type(err).__name__}: {printable(err)} "
             "(run with -v for the traceback, and please report it)")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
