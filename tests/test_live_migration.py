"""Live migration over a socket (migrate/live.py): a running guest moved to another
machine over a Unix socket and loopback TCP verifies every page on arrival; a destination
that refuses or is gone leaves the guest running on the source; a broken stream is one
error on the destination."""

from __future__ import annotations

import socket
import threading

import pytest

from helpers import GO, MARGIN, assert_verified, start_dirty, wait_console

pytestmark = pytest.mark.kvm


def _destination(address: str, answer: str = "ack"):
    """A thread taking one migration at ``address``: its result dict gets the machine's
    console text and exit code (or the error), and post-copy's figures."""
    from kvmguest.front.control import listen_for_migration
    from migrate.live import receive, refuse, restore_incoming
    server = listen_for_migration(address)
    out: dict = {}

    def serve():
        try:
            if answer == "refuse":
                inc = receive(server)
                refuse(inc.conn, "the test said no")
                inc.discard()
                return
            m, _ = restore_incoming(server)
        except Exception as err:                 # noqa: BLE001 (handed to the test)
            out["error"] = err
            return
        finally:
            server.close()
        m.start()
        m.console.send(GO.encode())
        result = m.wait(MARGIN)
        out.update(exit=result.exit_code, console=result.console)
        if m.postcopy is not None:
            out["postcopy_done"] = m.postcopy.done.wait(MARGIN)
            out["postcopy"] = m.postcopy.stats
        m.close()
    t = threading.Thread(target=serve)
    t.start()
    return t, out


@pytest.mark.parametrize("kind,threads", [("unix", 1), ("tcp", 3)])   # TCP alone: the TLS tests
def test_a_running_guest_migrates_and_verifies_every_page(machine_factory, tmp_path, kind,
                                                          threads):
    """Pre-copy over a Unix socket and loopback TCP, and over three connections
    (--threads: each pass spread over them, the destination's readers meeting at each
    pass's end, so the last copy of a page still wins)."""
    from migrate.precopy import live_save
    if kind == "unix":
        address = f"unix:{tmp_path / 'mig.sock'}"
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        address = f"tcp:127.0.0.1:{port}"
    t, out = _destination(address)
    m = start_dirty(machine_factory, pages=900, passes=40, oninput=True)
    report = live_save(m, address, format="migrate", then="stop", threads=threads,
                       postcopy="off", min_passes=3)
    assert not m.running
    t.join(MARGIN)
    assert "error" not in out, out.get("error")
    assert out["exit"] == 0, out["console"][-2000:]
    assert_verified(out["console"], 900, 40, oninput=True)
    assert report.passes and report.downtime_ms > 0


def test_a_guest_without_the_irqchip_migrates(machine_factory, tmp_path):
    """The shape sent first says no PIT where there is no irqchip (as its state does):
    the destination makes the same machine and the guest verifies every page there."""
    from migrate.precopy import live_save
    address = f"unix:{tmp_path / 'mig.sock'}"
    t, out = _destination(address)
    m = start_dirty(machine_factory, memory=64 << 20, base=32 << 20, pages=300, passes=20,
                    oninput=True, machine={"irqchip": False})
    live_save(m, address, format="migrate", then="stop", postcopy="off")
    t.join(MARGIN)
    assert "error" not in out, out.get("error")
    assert out["exit"] == 0, out["console"][-2000:]
    assert_verified(out["console"], 300, 20, oninput=True)


def test_a_destination_that_refuses_leaves_the_guest_running_on_the_source(
        machine_factory, tmp_path):
    from migrate.errors import SaveError
    from migrate.precopy import live_save
    address = f"unix:{tmp_path / 'mig.sock'}"
    t, out = _destination(address, answer="refuse")
    m = start_dirty(machine_factory, pages=300, passes=0)
    with pytest.raises(SaveError, match="refused the guest: the test said no; it runs on here"):
        live_save(m, address, format="migrate", then="stop")
    t.join(MARGIN)
    assert m.running
    m.serial.clear_output()
    wait_console(m, "ok\n")                       # it verifies on, here
    with pytest.raises(SaveError, match="cannot reach the destination"):
        live_save(m, address, format="migrate", then="stop")      # nobody listens now
    assert m.running


def test_a_broken_stream_is_one_error_on_the_destination(tmp_path):
    from migrate.live import MigrationError
    address = tmp_path / "mig.sock"
    t, out = _destination(f"unix:{address}")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(address))
        assert s.recv(9) == b"KVMGMIG2\n"               # the destination speaks first
        assert len(s.recv(16)) == 16                    # and gives a token
        s.sendall(b"KVMGSTRM" + b"\x02\x00\x00\x00" + b"\x01\x00\x00\x00" + bytes(48)
                  + b"\xff\xff\xff\x7f")           # a block list of 2 GiB
    t.join(MARGIN)
    assert isinstance(out.get("error"), MigrationError), out
    assert "too large" in str(out["error"])


def test_two_processes_migrate_a_guest_from_the_command_line(tmp_path):
    """`kvmguest restore --incoming unix:PATH` waits for one guest; `kvmguest migrate
    --control SOCK unix:PATH` moves the guest of a `run --control SOCK` there: the source
    process exits 0 once the destination has it, the destination runs it to its end and
    exits with its code; the destination's socket is gone after."""
    import subprocess

    from helpers import cli, cli_popen, guest, read_until
    sock, address = tmp_path / "ctl.sock", tmp_path / "mig.sock"
    dest = cli_popen("restore", "--incoming", f"unix:{address}", "--console-input",
                     stdin=subprocess.PIPE)
    read_until(dest.stderr, "waiting for a guest")
    src = cli_popen("run", guest("dirty"), "--memory", "256M", "--cmdline",
                    "pages=600 passes=40 quiet oninput", "--control", sock)
    read_until(src.stdout, "dirty: pass 16 ok")
    r = cli("migrate", "--control", sock, f"unix:{address}", "--threads", 2, timeout=MARGIN)
    assert r.returncode == 0 and "migrate" in r.stdout, r.stdout + r.stderr
    assert src.wait(MARGIN) == 0, src.stderr.read()
    out, err = dest.communicate(GO, timeout=MARGIN)
    assert dest.returncode == 0, err[-2000:]
    assert_verified(out, 600, 40, oninput=True)
    assert not address.exists()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA, and a certificate and key for each side signed by it (the destination's
    for 127.0.0.1), made with openssl; and a second CA nobody trusts."""
    import subprocess
    d = tmp_path_factory.mktemp("pki")

    def ssl(*args):
        subprocess.run(["openssl", *map(str, args)], cwd=d, check=True, capture_output=True)
    for ca in ("ca", "rogue"):
        ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}")
    for name, ca in (("dest", "ca"), ("src", "ca"), ("intruder", "rogue")):
        ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
            f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,IP:10.99.0.2\n")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tls_carries_a_migration_and_refuses_a_source_the_ca_did_not_sign(tmp_path, pki):
    """Mutual TLS over TCP: a source with a certificate the destination's CA signed moves
    its guest; one signed by another CA is turned away in the handshake, one line on each
    side, and its guest runs on; TCP beyond loopback without TLS is refused before any
    connection."""
    import subprocess

    from helpers import cli, cli_popen, guest, one_line_error, read_until

    def tls(name, ca="ca"):
        return ["--tls-cert", pki / f"{name}.pem", "--tls-key", pki / f"{name}.key",
                "--tls-ca", pki / f"{ca}.pem"]
    sock = tmp_path / "ctl.sock"
    src = cli_popen("run", guest("dirty"), "--memory", "256M", "--cmdline",
                    "pages=600 passes=40 quiet oninput", "--control", sock)
    read_until(src.stdout, "dirty: pass 16 ok")
    # A source the destination's CA never signed: refused, and its guest runs on.
    address = f"tcp:127.0.0.1:{_free_port()}"
    dest = cli_popen("restore", "--incoming", address, *tls("dest"))
    read_until(dest.stderr, "waiting for a guest")
    r = cli("migrate", "--control", sock, address, *tls("intruder", "ca"), timeout=MARGIN)
    assert r.returncode != 0 and "TLS with the destination failed" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert dest.wait(MARGIN) == 2 and "TLS with the source failed" in dest.stderr.read()
    assert src.poll() is None                       # still running here
    # The right certificate: the guest moves and verifies every page there.
    address = f"tcp:127.0.0.1:{_free_port()}"
    dest = cli_popen("restore", "--incoming", address, "--console-input", *tls("dest"),
                     stdin=subprocess.PIPE)
    read_until(dest.stderr, "waiting for a guest")
    r = cli("migrate", "--control", sock, address, *tls("src"), timeout=MARGIN)
    assert r.returncode == 0, r.stdout + r.stderr
    assert src.wait(MARGIN) == 0
    out, err = dest.communicate(GO, timeout=MARGIN)
    assert dest.returncode == 0, err[-2000:]
    assert_verified(out, 600, 40, oninput=True)
    one_line_error(cli("restore", "--incoming", "tcp:10.99.0.1:4444"), 2,
                   "TCP beyond loopback needs TLS")


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="needs root for namespaces")
def test_a_guest_moves_between_two_network_namespaces_over_a_veth_pair(tmp_path, pki):
    """Source and destination in two network namespaces the test makes, joined by a veth
    pair (10.99.0.1 - 10.99.0.2): beyond loopback, so TLS it must be; the guest arrives
    and verifies every page; the same move without TLS is refused at once."""
    import os
    import subprocess
    import sys

    from helpers import ROOT, cli, guest, read_until
    ns_a, ns_b = f"kvmguest-a-{os.getpid()}", f"kvmguest-b-{os.getpid()}"
    tls = {name: ["--tls-cert", pki / f"{name}.pem", "--tls-key", pki / f"{name}.key",
                  "--tls-ca", pki / "ca.pem"] for name in ("src", "dest")}

    def in_ns(ns, *args, **kw):
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "kvmguest",
                                 *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kw)
    for ns in (ns_a, ns_b):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", "kvmva", "netns", ns_a, "type", "veth", "peer",
                        "name", "kvmvb", "netns", ns_b], check=True)
        for ns, dev, ip in ((ns_a, "kvmva", "10.99.0.1/24"), (ns_b, "kvmvb", "10.99.0.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", ip, "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        sock = tmp_path / "ctl.sock"
        src = in_ns(ns_a, "run", guest("dirty"), "--memory", "256M", "--cmdline",
                    "pages=600 passes=40 quiet oninput", "--control", sock)
        read_until(src.stdout, "dirty: pass 16 ok")
        address = "tcp:10.99.0.2:4567"
        r = cli("migrate", "--control", sock, address, timeout=MARGIN)
        assert r.returncode != 0 and "needs TLS" in r.stderr, r.stderr
        dest = in_ns(ns_b, "restore", "--incoming", address, "--console-input", *tls["dest"],
                     stdin=subprocess.PIPE)
        read_until(dest.stderr, "waiting for a guest")
        r = cli("migrate", "--control", sock, address, *tls["src"], timeout=MARGIN)
        assert r.returncode == 0, r.stdout + r.stderr
        assert src.wait(MARGIN) == 0
        out, err = dest.communicate(GO, timeout=MARGIN)
        assert dest.returncode == 0, err[-2000:]
        assert_verified(out, 600, 40, oninput=True)
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def test_a_destination_killed_mid_stream_leaves_the_guest_running_on_the_source(tmp_path):
    """The destination SIGKILLs itself once 256 pages have arrived (a fault point: the
    event, not a delay): the source says so in one line and its guest runs on and
    verifies."""
    from helpers import cli, cli_popen, guest, read_until
    address, sock = tmp_path / "mig.sock", tmp_path / "ctl.sock"
    dest = cli_popen("restore", "--incoming", f"unix:{address}",
                     env={"KVMGUEST_FAULT_POINT": "incoming-pages"})
    read_until(dest.stderr, "waiting for a guest")
    src = cli_popen("run", guest("dirty"), "--memory", "256M", "--cmdline",
                    "pages=600 passes=0 quiet", "--control", sock)
    read_until(src.stdout, "dirty: pass 16 ok")
    r = cli("migrate", "--control", sock, f"unix:{address}", timeout=MARGIN)
    assert dest.wait(MARGIN) == -9
    assert r.returncode != 0 and "went away" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert src.poll() is None
    read_until(src.stdout, "ok")                   # it verifies on, here
    src.kill()
    src.communicate()


def test_a_source_killed_mid_pre_copy_is_one_error_on_the_destination(tmp_path):
    """The source SIGKILLs itself in the middle of a pre-copy pass: the destination says
    the migration broke off, in one line, exit 2, and starts nothing."""
    from helpers import cli, cli_popen, guest, read_until
    address, sock = tmp_path / "mig.sock", tmp_path / "ctl.sock"
    dest = cli_popen("restore", "--incoming", f"unix:{address}")
    read_until(dest.stderr, "waiting for a guest")
    src = cli_popen("run", guest("dirty"), "--memory", "256M", "--cmdline",
                    "pages=600 passes=0 quiet", "--control", sock,
                    env={"KVMGUEST_FAULT_POINT": "midpass"})
    read_until(src.stdout, "dirty: pass 16 ok")
    cli("migrate", "--control", sock, f"unix:{address}", timeout=MARGIN)
    assert src.wait(MARGIN) == -9
    out, err = dest.communicate(timeout=MARGIN)
    assert dest.returncode == 2 and "the migration broke off" in err, err
    assert "Traceback" not in err


def test_any_stream_is_taken_whole_or_refused_in_one_error(tmp_path):
    """Hypothesis writes streams around a valid one (a 2 MiB block, pages, a state, the
    end), cut and mutated anywhere: the destination takes each whole or refuses it with
    a SnapshotError (one line, exit 2: MigrationError is one), nothing else, and never
    holds more than the block's memory."""
    import json
    import os
    import struct
    import zlib

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from kvmguest.front.control import listen_for_migration
    from migrate.format import SnapshotError
    from migrate.live import GREETING, TOKEN, receive
    blocks = json.dumps([{"name": "ram", "gpa": 0, "size": 2 << 20, "slot": 0}]).encode()
    shape = json.dumps({"shape": {"cpuids": ["00" * 8], "irqchip": True, "pit": True},
                        "postcopy": "off"}).encode()
    state = json.dumps({"format": "kvmguest-state"}).encode()
    valid = (b"KVMGSTRM" + struct.pack("<II", 2, 1) + bytes(48) + struct.pack("<I", len(blocks))
             + blocks + struct.pack("<IIQ", 6, 0, 0)
             + struct.pack("<QI", len(shape), zlib.crc32(shape)) + shape
             + struct.pack("<IIQ", 1, 0, 3) + bytes(range(256)) * 16
             + struct.pack("<IIQ", 2, 0, 7) + struct.pack("<IIQ", 5, 0, 9) + struct.pack("<Q", 4)
             + struct.pack("<IIQ", 3, 0, 0)
             + struct.pack("<QI", len(state), zlib.crc32(state)) + state
             + struct.pack("<IIQ", 4, 0, 0))
    examples = int(os.environ.get("KVMGUEST_FUZZ_EXAMPLES", "60"))

    @settings(max_examples=examples, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(cut=st.integers(0, len(valid)), flips=st.lists(
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), max_size=4))
    def check(cut, flips):
        data = bytearray(valid)
        for at, byte in flips:
            data[at] = byte
        data = bytes(data[:cut]) if cut < len(valid) else bytes(data)
        path = tmp_path / "f.sock"
        server = listen_for_migration(f"unix:{path}")
        out = {}

        def serve():
            try:
                receive(server).discard()
                out["ok"] = True
            except SnapshotError as err:
                out["refused"] = str(err)
            except Exception as err:      # noqa: BLE001 - anything else is the failure
                out["other"] = err
        t = threading.Thread(target=serve)
        t.start()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.recv(len(GREETING) + TOKEN)
            try:
                s.sendall(data)
            except OSError:
                pass
        t.join(MARGIN)
        server.close()
        os.unlink(path)
        assert "other" not in out, out
        assert out, "the destination neither took nor refused the stream"
    check()


@pytest.mark.parametrize("name", ["smp", "timer", "ipi"])
def test_two_vcpus_with_timers_and_ipis_migrate_and_carry_on(tmp_path, name):
    """Moved while both vCPUs run (timers ticking, IPIs in flight, pages verified) to a
    `restore --incoming` process: every vCPU carries on there, and the guest's own checks
    (no lost or doubled interrupt, no stopped timer, every page right) hold to the end."""
    import subprocess

    from helpers import cli, cli_popen, guest, read_until
    runs = {"smp": ("pages=256 passes=64 quiet oninput", "smp: pass 32 ok",
                    "smp: verified 256 pages on 2 cpus over"),
            "timer": ("ticks=200 quiet oninput", "timer: pit 1",
                      "timer: every timer ticked on 2 cpus over"),
            "ipi": ("rounds=512 quiet oninput", "ipi: round 256 ok", "all delivered once")}
    cmdline, milestone, verdict = runs[name]
    sock, address = tmp_path / "ctl.sock", f"unix:{tmp_path / 'mig.sock'}"
    dest = cli_popen("restore", "--incoming", address, "--console-input",
                     stdin=subprocess.PIPE)
    read_until(dest.stderr, "waiting for a guest")
    src = cli_popen("run", guest(name), "--vcpus", 2, "--cmdline", cmdline, "--control", sock)
    read_until(src.stdout, milestone)
    r = cli("migrate", "--control", sock, address, timeout=MARGIN)
    assert r.returncode == 0, r.stdout + r.stderr
    assert src.wait(MARGIN) == 0
    out, err = dest.communicate(GO, timeout=MARGIN)
    assert dest.returncode == 0, out[-2000:] + err[-2000:]
    assert "go after" in out and verdict in out, out[-2000:]


# --- post-copy --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tcp"])      # over a Unix socket: the Linux boot's
def test_post_copy_runs_the_guest_on_faulted_pages_then_takes_the_rest(
        machine_factory, tmp_path, kind, monkeypatch):
    """`--postcopy`: the guest runs at the destination right after pass 0; the pages it
    dirtied since are fetched as it touches them (the source pushes nothing until it has
    answered 40 faults: a handshake, so the guest surely runs on faulted pages) and the
    rest pushed after; it verifies every page to its end."""
    from migrate.postcopy import PUSH_AFTER_ENV
    from migrate.precopy import live_save
    monkeypatch.setenv(PUSH_AFTER_ENV, "40")
    address = (f"unix:{tmp_path / 'mig.sock'}" if kind == "unix"
               else f"tcp:127.0.0.1:{_free_port()}")
    t, out = _destination(address)
    m = start_dirty(machine_factory, pages=900, passes=40, oninput=True)
    report = live_save(m, address, format="migrate", then="stop", postcopy="now")
    t.join(MARGIN)
    assert "error" not in out, out.get("error")
    assert out["exit"] == 0 and out["postcopy_done"], out["console"][-2000:]
    assert_verified(out["console"], 900, 40, oninput=True)
    assert "post-copy after pass 0" in report.stop_reason
    assert report.postcopy["answered"] >= 40 and out["postcopy"]["remote_faults"] >= 40
    assert report.postcopy["pushed"] + report.postcopy["answered"] >= report.passes[-1].pages_dirty


@pytest.mark.parametrize("postcopy", ["off", "now"])
def test_the_destinations_memory_is_the_paused_sources(machine_factory, tmp_path, postcopy):
    """Every block (RAM and a disk overlay's device memory) at the destination, before
    its guest runs, equals the source's as it stopped: pre-copy, and post-copy, read
    first while nothing is pushed (every remote page this process touches is fetched by
    the pager as a fault, a zero page mapped as zeros), then again once the push is
    over."""
    import hashlib

    import numpy as np

    from kvmguest.devices.virtio import DeviceSpec
    from kvmguest.front.control import listen_for_migration
    from migrate.live import restore_incoming
    from migrate.precopy import live_save
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 4096 * 4)
    address = f"unix:{tmp_path / 'mig.sock'}"
    server = listen_for_migration(address)
    got: dict = {}

    def destination():
        try:
            got["m"], _ = restore_incoming(server)
        except Exception as err:              # noqa: BLE001 (handed to the test)
            got["error"] = err
        finally:
            server.close()
    t = threading.Thread(target=destination)
    t.start()
    # 64 MiB: the post-copy variant reads every page of it through the pager
    m = start_dirty(machine_factory, memory=64 << 20, pages=900, passes=40, base=32 << 20,
                    machine={"virtio": [DeviceSpec("blk", {"path": str(disk),
                                                           "overlay": True})]})
    m.memory.device_write(m.memory.device_regions[0], 4096 * 3, b"overlay!" * 512)
    # A post-copy source returns once the destination has every page: it runs aside.
    source = threading.Thread(target=live_save, args=(m, address),
                              kwargs={"format": "migrate", "then": "stop",
                                      "postcopy": postcopy})
    source.start()
    t.join(MARGIN)
    assert "error" not in got, got.get("error")
    dest = got["m"]
    try:
        assert (dest.postcopy is not None) == (postcopy == "now")
        if dest.postcopy is None:
            source.join(MARGIN)
        before = {r.slot: r for r in m.memory.saved_regions}
        for r in dest.memory.saved_regions:   # post-copy: each page read is a fault served
            # hashlib lets go of the GIL as it reads: the source, in this process too,
            # can answer the faults meanwhile
            assert hashlib.sha256(r.map).digest() == \
                hashlib.sha256(before[r.slot].map).digest(), r.name
        if dest.postcopy is not None:
            dest.postcopy.go()             # what the vCPUs' start does: take the push
            assert dest.postcopy.done.wait(MARGIN)
            source.join(MARGIN)
            assert dest.postcopy.stats["remote_faults"] > 0    # the reads were faults
            for r in dest.memory.saved_regions:
                assert np.array_equal(r.array, before[r.slot].array), r.name
        assert not source.is_alive() and not m.running
    finally:
        dest.close()


def _postcopy_pair(tmp_path, hold: str):
    """A dirty guest moved with `migrate --postcopy` between two processes, the source
    pushing nothing until it answered ``hold`` faults: (source, destination, the
    migrate command, the destination's console so far)."""
    import os

    from helpers import cli_popen, guest, read_until
    from migrate.postcopy import PUSH_AFTER_ENV
    sock, address = tmp_path / "ctl.sock", f"unix:{tmp_path / 'mig.sock'}"
    dest = cli_popen("restore", "--incoming", address)
    read_until(dest.stderr, "waiting for a guest")
    src = cli_popen("run", guest("dirty"), "--memory", "256M", "--cmdline",
                    "pages=2000 passes=100000", "--control", sock,
                    env={**os.environ, PUSH_AFTER_ENV: hold})
    read_until(src.stdout, "dirty: pass 16 ok")
    mig = cli_popen("migrate", "--control", sock, address, "--postcopy")
    seen = read_until(dest.stdout, "dirty: pass")        # the guest runs there, on faults
    return src, dest, mig, seen


def test_a_source_killed_in_post_copy_ends_the_destination_with_the_guest_lost(tmp_path):
    """The source SIGKILLed while the destination's guest runs on pages it fetches: the
    destination says the guest is lost, in one line, and exits 125 (the pages it never
    got are nowhere); it does not run on with zeros."""
    import signal

    src, dest, mig, _ = _postcopy_pair(tmp_path, "1000000000")
    src.send_signal(signal.SIGKILL)
    src.wait(MARGIN)
    assert dest.wait(MARGIN) == 125
    err = dest.stderr.read()
    assert "the guest is lost: post-copy broke off" in err and "Traceback" not in err, err
    mig.wait(MARGIN)


def test_a_destination_killed_in_post_copy_ends_the_source_with_the_guest_lost(tmp_path):
    """The destination SIGKILLed after it acknowledged (its guest ran there): the source
    cannot resume a guest that ran on elsewhere; it and `kvmguest migrate` say the guest
    is lost and exit 125."""
    import signal

    src, dest, mig, _ = _postcopy_pair(tmp_path, "1000000000")
    dest.send_signal(signal.SIGKILL)
    dest.wait(MARGIN)
    assert mig.wait(MARGIN) == 125, mig.stderr.read()
    assert "went away during post-copy" in mig.stderr.read()
    assert src.wait(MARGIN) == 125
    assert "the guest is lost" in src.stderr.read()


# --- local mode -------------------------------------------------------------------------
def test_a_local_migration_hands_the_ram_over_and_sends_no_page_of_it(machine_factory,
                                                                        tmp_path):
    """A guest with shared memory (memfds) moved to a process on this host: its RAM is
    passed over the Unix socket (SCM_RIGHTS), not one page of it is sent, and it verifies
    every page there; a guest without shared memory is refused in one line and runs on."""
    from migrate.errors import SaveError
    from migrate.precopy import live_save
    address = f"unix:{tmp_path / 'mig.sock'}"
    m = start_dirty(machine_factory, pages=300, passes=0)
    with pytest.raises(SaveError, match="run the guest with --shared-memory"):
        live_save(m, address, format="migrate", then="stop", local=True)
    assert m.running
    t, out = _destination(address)
    m = start_dirty(machine_factory, pages=900, passes=40, oninput=True,
                    machine={"shared_memory": True})
    report = live_save(m, address, format="migrate", then="stop", local=True)
    t.join(MARGIN)
    assert "error" not in out, out.get("error")
    assert out["exit"] == 0, out["console"][-2000:]
    assert_verified(out["console"], 900, 40, oninput=True)
    assert sum(p.pages_written for p in report.passes) == 0, report.summary()


def test_two_processes_move_a_guest_locally_from_the_command_line(tmp_path):
    """`run --shared-memory` and `migrate --local`: the destination process maps the
    source's memory; the source exits 0, the destination verifies every page."""
    import subprocess

    from helpers import cli, cli_popen, guest, read_until
    sock, address = tmp_path / "ctl.sock", f"unix:{tmp_path / 'mig.sock'}"
    dest = cli_popen("restore", "--incoming", address, "--console-input",
                     stdin=subprocess.PIPE)
    read_until(dest.stderr, "waiting for a guest")
    src = cli_popen("run", guest("dirty"), "--memory", "256M", "--shared-memory", "--cmdline",
                    "pages=600 passes=40 quiet oninput", "--control", sock)
    read_until(src.stdout, "dirty: pass 16 ok")
    r = cli("migrate", "--control", sock, address, "--local", timeout=MARGIN)
    assert r.returncode == 0 and "0.0 MiB sent" in r.stdout, r.stdout + r.stderr
    assert src.wait(MARGIN) == 0, src.stderr.read()
    out, err = dest.communicate(GO, timeout=MARGIN)
    assert dest.returncode == 0, err[-2000:]
    assert_verified(out, 600, 40, oninput=True)
