"""The gdb stub driven by real gdb (Debian's, batch mode) on real KVM: breakpoints of both
kinds, single steps, write watchpoints, two vCPUs as two threads, detach and kill, a
crash, snapshots and checkpoints opened in gdb, and QEMU's gdbstub on the same guest."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

import pytest

from helpers import cli, cli_popen, guest, one_line_error, read_until, stop, wait_until

pytestmark = pytest.mark.kvm

GDB = shutil.which("gdb")
QEMU = shutil.which("qemu-system-x86_64")
DEBUG = guest("debug")
WAITING = "the guest waits for gdb at "


@pytest.fixture
def gdb():
    if GDB is None:
        pytest.fail("gdb is missing: `make test` installs it (scripts/bootstrap)")
    return GDB


def serve(*args, command="run", target=None):
    """`kvmguest run debug.elf ARGS` (or restore), waiting for gdb: (process, address)."""
    p = cli_popen(command, target or DEBUG, *args)
    seen = read_until(p.stderr, "gdb can attach at" if "no" in args else WAITING)
    address = re.search(r" at (\S+) \(gdb", seen).group(1)
    return p, address


def gdb_batch(gdb, address, commands, tmp_path, elf=DEBUG, name="script") -> str:
    """gdb -batch on ``elf``, connected to ``address``, running ``commands``; its output."""
    script = tmp_path / f"{name}.gdb"
    script.write_text("\n".join(["set pagination off", "set confirm off",
                                 f"target remote {address}", *commands]) + "\n")
    r = subprocess.run([gdb, "-batch", "-nx", "-x", str(script), str(elf)],
                       capture_output=True, text=True, timeout=300)
    return r.stdout + r.stderr


def values(output: str) -> dict[str, list[str]]:
    """Every ``@name=value`` the script printed, by name, in order."""
    out: dict[str, list[str]] = {}
    for name, value in re.findall(r"^@(\w+)=(\S+)$", output, re.M):
        out.setdefault(name, []).append(value)
    return out


class RawGdb:
    """The remote protocol by hand (acks on), for what gdb's CLI cannot do on cue."""

    def __init__(self, address: str):
        host, _, port = address.rpartition(":")
        if port.isdigit() and "/" not in address:
            self.s = socket.create_connection((host, int(port)))
        else:
            self.s = socket.socket(socket.AF_UNIX)
            self.s.connect(address)
        self.f = self.s.makefile("rb")

    def send(self, payload: bytes, raw: bytes = b"") -> None:
        if payload:
            self.s.sendall(b"$" + payload + b"#%02x" % (sum(payload) & 0xFF))
        if raw:
            self.s.sendall(raw)

    def reply(self) -> bytes:
        while (c := self.f.read(1)) != b"$":
            assert c in (b"+", b"-"), c
        body = b""
        while (c := self.f.read(1)) != b"#":
            body += c
        self.f.read(2)
        try:
            self.s.sendall(b"+")
        except BrokenPipeError:             # after D or k the stub may have hung up
            pass
        return body

    def exchange(self, payload: bytes | None, raw: bytes = b"") -> bytes:
        self.send(payload or b"", raw)
        return self.reply()

    def close(self) -> None:
        self.f.close()
        self.s.close()


def finish(p, timeout: float = 120) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def show(*names: str) -> list[str]:
    return [f'printf "@{n}=%#lx\\n", {e}' for n, e in (x.split(":", 1) for x in names)]


# --- breakpoints, registers, memory --------------------------------------------------
def test_hbreak_continue_registers_and_memory_over_tcp(gdb, tmp_path):
    p, address = serve("--gdb", "127.0.0.1:0")
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    out = gdb_batch(gdb, address, [
        *show("start:$pc", "cr0:$cr0"),
        "hbreak tick", "continue",
        *show("pc:$pc", "tick:&tick", "cpu:$rdi", "round:$rsi", "cr0:$cr0", "efer:$efer",
              "cs:$cs", "code:*(unsigned char *)$pc", "count:per_cpu[0]"),
        "set var per_cpu[0] = 100",               # a memory write the guest will notice
        *show("count:per_cpu[0]"),
        "delete", "continue"], tmp_path)
    v = values(out)
    assert v["start"] == ["0x100000"], out       # PVH entry: 32-bit, paging off
    assert v["cr0"][0] == "0x11" and int(v["cr0"][1], 16) & 0x80000001 == 0x80000001, out
    assert v["pc"] == v["tick"] and v["cpu"] == ["0"] and v["round"] == ["0x1"], out
    assert int(v["efer"][0], 16) & 0x500 == 0x500 and v["cs"] == ["0x8"], out   # long mode
    assert v["code"] == ["0x89"], out            # mov %edi,%edx: the original byte
    assert v["count"] == ["0", "0x64"], out
    assert "exited with code 01" in out, out
    rc, console, _ = finish(p)
    assert rc == 1 and "cpu 0 counted 155, want 55" in console


def test_software_breakpoint_in_a_loop_is_hit_every_round(gdb, tmp_path):
    p, address = serve("--gdb", tmp_path / "g.sock")
    rounds = 6
    out = gdb_batch(gdb, address, ["break tick"] + [
        line for _ in range(rounds)
        for line in ["continue", *show("round:$rsi", "count:per_cpu[0]", "pc:$pc")]]
        + ["delete", "continue"], tmp_path)
    v = values(out)
    assert "Hardware assisted" not in out and "Breakpoint 1 at" in out, out
    assert [int(x, 16) for x in v["round"]] == list(range(1, rounds + 1)), out
    assert [int(x, 16) for x in v["count"]] == [r * (r - 1) // 2 for r in range(1, rounds + 1)]
    assert len(set(v["pc"])) == 1 and "exited normally" in out, out
    rc, console, _ = finish(p)
    assert rc == 0 and "every cpu counted 55" in console


STEPS = """python
import gdb
def pc():
    return int(gdb.parse_and_eval("$pc")) & (2**64 - 1)
arch = gdb.selected_frame().architecture()
for i in range({n}):
    here = pc()
    insn = arch.disassemble(here)[0]
    text = insn["asm"].split()
    nxt = [here + insn["length"]]
    if text[0].startswith("ret"):
        nxt = [int(gdb.parse_and_eval("*(unsigned long *)$rsp")) & (2**64 - 1)]
    elif text[0].startswith(("j", "call")) and text[1].startswith("0x"):
        target = int(text[1], 16)
        nxt = [target] if text[0].startswith(("jmp", "call")) else nxt + [target]
    gdb.execute("stepi", to_string=True)
    print("@step=%s" % ("ok" if pc() in nxt else "BAD:%x->%x(%s)" % (here, pc(), insn["asm"])))
end"""


def test_stepi_advances_exactly_one_instruction_each_time(gdb, tmp_path):
    p, address = serve("--gdb", tmp_path / "g.sock")
    out = gdb_batch(gdb, address, ["hbreak work", "continue", "delete",
                                   STEPS.format(n=40), "detach"], tmp_path)
    assert values(out).get("step") == ["ok"] * 40, out
    rc, console, _ = finish(p)
    assert rc == 0 and "every cpu counted 55" in console


def test_write_watchpoint_reports_old_and_new_values(gdb, tmp_path):
    p, address = serve("--gdb", tmp_path / "g.sock")
    out = gdb_batch(gdb, address, ["watch last_round", "continue", *show("pc:$pc"),
                                   "continue", "continue", "delete", "continue"], tmp_path)
    assert "Hardware watchpoint 1: last_round" in out, out
    changes = re.findall(r"Old value = (\d+)\s+New value = (\d+)", out)
    assert changes == [("0", "1"), ("1", "2"), ("2", "3")], out
    assert "in tick" in out and "exited normally" in out, out
    rc, console, _ = finish(p)
    assert rc == 0 and "every cpu counted 55" in console


def test_two_vcpus_are_two_threads(gdb, tmp_path):
    p, address = serve("--gdb", tmp_path / "g.sock", "--vcpus", "2")
    out = gdb_batch(gdb, address, [
        "break tick if cpu == 1", "continue", "info threads",
        *show("thread:$_thread", "cpu:$rdi", "round:$rsi"),
        "thread 1", *show("thread:$_thread", "pc1:$pc"),
        "delete", "break tick if cpu == 0 && round == 4", "continue",
        *show("thread:$_thread", "cpu:$rdi", "round:$rsi"), "delete", "continue"], tmp_path)
    v = values(out)
    assert "Thread 2 hit Breakpoint 1" in out, out
    assert re.search(r"1 +Thread 1 \(vCPU 0, long mode, CPL0\)", out), out
    assert re.search(r"2 +Thread 2 \(vCPU 1, long mode, CPL0\)", out), out
    assert v["thread"] == ["0x2", "0x1", "0x1"] and v["cpu"] == ["0x1", "0"], out
    assert v["round"] == ["0x1", "0x4"] and "exited normally" in out, out
    rc, console, _ = finish(p)
    assert rc == 0 and "every cpu counted 55" in console


def test_after_detach_the_guest_finishes_with_its_exit_code(gdb, tmp_path):
    p, address = serve("--gdb", tmp_path / "g.sock", "--cmdline", "rounds=12")
    out = gdb_batch(gdb, address, ["break tick", "watch last_round", "continue",
                                   "continue", "detach"], tmp_path)
    assert "Detaching from program" in out or "detached" in out, out
    rc, console, _ = finish(p)
    assert rc == 0 and "every cpu counted 78" in console


def test_kill_ends_the_guest_and_says_so(gdb, tmp_path):
    p, address = serve("--gdb", tmp_path / "g.sock")
    out = gdb_batch(gdb, address, ["hbreak tick", "continue", "kill"], tmp_path)
    assert "killed" in out, out
    rc, console, err = finish(p)
    assert rc == 1 and "gdb killed the guest" in err and "counted" not in console


def test_a_crash_stops_in_gdb_at_the_faulting_instruction(gdb, tmp_path):
    p, address = serve("--gdb", tmp_path / "g.sock", target=guest("fault"))
    out = gdb_batch(gdb, address, ["continue", *show("pc:$pc"), "x/i $pc", "continue"],
                    tmp_path, elf=guest("fault"))
    assert "Program received signal SIGSEGV" in out and "ud2" in out, out
    assert "Program terminated with signal SIGSEGV" in out, out
    rc, _, err = finish(p)
    assert rc == 123 and "triple-faulted" in err


def test_ctrl_c_interrupts_a_guest_gdb_attached_to_while_it_ran(tmp_path):
    """The protocol by hand: attach to a running guest (--gdb-wait no), continue, Ctrl-C."""
    p, address = serve("--gdb", tmp_path / "g.sock", "--gdb-wait", "no", "--cmdline",
                       "rounds=100000000")
    read_until(p.stdout, "debug: 1 cpus")           # it runs before gdb comes
    g = RawGdb(address)
    try:
        assert g.exchange(b"?").startswith(b"T02thread:1;")     # stopped on attach
        rip1 = g.exchange(b"p10")
        g.send(b"vCont;c")
        assert g.f.read(1) == b"+"
        assert g.exchange(None, b"\x03").startswith(b"T02thread:1;")
        rip2 = g.exchange(b"p10")
        assert len(rip1) == len(rip2) == 16
        assert g.exchange(b"qRcmd," + b"phys on".hex().encode()).startswith(b"O")
        assert g.reply() == b"OK"
        g.send(b"k")
    finally:
        g.close()
    rc, _, err = finish(p)
    assert rc == 1 and "gdb killed the guest" in err


def test_one_gdb_at_a_time_and_the_socket_goes_with_the_guest(tmp_path):
    sock = tmp_path / "g.sock"
    p, address = serve("--gdb", sock)
    first = RawGdb(address)
    assert first.exchange(b"?").startswith(b"T05thread:1;")  # attached, stopped at the start
    second = socket.socket(socket.AF_UNIX)
    second.connect(address)
    assert second.recv(64) == b""                           # turned away
    read_until(p.stderr, "another gdb tried to attach; one at a time")
    assert first.exchange(b"D") == b"OK"                    # detach: the guest runs on
    first.close()
    rc, console, _ = finish(p)
    assert rc == 0 and "every cpu counted 55" in console
    assert not sock.exists()


def test_a_guests_own_int3_still_reaches_it_while_gdb_has_breakpoints(gdb, tmp_path):
    p, address = serve("--gdb", tmp_path / "g.sock", target=guest("insns"))
    out = gdb_batch(gdb, address, ["break main", "continue", "break exit", "continue",
                                   *show("code:$rdi"), "delete", "continue"],
                    tmp_path, elf=guest("insns"))
    assert values(out)["code"] == ["0"], out
    rc, console, _ = finish(p)
    assert rc == 0 and "all ok" in console


# --- snapshots and time ------------------------------------------------------------------
DUMP = show(*[f"{r}:${r}" for r in ("pc", "rsp", "rbp", "rax", "rbx", "rcx", "rdx", "rsi",
                                    "rdi", "r8", "r12", "eflags", "cr3", "fs_base")],
            "count:per_cpu[0]", "last:last_round", "code:*(unsigned long *)tick")


def test_a_snapshot_opened_in_gdb_equals_the_live_guest_at_the_same_stop(gdb, tmp_path):
    snap = tmp_path / "stop.kvm"
    p, address = serve("--gdb", tmp_path / "g.sock", "--vcpus", "2")
    live = gdb_batch(gdb, address, ["break tick", "continue", "continue", "continue",
                                    "delete", "thread 1", *DUMP, "thread 2", *DUMP,
                                    f"monitor snapshot {snap}", "detach"], tmp_path)
    assert "saved the stopped guest" in live, live
    rc, console, _ = finish(p)
    assert rc == 0 and "every cpu counted 55" in console
    p, address = serve("--gdb", tmp_path / "g2.sock", command="restore", target=snap)
    restored = gdb_batch(gdb, address, ["thread 1", *DUMP, "thread 2", *DUMP, "continue"],
                         tmp_path,
                         name="restored")
    assert values(live) == values(restored) and len(values(live)["pc"]) == 2, (live, restored)
    assert "exited normally" in restored
    rc, console, _ = finish(p)
    assert rc == 0 and "every cpu counted 55" in console


def test_reverse_continue_goes_back_to_the_newest_checkpoint(gdb, tmp_path):
    ck = tmp_path / "ck.kvm"
    p, address = serve("--gdb", tmp_path / "g.sock", "--cmdline", "rounds=200000",
                       "--checkpoint", ck, "--every", "0.05")
    out = gdb_batch(gdb, address, [
        "break finish", "continue", *show("last:last_round"), "monitor checkpoints",
        "reverse-continue", *show("last:last_round", "pc:$pc"),
        "continue", *show("last:last_round", "sum:$rdi"),
        "reverse-stepi", "monitor goto 1", "delete", "continue"], tmp_path)
    v = values(out)
    assert v["last"][0] == "0x30d40" and v["last"][2] == "0x30d40", out     # 200000
    back = int(v["last"][1], 16)
    assert 0 <= back < 200000, out
    assert out.count("No more reverse-execution history.") == 2, out
    assert re.search(r"checkpoint (\d+) in .*the newest", out), out
    assert v["sum"] == [hex(200000 * 200001 // 2)] and "exited normally" in out, out
    rc, console, _ = finish(p)
    assert rc == 0 and "every cpu counted 20000100000" in console
    # The breakpoint at finish() was in guest RAM while checkpoints were taken: none holds it.
    from migrate.formats.checkpoint import load_checkpoint, validated_checkpoint
    nm = subprocess.run(["nm", str(DEBUG)], capture_output=True, text=True).stdout
    at = int(re.search(r"^([0-9a-f]+) T finish$", nm, re.M).group(1), 16)
    fd = os.open(ck, os.O_RDONLY)
    try:
        memory, _ = load_checkpoint(validated_checkpoint(str(ck), fd), fd)
    finally:
        os.close(fd)
    try:
        assert memory.read(at, 1) != b"\xcc"
        assert memory.read(at, 4) == DEBUG.read_bytes()[_file_offset(at):_file_offset(at) + 4]
    finally:
        memory.close()


def _file_offset(vaddr: int) -> int:
    """Where the code at ``vaddr`` sits in debug.elf (its one executable PT_LOAD)."""
    import struct
    data = DEBUG.read_bytes()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phnum, = struct.unpack_from("<H", data, 0x38)
    for i in range(phnum):
        typ, _, off, va, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * 56)
        if typ == 1 and va <= vaddr < va + filesz:
            return off + vaddr - va
    raise AssertionError(f"{vaddr:#x} is in no PT_LOAD")


# --- the same script against QEMU's gdbstub ------------------------------------------
def test_qemu_gdbstub_stops_at_the_same_place_with_the_same_state(gdb, tmp_path):
    if QEMU is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("qemu-system-x86_64 missing: `make test` installs it")
        pytest.skip("qemu-system-x86_64 not installed")
    script = ["hbreak tick", "continue", "continue", "continue", *show(
        "pc:$pc", "rsp:$rsp", "rdi:$rdi", "rsi:$rsi", "count:per_cpu[0]", "last:last_round",
        "code:*(unsigned long *)tick"), "delete", "kill"]
    p, address = serve("--gdb", tmp_path / "g.sock")
    ours = gdb_batch(gdb, address, script, tmp_path)
    finish(p)
    sock = tmp_path / "qemu.sock"
    q = subprocess.Popen(
        [QEMU, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "64M", "-display",
         "none", "-nodefaults", "-no-reboot", "-kernel", str(DEBUG),
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "none",
         "-chardev", f"socket,id=g,path={sock},server=on,wait=off", "-gdb", "chardev:g",
         "-S"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: sock.exists() or q.poll() is not None, 60, "QEMU's gdb socket")
        assert q.poll() is None, q.stderr.read()
        theirs = gdb_batch(gdb, str(sock), script, tmp_path, name="qemu")
    finally:
        stop(q)
    assert values(ours) == values(theirs) and values(ours)["rsi"] == ["0x3"], (ours, theirs)


# --- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("args,fragment", [
    (["--gdb", "0.0.0.0:1234"], "listens on this machine only"),
    (["--gdb", "70000"], "out of range"),
    (["--gdb-wait", "no"], "--gdb-wait goes with --gdb"),
    (["--gdb", "1234", "--guest-migrate"], "do not go together"),
])
def test_gdb_option_errors_are_one_line(args, fragment):
    one_line_error(cli("run", DEBUG, *args), 2, fragment)


def test_a_gdb_socket_path_that_is_not_a_socket_is_left_alone(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    one_line_error(cli("run", DEBUG, "--gdb", f), 2, "not a socket")
    assert f.read_text() == "keep me"


# --- a failed test leaves its guest for gdb ---------------------------------------------
FAILING = """
import pytest

@pytest.mark.kvm
def test_that_fails(machine_factory):
    m = machine_factory({kernel!r}, cmdline="rounds=100000000")
    m.start()
    assert m.serial.wait_for("debug: 1 cpus", 30)
    assert m.serial.text() == "something else"
"""


def test_a_failed_kvm_test_leaves_its_guest_and_the_command_to_open_it(gdb, pytester,
                                                                        tmp_path):
    pytester.makepyfile(test_fails=FAILING.format(kernel=str(DEBUG)))
    pytester._monkeypatch.setenv("KVMGUEST_FAILED_SNAPSHOTS", str(tmp_path / "failed"))
    r = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    r.assert_outcomes(failed=1)
    text = r.stdout.str()
    command = re.search(r"^  (kvmguest restore .*)$", text, re.M).group(1)
    snap = tmp_path / "failed" / "test_fails.py_test_that_fails.kvm"
    assert snap.exists() and f"kvmguest restore {snap} --gdb" in command, text
    assert oct(os.stat(tmp_path / "failed").st_mode & 0o777) == "0o700"
    # The printed command, as a user runs it: the guest waits in gdb where the test failed.
    restore_part, gdb_part = command.split(" & ")
    sock = restore_part.split("--gdb ")[1].split()[0]
    p = cli_popen("restore", snap, "--gdb", sock, "-q")
    read_until(p.stderr, WAITING)
    out = gdb_batch(gdb, sock, [*show("rounds:rounds"), "kill"], tmp_path)
    assert values(out)["rounds"] == [hex(100000000)], out
    assert "gdb " in gdb_part and str(DEBUG) in gdb_part
    finish(p)


def test_the_printed_gdb_socket_fits_a_unix_socket_path_however_long_the_test_name(
        tmp_path, monkeypatch):
    from kvmguest.front.testing.plugin import gdb_socket_for
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    short = str(tmp_path / "t.kvm")
    assert gdb_socket_for(short) == str(tmp_path / "t.gdb")
    long = str(tmp_path / ("tests_test_x.py_" + "a_very_long_test_name_" * 6 + ".kvm"))
    sock = gdb_socket_for(long)
    assert len(os.fsencode(sock)) <= 107 and sock.endswith(".sock"), sock
    assert gdb_socket_for(long) == sock and gdb_socket_for(long + "2.kvm") != sock


def test_a_write_watchpoint_is_refused_while_checkpoints_track_pages(gdb, tmp_path):
    """Watched pages live in memory slots of their own; dirty logging works per slot, so
    the two do not mix: the watchpoint is refused, said once, and nothing is lost."""
    p, address = serve("--gdb", tmp_path / "g.sock", "--checkpoint", tmp_path / "ck.kvm")
    tries = "\n".join(["python", "for what in ('watch', 'rwatch'):",
                        "    gdb.execute(what + ' last_round')",
                        "    try:", "        gdb.execute('continue')",
                        "    except gdb.error as err:", "        print('@refused=' + what)",
                        "    gdb.execute('delete')", "end"])
    out = gdb_batch(gdb, address, [tries, "continue"], tmp_path)
    assert values(out)["refused"] == ["watch", "rwatch"], out
    assert "Could not insert hardware watchpoint 1" in out, out
    rc, console, err = finish(p)
    assert "read watchpoints are refused" in err and "cannot be set while" in err, err
    assert rc == 0 and "every cpu counted 55" in console


# --- what a client cannot do to the stub (docs/guarantees.md) ------------------------------
def monitor(g: RawGdb, command: str) -> bytes:
    """A monitor command by hand: its console text (the O packet), then OK."""
    text = g.exchange(b"qRcmd," + command.encode().hex().encode())
    assert g.reply() == b"OK"
    return bytes.fromhex(text[1:].decode()) if text.startswith(b"O") else text


def closed(s: socket.socket, timeout: float = 60) -> bool:
    """The stub hung up on ``s`` (nothing more comes but the acks of what was sent)."""
    s.settimeout(timeout)
    try:
        while (data := s.recv(65536)) and not data.strip(b"+-"):
            pass
        return not data
    except ConnectionResetError:
        return True


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
def test_another_user_can_neither_read_the_guest_nor_write_a_file_through_tcp(tmp_path):
    p, address = serve("--gdb", "127.0.0.1:0")
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    target.chmod(0o666)          # writable by the other user too: only the stub may stop it
    host, port = address.rsplit(":", 1)
    snapshot = b"qRcmd," + f"snapshot {target}".encode().hex().encode()
    attacker = subprocess.run(
        ["/usr/bin/python3", "-c", f"""
import socket, sys
s = socket.create_connection(({host!r}, {port}))
got = b""
try:
    for payload in (b"m100000,40", {snapshot!r}):
        s.sendall(b"$" + payload + b"#%02x" % (sum(payload) & 0xFF))
except (BrokenPipeError, ConnectionResetError):
    pass                       # refused and closed before all of it was sent
try:
    while (data := s.recv(4096)):
        got += data
except ConnectionResetError:
    pass
sys.stdout.write(got.hex())
"""], user=65534, cwd="/", capture_output=True, text=True, timeout=60)
    assert attacker.returncode == 0 and attacker.stdout == "", attacker
    assert target.read_bytes() == b"precious"
    read_until(p.stderr, "gdb: refused a connection from uid 65534: only this user (uid 0)")
    g = RawGdb(address)                      # the owner is served
    try:
        assert g.exchange(b"?").startswith(b"T05thread:1;")
        g.send(b"k")
    finally:
        g.close()
    rc, _, err = finish(p)
    assert rc == 1 and "gdb killed the guest" in err


def test_a_huge_memory_read_gets_the_part_that_fits_one_packet(tmp_path):
    from kvmguest.front.gdb.server import MAX_READ
    p, address = serve("--gdb", tmp_path / "g.sock", "--memory", "512M")
    g = RawGdb(address)
    try:
        assert b"PacketSize=4000" in g.exchange(b"qSupported")
        assert b"guest-physical" in monitor(g, "phys on")
        data = g.exchange(b"m0,ffffffffffff")
        assert len(data) == 2 * MAX_READ and len(data) + 4 <= 0x4000
        xml = g.exchange(b"qXfer:features:read:target.xml:0,fffffff")
        assert xml[:1] in (b"m", b"l") and len(xml) <= 0x4000
        g.send(b"k")
    finally:
        g.close()
    assert finish(p)[0] == 1


def test_a_packet_that_never_ends_drops_that_client_and_the_guest_runs_on(tmp_path):
    p, address = serve("--gdb", tmp_path / "g.sock")
    g = RawGdb(address)
    assert g.exchange(b"?").startswith(b"T05")
    try:
        g.s.sendall(b"$" + b"a" * (1 << 20))     # no '#': gdb never sends more than 16 KiB
    except (BrokenPipeError, ConnectionResetError):
        pass                                     # dropped before all of it was sent
    assert closed(g.s)
    g.close()
    rc, console, err = finish(p)
    assert rc == 0 and "every cpu counted 55" in console
    assert "gdb: gdb sent " in err and "bytes of a packet without its end" in err


def test_malformed_packets_are_error_replies_and_the_held_guest_stays_held(tmp_path):
    """A bad escape, a negative register, a non-canonical address, a length that does
    not match: each an error reply; the connection and the stop go on."""
    p, address = serve("--gdb", tmp_path / "g.sock")
    g = RawGdb(address)
    try:
        assert g.exchange(b"?").startswith(b"T05")
        assert g.exchange(b"hbreak") == b""          # unknown: the empty reply
        for bad in (b"X100000,2:}", b"X100000,5:ab", b"p-1", b"p+10", b"P-1=00", b"m 10,4",
                    b"m0x10,4", b"M100000,2:zz", b"M100000,4:00", b"Z2,1_0,4", b"Hg-2"):
            assert g.exchange(bad).startswith(b"E"), bad
        assert g.exchange(b"?").startswith(b"T05")   # still attached, still stopped
        g.send(b"k")
    finally:
        g.close()
    rc, console, err = finish(p)
    assert rc == 1 and "gdb killed the guest" in err and "debug: " not in console, err


def symbol(name: str, elf=DEBUG) -> int:
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    return int(re.search(rf"^([0-9a-f]+) \w {name}$", out, re.M).group(1), 16)


def test_memory_beyond_canonical_addresses_is_not_read(tmp_path):
    p, address = serve("--gdb", tmp_path / "g.sock")
    g = RawGdb(address)
    try:
        assert g.exchange(b"?").startswith(b"T05")
        assert g.exchange(b"Z1,%x,1" % symbol("tick")) == b"OK"   # long mode, paging on
        assert g.exchange(b"vCont;c").startswith(b"T05")
        assert len(g.exchange(b"m100000,4")) == 8        # identity-mapped
        assert g.exchange(b"m1000000100000,4") == b"E14"   # bits 48+: not canonical
        assert g.exchange(b"m0000800000100000,4") == b"E14"
        g.send(b"k")
    finally:
        g.close()
    finish(p)


def test_a_monitor_snapshot_path_may_hold_spaces(tmp_path):
    where = tmp_path / "my snapshots"
    where.mkdir()
    p, address = serve("--gdb", tmp_path / "g.sock")
    g = RawGdb(address)
    try:
        assert b"saved the stopped guest" in monitor(g, f"snapshot {where}/a b.snap")
        assert b"saved the stopped guest" in monitor(g, f"snapshot '{where}/c  d.snap'")
        g.send(b"k")
    finally:
        g.close()
    finish(p)
    assert sorted(f.name for f in where.iterdir()) == ["a b.snap", "c  d.snap"]


def test_turned_away_gdbs_are_told_a_few_times_then_counted(tmp_path):
    p, address = serve("--gdb", tmp_path / "g.sock")
    first = RawGdb(address)
    assert first.exchange(b"?").startswith(b"T05")
    for _ in range(12):
        other = socket.socket(socket.AF_UNIX)
        other.connect(address)
        assert other.recv(64) == b""
        other.close()
    assert first.exchange(b"D") == b"OK"
    first.close()
    rc, _, err = finish(p)
    assert rc == 0
    assert err.count("another gdb tried to attach") == 3, err
    assert "9 more messages like the above were not shown" in err, err


def test_the_timeout_ends_a_run_that_gdb_holds_stopped(tmp_path):
    p, address = serve("--gdb", tmp_path / "g.sock", "--timeout", "3")
    g = RawGdb(address)
    assert g.exchange(b"?").startswith(b"T05")       # attached, and then idle
    rc, _, err = finish(p)
    assert rc == 124 and "did not finish within 3 s" in err, err
    assert closed(g.s, 10)
    g.close()


def test_the_timeout_tells_a_waiting_gdb_the_guest_was_killed(tmp_path):
    p, address = serve("--gdb", tmp_path / "g.sock", "--timeout", "3", "--cmdline",
                       "rounds=100000000")
    g = RawGdb(address)
    assert g.exchange(b"?").startswith(b"T05")
    assert g.exchange(b"vCont;c") == b"X09"          # it ran on until the timeout
    rc, _, err = finish(p)
    assert rc == 124, err
    g.close()


def test_a_gdb_that_stops_reading_is_dropped_and_the_guest_runs_on(tmp_path):
    from kvmguest.front.gdb.connection import SEND_TIMEOUT
    p, address = serve("--gdb", tmp_path / "g.sock", "--memory", "512M")
    g = RawGdb(address)
    assert g.exchange(b"?").startswith(b"T05")
    g.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    burst = b"".join(b"$m100000,2000#%02x" % (sum(b"m100000,2000") & 0xFF) for _ in range(400))
    g.s.sendall(burst)                               # 400 replies of 16 KiB, none read
    rc, console, err = finish(p, timeout=SEND_TIMEOUT + 120)
    assert rc == 0 and "every cpu counted 55" in console
    assert f"gdb: gdb took no reply for {SEND_TIMEOUT:g} s: disconnected" in err, err
    g.close()


def test_a_write_watchpoint_changes_a_few_slots_and_they_are_capped(tmp_path):
    """Each watched page costs at most four memory-slot changes however many are
    watched; past MAX_PROTECTED_PAGES the stub refuses with E28 and says why."""
    from kvmguest.arch.x86.platform import MAX_PROTECTED_PAGES
    from kvmguest.front.gdb.server import GdbStub
    from kvmguest.machine import Machine
    m = Machine(str(DEBUG), memory=64 << 20)
    notes: list[str] = []
    stub = GdbStub(m, str(tmp_path / "g.sock"), wait=True, note=notes.append)
    calls = []
    set_region = m.vm.set_user_memory_region
    m.vm.set_user_memory_region = lambda *a, **k: (calls.append(a), set_region(*a, **k))[1]
    try:
        m.start(paused=True)
        stub.start()
        g = RawGdb(stub.where)
        assert b"guest-physical" in monitor(g, "phys on")
        pages = [0x800000 + i * 0x3000 for i in range(MAX_PROTECTED_PAGES + 1)]
        for verb, order in ((b"Z2", pages[:-1]), (b"z2", pages[-2::-1])):
            for addr in order:
                before = len(calls)
                assert g.exchange(b"%s,%x,4" % (verb, addr)) == b"OK"
                assert len(calls) - before <= 4, (verb, addr, calls[before:])
            if verb == b"Z2":
                assert g.exchange(b"Z2,%x,4" % pages[-1]) == b"E28"
                assert any(f"at most {MAX_PROTECTED_PAGES} pages" in n for n in notes)
                assert len(m.platform.protected) == MAX_PROTECTED_PAGES
        assert not m.platform.protected and not m.platform._pieces
        assert g.exchange(b"D") == b"OK"
        g.close()
        assert m.wait(120).exit_code == 0
    finally:
        stub.close()
        m.close()
