"""Live migration over a socket (pre-copy): the source's live save writes the stream
format's records (migrate/formats/stream.py) to a connection instead of a file, and the
destination reads them straight into guest memory; docs/migration.md has the protocol.

The source stays paused, and resumable, until the destination acknowledges that it has
the guest: a destination that refuses, dies or cannot be reached before that leaves the
guest running on the source (live_save's failure path resumes it). The destination takes
one migration and closes; every record is checked as it arrives (block and page in range,
the state within its bound and decoded), so a broken or hostile stream costs at most the
guest memory its (checked) block list names and ends in one SnapshotError.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import time
import zlib


from kvmguest.memory import PAGE_SIZE as PAGE
from kvmguest.memory import GuestMemory, Region, RegionSpec
from kvmguest.state import MachineState, StateError

from migrate import format as fmt
from kvmguest.errors import EXIT_BAD_INPUT

from migrate.errors import SaveError
from migrate.format import SnapshotError
from migrate.formats.stream import (HEAD, KIND_END, KIND_PAGE, KIND_STATE, KIND_ZERO, MAGIC,
                                    MAX_BLOCK_LIST, RECORD, VERSION, parse_blocks,
                                    pass_records)
from migrate.pageio import fault_point
from migrate.writer import PassStats

GREETING = b"KVMGMIG1\n"                    # the destination speaks first (after TLS)
ACK, REFUSED = b"KVMGACK\n", b"KVMGNAK\n"     # the destination's answer, then a reason
ACK_TIMEOUT = 600.0          # seconds the source waits for the answer (a restore's checks)
STALL = 60.0                 # seconds without a byte before a peer counts as gone


class MigrationError(SnapshotError):
    """A migration that could not be received (exit 2, one line)."""


class AddressError(SaveError):
    """A migration address or TLS file that cannot be used (exit 2, one line)."""

    exit_code = EXIT_BAD_INPUT


class Tls:
    """Mutual TLS for a migration over TCP (the standard library's ``ssl``): this side's
    certificate and key, and the CA the peer's certificate must be signed by."""

    def __init__(self, cert: str, key: str, ca: str):
        import ssl
        self.ssl = ssl
        self.cert, self.key, self.ca = cert, key, ca
        for what, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
            if not path or not os.path.isfile(path):
                raise AddressError(f"{what} {path}: not a readable file")

    def _context(self, server: bool):
        ssl = self.ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
            ctx.load_verify_locations(self.ca)
        except (OSError, ssl.SSLError) as err:
            raise AddressError(f"TLS: cannot load the certificate, key or CA: {err}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED            # both ways: mutual
        return ctx

    def client(self, sock: socket.socket, host: str):
        try:
            return self._context(False).wrap_socket(sock, server_hostname=host)
        except (OSError, self.ssl.SSLError) as err:
            sock.close()
            raise SaveError(f"TLS with the destination failed: {err}") from None

    def server(self, sock: socket.socket):
        try:
            return self._context(True).wrap_socket(sock, server_side=True)
        except (OSError, self.ssl.SSLError) as err:
            sock.close()
            raise MigrationError(f"TLS with the source failed: {err}") from None


def parse_address(text: str, tls: bool = False) -> tuple:
    """``unix:PATH`` -> ("unix", PATH); ``tcp:HOST:PORT`` -> ("tcp", HOST, PORT). TCP
    beyond loopback only with TLS (``tls``) (docs/migration.md)."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return ("unix", rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 <= int(port) < 65536:
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = host == "localhost"
            if not loopback and not tls:
                raise AddressError(f"migration address {text}: TCP beyond loopback needs TLS "
                                "(--tls-cert, --tls-key and --tls-ca, on both sides)")
            return ("tcp", host, int(port))
    raise AddressError(f"migration address {text!r}: want unix:PATH or tcp:HOST:PORT")


def _sendall(sock: socket.socket, bufs) -> None:
    if not hasattr(sock, "sendmsg") or getattr(sock, "context", None) is not None:
        sock.sendall(b"".join(memoryview(b).cast("B") for b in bufs))   # TLS: no sendmsg
        return
    bufs = [memoryview(b).cast("B") for b in bufs]
    while bufs:
        n = sock.sendmsg(bufs[:512])
        while n:
            if n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            else:
                bufs[0] = bufs[0][n:]
                n = 0


class SocketWriter:
    """The source's half: a live save's writer (write_pass, settle, finish, abort) whose
    records go to the destination at ``address``."""

    def __init__(self, address: str, memory, cancel=None, tls: Tls | None = None):
        self.address, self.path = address, address
        self.cancel = cancel
        self.on_progress = None
        self.regions = list(memory.saved_regions)
        self.passes: list[PassStats] = []
        self.sock = None
        where = parse_address(address, tls is not None)
        try:
            if where[0] == "unix":
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(STALL)
                self.sock.connect(where[1])
            else:
                self.sock = socket.create_connection(where[1:], timeout=STALL)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if tls is not None:
                    self.sock = tls.client(self.sock, where[1])
        except OSError as err:
            raise SaveError(f"cannot reach the destination {address}: "
                            f"{err.strerror or err}") from None
        try:           # with TLS 1.3 a refused certificate shows here, not in the handshake
            greeting = _recv_exact(self.sock, len(GREETING))
        except (OSError, EOFError) as err:
            self.close()
            if tls is not None:
                raise SaveError(f"TLS with the destination failed: it did not accept this "
                                f"side's certificate ({err})") from None
            raise SaveError(f"the destination {address} did not greet: {err}") from None
        if greeting != GREETING:
            self.close()
            raise SaveError(f"{address} is not a kvmguest waiting for a migration")
        blocks = json.dumps([{"name": r.name, "gpa": r.gpa, "size": r.size, "slot": r.slot}
                             for r in self.regions]).encode()
        self._send([HEAD.pack(MAGIC, VERSION, len(self.regions), b"\0" * 48),
                    struct.pack("<I", len(blocks)), blocks])

    def _send(self, bufs) -> None:
        try:
            _sendall(self.sock, bufs)
        except OSError as err:
            raise SaveError(f"the destination {self.address} went away: "
                            f"{err.strerror or err}") from None

    def settle(self) -> None:
        pass

    def write_pass(self, dirty) -> PassStats:
        stats = PassStats(len(self.passes))
        t = time.perf_counter()
        for bufs in pass_records(self.regions, dirty, stats):
            if self.cancel is not None and self.cancel.is_set():
                raise SaveError("migration cancelled; the guest runs on here")
            if bufs:
                self._send(bufs)
                fault_point("pass0" if stats.index == 0 else "midpass")
        stats.bytes_written = stats.pages_written * PAGE
        stats.seconds = time.perf_counter() - t
        self.passes.append(stats)
        return stats

    def finish(self, state: dict) -> None:
        """The state and the end record, then the destination's answer: SaveError unless
        it acknowledges (the caller then resumes the guest here)."""
        data = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
        self._send([RECORD.pack(KIND_STATE, 0, 0), struct.pack("<QI", len(data),
                    zlib.crc32(data)), data, RECORD.pack(KIND_END, 0, 0)])
        self.sock.settimeout(ACK_TIMEOUT)
        try:
            answer = _recv_exact(self.sock, len(ACK))
            if answer == REFUSED:
                why = self.sock.recv(4096).decode(errors="replace").strip()
                raise SaveError(f"the destination refused the guest: {why or 'no reason'}; "
                                "it runs on here")
            if answer != ACK:
                raise SaveError("the destination answered nonsense; the guest runs on here")
        except (OSError, EOFError) as err:
            raise SaveError(f"the destination {self.address} did not acknowledge "
                            f"({getattr(err, 'strerror', None) or err or 'closed'}); "
                            "the guest runs on here") from None
        finally:
            self.close()

    def abort(self) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _recv_exact(sock: socket.socket, n: int, into=None) -> bytes:
    buf = into if into is not None else bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("the source closed the connection mid-stream")
        got += k
    return bytes(buf) if into is None else b""


def receive(server: socket.socket, tls: Tls | None = None
            ) -> tuple[MachineState, GuestMemory, socket.socket, int]:
    """Take one migration from ``server``: (state, memory, the connection to answer on
    with acknowledge() or refuse(), the page records taken). MigrationError on a broken
    or hostile stream."""
    conn, _ = server.accept()
    conn.settimeout(STALL)
    if tls is not None:
        conn = tls.server(conn)
    memory = None
    try:
        conn.sendall(GREETING)
        magic, version, nblocks, _ = HEAD.unpack(_recv_exact(conn, HEAD.size))
        if magic != MAGIC:
            raise MigrationError("not a kvmguest migration (bad magic)")
        if version != VERSION:
            raise MigrationError(f"migration stream version {version}; this kvmguest takes "
                                 f"version {VERSION}")
        (blen,) = struct.unpack("<I", _recv_exact(conn, 4))
        if blen > MAX_BLOCK_LIST:
            raise MigrationError(f"a block list of {blen} bytes is too large")
        blocks = parse_blocks(_recv_exact(conn, blen), nblocks)
        memory = GuestMemory([Region(RegionSpec(b.slot, b.gpa, b.size, b.name))
                              for b in blocks])
        regions = [memory.region_of_slot(b.slot) for b in blocks]
        state, received, pages = None, 0, 0
        while True:
            kind, bi, index = RECORD.unpack(_recv_exact(conn, RECORD.size))
            if kind in (KIND_PAGE, KIND_ZERO):
                received += 1
                if received == 256:
                    fault_point("incoming-pages")         # crash tests: mid-stream
                if bi >= nblocks or index >= blocks[bi].npages:
                    raise MigrationError(f"a record for page {index} of block {bi} is out of "
                                         "range")
                page = regions[bi].array[index * PAGE:(index + 1) * PAGE]
                if kind == KIND_PAGE:
                    _recv_exact(conn, PAGE, into=page)
                    pages += 1
                else:
                    page[:] = 0
            elif kind == KIND_STATE:
                if state is not None:
                    raise MigrationError("two state records")
                length, crc = struct.unpack("<QI", _recv_exact(conn, 12))
                if length > fmt.MAX_STATE:
                    raise MigrationError(f"a state of {length} bytes exceeds {fmt.MAX_STATE}")
                data = _recv_exact(conn, length)
                if zlib.crc32(data) != crc:
                    raise MigrationError("the state's checksum does not match")
                state = fmt.parse_json(data, "migration state")
                if not isinstance(state, dict):
                    raise MigrationError("the state is not kvmguest state")
            elif kind == KIND_END:
                break
            else:
                raise MigrationError(f"unknown record kind {kind}")
        if state is None:
            raise MigrationError("the stream ended without the guest's state")
        try:
            decoded = MachineState.from_json(state)
        except StateError as err:
            raise MigrationError(f"state: {err}") from None
        return decoded, memory, conn, pages
    except (OSError, EOFError, socket.timeout) as err:
        if memory is not None:
            memory.close()
        conn.close()
        raise MigrationError(f"the migration broke off: {getattr(err, 'strerror', None) or err}"
                             ) from None
    except BaseException:
        if memory is not None:
            memory.close()
        conn.close()
        raise


def restore_incoming(server: socket.socket, *, stream=None, console_capacity: int = 1 << 20,
                     disks: dict[str, str] | None = None, tls: Tls | None = None):
    """`restore --incoming`: one migration taken from ``server`` (a listening socket:
    kvmguest.front.control.listen_for_migration), checked whole, made a paused-at-start
    Machine, then acknowledged (the source stops its copy). A machine that cannot be made
    is refused, with the reason, and the source runs its guest on."""
    from kvmguest.machine import Machine, open_kvm
    from migrate.reader import RestoreReport
    kvm = open_kvm()
    try:
        t = time.perf_counter()
        saved, memory, conn, pages = receive(server, tls)
        try:
            machine = Machine.from_state(saved, memory, kvm=kvm, own_kvm=True, stream=stream,
                                         console_capacity=console_capacity, disks=disks)
        except BaseException as err:
            memory.close()
            refuse(conn, str(err) or type(err).__name__)
            if isinstance(err, (StateError, ValueError)):
                raise MigrationError(f"state cannot be applied: {err}") from None
            raise
        try:
            acknowledge(conn)
        except OSError as err:
            machine.close()
            raise MigrationError(f"the source went away before it was told the guest is "
                                 f"here ({err.strerror}); it runs the guest on") from None
    except BaseException:
        kvm.close()
        raise
    return machine, RestoreReport("(migration)", False, pages, pages * PAGE,
                                  time.perf_counter() - t)


def acknowledge(conn: socket.socket) -> None:
    """Tell the source the guest is here (it stops its copy); raises OSError if the
    source is gone (the caller must not run the guest then: the source runs it on)."""
    conn.sendall(ACK)
    conn.close()


def refuse(conn: socket.socket, why: str) -> None:
    try:
        conn.sendall(REFUSED + why.encode(errors="replace")[:4000] + b"\n")
    except OSError:
        pass
    conn.close()


__all__ = ["MigrationError", "SocketWriter", "Tls", "acknowledge", "parse_address", "receive",
           "refuse", "restore_incoming"]
