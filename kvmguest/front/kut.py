"""Run kvm-unit-tests' x86 suite on kvmguest (and, to compare, on QEMU as its own
``x86/run`` does). The front-end is ``kvmguest kut`` (kvmguest.front.cli prints).

A test is a section of ``x86/unittests.cfg``: file, smp, test_args, qemu_params (or
extra_params: ``-cpu``, ``-m``, ``-machine``, ...), groups, arch, accel, check, timeout.
Each runs as a ``kvmguest run`` process with kvm-unit-tests' environment as the initrd;
the guest's debug-exit status gives the verdict as kvm-unit-tests reads it (0 pass, 38
= 77 >> 1 skip, anything else fail). What kvmguest cannot honour (a named CPU model, an
IOMMU, Hyper-V) is a SKIP with the reason.

Its migration protocol (lib/migrate.c): when the guest prints "Now migrate the VM" (or
another migration request) and waits for a key, the runner live-saves it through the
control socket into a snapshot, restores it in a new process and sends the key there.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmguest.arch.x86 import cpumodel
from kvmguest.errors import UsageError

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
DEFAULT_TIMEOUT = 90.0           # seconds, as kvm-unit-tests' runtime.bash
DEFAULT_MEMORY_MB = 128          # QEMU's default -m
GUEST_SKIP = 77 >> 1             # report_summary() when every test was skipped
MIGRATION_REQUESTS = ("Now migrate the VM", "Begin continuous migration",
                      "Skipped VM migration")
MIGRATION_KEY = b"\n"
ARCH = "x86_64"
NO_VALUE = {"-enable-kvm"}        # QEMU options without a value (the others take one)
QEMU = "qemu-system-x86_64"
# QEMU's own command line for a test, from kvm-unit-tests' x86/run.
QEMU_BASE = ["--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard",
             "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
             "-display", "none", "-serial", "stdio", "-device", "pci-testdev",
             "-machine", "accel=kvm"]
# -device / -machine values outside kvmguest's scope, with why.
OUT_OF_SCOPE = {"intel-iommu": "an IOMMU (intel-iommu) is outside kvmguest's scope",
                "edu": "the edu PCI device is outside kvmguest's scope (no PCI)",
                "hyperv-testdev": "Hyper-V devices are outside kvmguest's scope",
                "q35": "the q35 chipset (PCIe, split irqchip) is not modelled",
                "vmport": "the VMware backdoor port is not modelled"}


@dataclass
class KutTest:
    name: str
    file: str = ""
    smp: int = 1
    test_args: str = ""
    params: str = ""
    groups: list = field(default_factory=list)
    arch: str = ""
    accel: str = ""
    check: str = ""
    timeout: float = DEFAULT_TIMEOUT


@dataclass
class Outcome:
    status: str                   # PASS / FAIL / SKIP
    summary: str = ""             # the test's SUMMARY line, or why it failed/skipped
    seconds: float = 0.0
    log: str = ""
    migrations: int = 0


@dataclass
class Plan:
    """How one test runs on kvmguest: the `kvmguest run` options, or why it cannot."""
    vcpus: int = 1
    memory_mb: int = DEFAULT_MEMORY_MB
    cpu: str | None = None
    pit: bool = True
    args: list = field(default_factory=list)
    skip: str | None = None


# --- unittests.cfg ---------------------------------------------------------------------
def _timeout(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise UsageError(f"unittests.cfg: bad timeout {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_cfg(path: str) -> list[KutTest]:
    """The tests of a unittests.cfg, in order (the format of kvm-unit-tests'
    scripts/common.bash, with triple-quoted multi-line params)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from None
    tests: list[KutTest] = []
    it = iter(lines)
    for line in it:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"\[(.*)\]", line)
        if m:
            tests.append(KutTest(m.group(1)))
            continue
        m = re.fullmatch(r"([a-z_]+)\s*=\s*(.*)", line)
        if not m or not tests:
            continue
        key, value, t = m.group(1), m.group(2), tests[-1]
        if key in ("qemu_params", "extra_params") and value.startswith('"""'):
            value = value[3:]
            while '"""' not in value:
                value += " " + next(it, '"""').strip().rstrip("\\")
            value = value[:value.index('"""')]
        if key == "file":
            t.file = value
        elif key == "smp":
            t.smp = int(value) if value.isdigit() else 1
        elif key == "test_args":
            t.test_args = value
        elif key in ("qemu_params", "extra_params"):
            t.params = value
        elif key == "groups":
            t.groups = value.split()
        elif key in ("arch", "accel", "check"):
            setattr(t, key, value)
        elif key == "timeout":
            t.timeout = _timeout(value)
    return tests


def select(tests: list[KutTest], names=(), group: str | None = None) -> list[KutTest]:
    known = {t.name for t in tests}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"no test named {', '.join(unknown)} in unittests.cfg")
    if names:
        tests = [t for t in tests if t.name in names]
    if group:
        tests = [t for t in tests if group in t.groups]
    return tests


def expand_args(text: str) -> list[str]:
    """test_args as the shell would split them (runtime.bash evals the command line:
    quotes and backticks such as `date +%s`)."""
    if not text:
        return []
    if "`" in text or "$" in text:
        out = subprocess.run(["bash", "-c", f"printf '%s\\n' {text}"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.splitlines()
    return shlex.split(text)


def _memory_mb(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgGtT]?)[bB]?", text)
    if not m:
        raise ValueError(text)
    n, unit = int(m.group(1)), m.group(2).lower()
    return {"": n, "m": n, "k": n // 1024, "g": n * 1024, "t": n * 1024 * 1024}[unit]


def suite_skip(test: KutTest, run_all: bool = False, selected: bool = False) -> str | None:
    """Why kvm-unit-tests' own runtime.bash would skip ``test`` on this host (for either
    runner), or None."""
    if "nodefault" in test.groups and not (run_all or selected):
        return "test marked as manual run only"
    if test.arch and test.arch != ARCH:
        return f"{test.arch} only"
    if test.accel and test.accel != "kvm":
        return f"{test.accel} only"
    for check in test.check.split():
        path, _, value = check.partition("=")
        try:
            ok = Path(path).read_text().strip() == value
        except OSError:
            ok = False
        if not ok:
            return f"{path} not equal to {value}"
    return None


def plan(test: KutTest, run_all: bool = False, selected: bool = False) -> Plan:
    """The kvmguest run for ``test``, or its SKIP reason (as runtime.bash decides, plus
    what kvmguest cannot honour)."""
    p = Plan(vcpus=test.smp)
    p.skip = suite_skip(test, run_all, selected)
    try:
        words = shlex.split(test.params)
    except ValueError as err:
        words, p.skip = [], p.skip or f"cannot parse its QEMU parameters: {err}"
    options, i = [], 0
    while i < len(words):
        if words[i] in NO_VALUE:
            options.append((words[i], ""))
            i += 1
        else:
            options.append((words[i], words[i + 1] if i + 1 < len(words) else ""))
            i += 2
    # A device is the most telling reason (an IOMMU on a q35 machine): look at those first.
    options.sort(key=lambda o: o[0] != "-device")
    for opt, val in options:
        if p.skip is not None:
            break
        if opt == "-cpu":
            p.cpu = val
            try:
                cpumodel.parse(val).check_host(host_cpuid())
            except cpumodel.CpuModelError as err:
                p.skip = str(err)
        elif opt == "-m":
            try:
                p.memory_mb = _memory_mb(val)
            except ValueError:
                p.skip = f"cannot read -m {val}"
        elif opt in ("-machine", "-M"):
            for part in val.split(","):
                key, _, v = part.partition("=")
                if key == "pit" and v == "off":
                    p.pit = False
                elif key in OUT_OF_SCOPE or (key == "vmport" and v == "on"):
                    p.skip = OUT_OF_SCOPE[key]
                elif key == "kernel-irqchip" and v == "split":
                    p.skip = "a split irqchip (IOAPIC in user space) is not modelled"
                elif key not in ("accel", "pc", "pit", "vmport", "kernel-irqchip"):
                    p.skip = f"-machine {part} is not modelled"
                if p.skip:
                    break
        elif opt == "-device":
            name = val.split(",")[0]
            p.skip = OUT_OF_SCOPE.get(name, f"device {name} is not modelled by kvmguest")
        elif opt == "-overcommit":
            p.skip = "-overcommit cpu-pm=on (guest-owned HLT/MWAIT/PAUSE) is not modelled"
        elif opt not in NO_VALUE:
            p.skip = f"QEMU option {opt} is not modelled"
    if p.skip is None:
        p.args = expand_args(test.test_args)
    return p


_host_cpuid = None


def host_cpuid():
    """The host's KVM_GET_SUPPORTED_CPUID, read once."""
    global _host_cpuid
    if _host_cpuid is None:
        from kvmguest.kvm import Kvm
        with Kvm() as kvm:
            _host_cpuid = kvm.get_supported_cpuid()
    return _host_cpuid


def environ(extra: dict | None = None) -> str:
    """kvm-unit-tests' environment file (its first module): what its run scripts put."""
    rel = platform.release()
    parts = re.split(r"[.-]", rel)
    env = {"TARGET": "kvmguest", "KERNEL_VERSION_STRING": rel,
           "KERNEL_VERSION": parts[0], "KERNEL_PATCHLEVEL": parts[1] if len(parts) > 1 else "",
           "KERNEL_SUBLEVEL": re.sub(r"\D.*", "", parts[2]) if len(parts) > 2 else ""}
    env.update(extra or {})
    return "".join(f"{k}={v}\n" for k, v in env.items())


def summary_of(output: str) -> str:
    for line in reversed(output.replace("\r", "").splitlines()[-5:]):
        if line.startswith("SUMMARY: "):
            return line[len("SUMMARY: "):]
    return ""


def _verdict(code: int | None, output: str, errors: str) -> Outcome:
    summary = summary_of(output)
    if code == 0:
        return Outcome(PASS, summary)
    if code == GUEST_SKIP:
        return Outcome(SKIP, summary or "the test skipped itself")
    last = [line for line in errors.strip().splitlines() if line.startswith("kvmguest:")]
    reason = last[0][len("kvmguest: "):] if last else f"exit status {code}"
    return Outcome(FAIL, summary or reason)


# --- child processes: every one is killed if the runner is interrupted ------------------------
_live: set = set()
_live_lock = threading.Lock()
_stopping = threading.Event()


def _start(argv, **kw) -> subprocess.Popen:
    """A child in its own session (a test's signals stay its own), remembered until it
    ends so that an interrupted run leaves no guest behind."""
    if _stopping.is_set():
        raise KeyboardInterrupt
    proc = subprocess.Popen(argv, start_new_session=True, **kw)
    with _live_lock:
        _live.add(proc)
    return proc


def _forget(proc) -> None:
    with _live_lock:
        _live.discard(proc)


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_all() -> None:
    _stopping.set()
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        _kill(proc)


# --- running on kvmguest ------------------------------------------------------------------
class _Run:
    """One kvmguest process (a run, or a restore after a migration) with its output read
    line by line, migration requests answered."""

    def __init__(self, argv, log, on_line):
        self.proc = _start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        self.log, self.on_line = log, on_line
        self.errors: list[str] = []
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._err.start()

    def _read_err(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.errors.append(line)
            self.log.write(line)

    def pump(self) -> None:
        """Read stdout to its end, calling on_line(self, line) for each line."""
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                break
            self.log.write(chunk.decode("utf-8", "replace"))
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.on_line(self, line.decode("utf-8", "replace").rstrip("\r"))
        self.proc.wait()
        self._err.join(5)
        _forget(self.proc)

    def kill(self) -> None:
        _kill(self.proc)


def run_on_kvmguest(test: KutTest, directory: str, p: Plan, log_path: str,
                    timeout: float | None = None) -> Outcome:
    """Run one test in `kvmguest run` processes (a new one after each migration)."""
    timeout = timeout or test.timeout
    kernel = os.path.join(directory, "x86", test.file)
    if not os.path.isfile(kernel):
        return Outcome(SKIP, f"test file {test.file} not found (run make in {directory})")
    with tempfile.TemporaryDirectory(prefix="kvmguest-kut-") as tmp, \
            open(log_path, "w") as log:
        env_file = os.path.join(tmp, "environ")
        Path(env_file).write_text(environ())
        sock = os.path.join(tmp, "control.sock")
        me = [sys.executable, "-m", "kvmguest"]
        argv = me + ["run", kernel, "--memory", f"{p.memory_mb}M", "--vcpus", str(p.vcpus),
                     "--initrd", env_file, "--console-input", "--control", sock,
                     "--timeout", f"{timeout:g}"]
        if p.cpu:
            argv += ["--cpu", p.cpu]
        if not p.pit:
            argv += ["--no-pit"]
        if p.args:
            argv += ["--cmdline", " ".join(p.args)]      # as QEMU's -append joins them
        log.write(" ".join(shlex.quote(a) for a in argv) + "\n")
        output: list[str] = []
        # "restored": the snapshot the current process was restored from, removed as soon
        # as the guest prints from it (a guest migrating in a loop must not fill the disk).
        state = {"migrations": 0, "next": None, "error": None, "restored": None}

        def on_line(run: _Run, line: str) -> None:
            output.append(line)
            if state["restored"] is not None:
                # The guest speaks from the new process: it no longer needs the file.
                os.unlink(state["restored"])
                state["restored"] = None
            if not any(line.startswith(r) for r in MIGRATION_REQUESTS):
                return
            if line.startswith("Skipped VM migration"):
                run.proc.stdin.write(MIGRATION_KEY)
                run.proc.stdin.flush()
                return
            snap = os.path.join(tmp, f"migration-{state['migrations']}.snap")
            kept = sorted(n for n in os.listdir(tmp) if n.endswith(".snap"))
            saved = subprocess.run(me + ["save", "--control", sock, snap], capture_output=True,
                                   text=True, timeout=timeout)
            log.write(f"# migration {state['migrations']}: kvmguest save -> "
                      f"{saved.returncode} (snapshots kept before it: {len(kept)})\n"
                      f"{saved.stdout}{saved.stderr}")
            if saved.returncode != 0:
                state["error"] = f"live save failed: {saved.stderr.strip()}"
                run.kill()
                return
            state["migrations"] += 1
            state["next"] = snap

        started = time.monotonic()
        deadline = started + timeout + 10
        run = _Run(argv, log, on_line)
        timer = threading.Timer(timeout + 10, lambda: cur.kill())
        cur = run
        timer.start()
        try:
            while True:
                cur.pump()
                if state["next"] is None:
                    break
                snap, state["next"] = state["next"], None
                state["restored"] = snap
                restore = me + ["restore", snap, "--console-input", "--control", sock,
                                "--timeout", f"{max(1.0, deadline - time.monotonic()):g}"]
                log.write("# restore in a new process: " + " ".join(restore) + "\n")
                cur = _Run(restore, log, on_line)
                cur.proc.stdin.write(MIGRATION_KEY)
                cur.proc.stdin.flush()
        finally:
            timer.cancel()
        seconds = time.monotonic() - started
        if state["error"]:
            return Outcome(FAIL, state["error"], seconds, log_path, state["migrations"])
        if cur.proc.returncode in (-signal.SIGKILL, 124) or seconds > timeout + 9:
            out = Outcome(FAIL, f"timeout; duration={timeout:g}s", seconds, log_path)
        else:
            out = _verdict(cur.proc.returncode, "\n".join(output), "".join(cur.errors))
        out.seconds, out.log, out.migrations = seconds, log_path, state["migrations"]
        return out


# --- running on QEMU ------------------------------------------------------------------------
def run_on_qemu(test: KutTest, directory: str, p: Plan, log_path: str,
                qemu: str = QEMU) -> Outcome:
    """The same test as kvm-unit-tests' x86/run starts it, with its exit status read the
    same way ((status << 1) | 1 from isa-debug-exit)."""
    kernel = os.path.join(directory, "x86", test.file)
    if not os.path.isfile(kernel):
        return Outcome(SKIP, f"test file {test.file} not found")
    if "migration" in test.groups:
        return Outcome(SKIP, "kvmguest kut answers the migration protocol on kvmguest only "
                             "(kvm-unit-tests' run_migration does it for QEMU)")
    with tempfile.TemporaryDirectory(prefix="kvmguest-kut-qemu-") as tmp, \
            open(log_path, "w") as log:
        env_file = os.path.join(tmp, "environ")
        Path(env_file).write_text(environ())
        argv = [qemu, *QEMU_BASE, "-kernel", kernel, "-smp", str(test.smp)]
        args = expand_args(test.test_args)
        if args:
            argv += ["-append", " ".join(args)]
        argv += shlex.split(test.params) + ["-initrd", env_file]
        log.write(" ".join(shlex.quote(a) for a in argv) + "\n")
        started = time.monotonic()
        try:
            proc = _start(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, errors="replace")
        except FileNotFoundError:
            return Outcome(SKIP, f"{qemu} not found")
        try:
            stdout, stderr = proc.communicate(timeout=test.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            stdout, stderr = proc.communicate()
            log.write(stdout + stderr)
            return Outcome(FAIL, f"timeout; duration={test.timeout:g}s",
                           time.monotonic() - started, log_path)
        finally:
            _forget(proc)
        log.write(stdout + stderr)
        seconds = time.monotonic() - started
        ret, errors = proc.returncode, stderr.strip()
        summary = summary_of(stdout)
        if ret == 1 and not [e for e in errors.splitlines() if "warning" not in e.lower()]:
            return Outcome(PASS, summary, seconds, log_path)
        if ret == 77:
            return Outcome(SKIP, summary, seconds, log_path)
        if ret < 0 or ret == 134:
            last = errors.splitlines()[-1] if errors else f"signal {-ret}"
            return Outcome(FAIL, f"QEMU aborted: {last}", seconds, log_path)
        reason = errors.splitlines()[-1] if errors and ret in (0, 1) else ""
        return Outcome(FAIL, summary or reason or f"exit status {ret}", seconds, log_path)


# --- the suite -------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    kvmguest: Outcome
    qemu: Outcome | None = None

    def to_json(self) -> dict:
        d = {"name": self.name, "kvmguest": asdict(self.kvmguest)}
        if self.qemu is not None:
            d["qemu"] = asdict(self.qemu)
        return d


def log_name(test: str, index: int) -> str:
    """A log file name for ``test`` that stays inside the log folder: its name with
    anything but letters, digits, '-', '_' and inner dots replaced (a name from
    unittests.cfg is input: "[/abs/path]" or "[../../x]" must not become a path)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", test).strip(".") or "test"
    return f"{safe}.log" if safe == test else f"{safe}-{index}.log"


def run_suite(directory: str, names=(), group: str | None = None, jobs: int = 1,
              compare_qemu: bool = False, run_all: bool = False, on_result=None,
              log_dir: str | None = None, cfg: str | None = None) -> list[Result]:
    """Run the selected tests (``jobs`` at a time); ``on_result(result)`` as each ends,
    in the order of unittests.cfg (or ``cfg``: another file of tests whose files are in
    the tree's x86/)."""
    if not os.path.isdir(os.path.join(directory, "x86")):
        raise UsageError(f"{directory} is not a kvm-unit-tests tree (no x86/ folder)")
    cfg = cfg or os.path.join(directory, "x86", "unittests.cfg")
    if not os.path.isfile(cfg):
        raise UsageError(f"no {cfg}: is {directory} a kvm-unit-tests tree?")
    tests = select(parse_cfg(cfg), names, group)
    log_dir = log_dir or os.path.join(directory, "logs", "kvmguest")
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the log folder {log_dir}: {err.strerror}") from None

    log_names = {t.name: log_name(t.name, i) for i, t in enumerate(tests)}

    def one(test: KutTest) -> Result:
        p = plan(test, run_all=run_all, selected=bool(names) or bool(group))
        if p.skip:
            mine = Outcome(SKIP, p.skip)
        else:
            mine = run_on_kvmguest(test, directory, p, os.path.join(log_dir, log_names[test.name]))
        theirs = None
        if compare_qemu:
            why = suite_skip(test, run_all, bool(names) or bool(group))
            if why:
                theirs = Outcome(SKIP, why)
            else:
                theirs = run_on_qemu(test, directory, p, os.path.join(
                    log_dir, log_names[test.name].replace(".log", ".qemu.log")))
        return Result(test.name, mine, theirs)

    results: list[Result] = []
    _stopping.clear()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        try:
            for r in pool.map(one, tests):
                results.append(r)
                if on_result is not None:
                    on_result(r)
        except BaseException:          # Ctrl-C, SIGTERM: no test process outlives us
            _kill_all()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results
