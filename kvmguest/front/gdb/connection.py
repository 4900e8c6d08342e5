"""The gdb stub's side of the socket: where it listens (a loopback port or a private Unix
socket), who may connect (only this user: SO_PEERCRED, or the owner of a loopback TCP
peer in /proc/net/tcp), and one client's connection (packets in and out through
``wire``, acks, a bound on what a client can make the stub hold or wait for)."""

from __future__ import annotations

import select
import socket
import struct
from collections import deque

from kvmguest.errors import KvmguestError, UsageError
from kvmguest.front.control import bind_private_socket
from kvmguest.front.gdb import wire

SEND_TIMEOUT = 10.0             # a gdb that takes no reply for this long is dropped
LOOPBACK = ("localhost", "127.0.0.1", "::1", "ip6-localhost")


class GdbError(KvmguestError):
    """The gdb socket could not be set up."""


def parse_address(spec: str):
    """``[HOST:]PORT`` (HOST a loopback name) -> ("tcp", host, port); anything with a
    slash, or not a port, -> ("unix", path)."""
    host, _, port = spec.rpartition(":")
    if port.isdigit() and "/" not in spec:
        n = int(port)
        if not 0 <= n < 65536:
            raise UsageError(f"--gdb port {n} is out of range (0-65535; 0: any free port)")
        host = host.strip("[]") or "127.0.0.1"
        if host not in LOOPBACK:
            raise UsageError(f"--gdb listens on this machine only (localhost, 127.0.0.1 or "
                             f"::1), not {host!r}: the stub gives full control of the guest")
        return "tcp", host, n
    return "unix", spec


def listen(spec: str) -> tuple[socket.socket, str, str | None]:
    """The listening socket for ``spec``, how to reach it (as gdb's ``target remote``
    takes it) and its path when it is a Unix socket. A Unix socket is private to this user (mode 0600; the control socket's
    rules: a stale one is replaced, one in use is not)."""
    kind, *where = parse_address(spec)
    if kind == "unix":
        sock, path = bind_private_socket(where[0], "gdb socket")
        return sock, path, path
    host, port = where
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise GdbError(f"cannot listen for gdb on {host}:{port}: {err.strerror}") from None
    sock.listen(1)
    return sock, f"{host}:{sock.getsockname()[1]}", None


# --- the connection ------------------------------------------------------------------
def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of an accepted connection: the
    kernel's word for a Unix socket (SO_PEERCRED); for loopback TCP, the owner of the
    peer's socket in /proc/net/tcp (or tcp6). None when it cannot be told."""
    if sock.family == socket.AF_UNIX:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", cred)[1]
    try:
        peer, local = sock.getpeername(), sock.getsockname()
    except OSError:
        return None
    table = "/proc/net/tcp6" if sock.family == socket.AF_INET6 else "/proc/net/tcp"
    want = (_proc_address(sock.family, peer), _proc_address(sock.family, local))
    try:
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if (fields[1].upper(), fields[2].upper()) == want:
                    return int(fields[7])
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return None


def _proc_address(family: int, address) -> str:
    """``(host, port)`` as /proc/net/tcp writes it: the address's 32-bit words each in
    host byte order, in hex, then the port."""
    raw = socket.inet_pton(family, address[0])
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{w:08X}" for w in words) + f":{address[1]:04X}"


class Connection:
    """One gdb client: packets in and out, acks until gdb turns them off. A client that
    sends a packet longer than PacketSize, or takes no reply for SEND_TIMEOUT seconds, is
    dropped (``why`` says which)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.acks = sock, True
        self.decoder, self.events = wire.Decoder(), deque()
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(SEND_TIMEOUT)      # bounds sends; reads wait in select first
        self._last = b""
        self.why: str | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return self.why is None        # an idle gdb: wait on
        except OSError:
            data = b""
        if not data:
            return False
        try:
            self.events.extend(self.decoder.feed(data))
        except wire.PacketTooLong as err:
            self.drop(f"gdb sent {err}")
            return False
        return True

    def read(self, block: bool = True):
        """The next packet's payload (bytes), "interrupt" for Ctrl-C, None when gdb has
        gone (or was dropped); with ``block`` False, "" when nothing complete has
        arrived yet."""
        while True:
            while self.events:
                ev = self.events.popleft()
                if ev == wire.INTERRUPT:
                    return "interrupt"
                if ev == wire.RESEND:
                    if self._last:
                        self._sendall(self._last)
                    continue
                if self.acks:
                    self._sendall(b"+" if ev.good else b"-")
                if ev.good:
                    return ev.payload
            if self.why is not None:
                return None
            if not block and not select.select([self.sock], [], [], 0)[0]:
                return ""
            if not self._fill():
                return None

    def send(self, payload: bytes | str) -> None:
        if isinstance(payload, str):
            payload = payload.encode()
        packet = wire.frame(payload)
        self._last = packet if self.acks else b""
        self._sendall(packet)

    def _sendall(self, data: bytes) -> None:
        if self.why is not None:
            return
        try:
            self.sock.sendall(data)
        except TimeoutError:
            self.drop(f"gdb took no reply for {SEND_TIMEOUT:g} s")
        except OSError:
            pass            # gdb has gone; what it sent last still counts (k)

    def console(self, text: str) -> None:
        """Text for gdb's console (an 'O' packet: while the target runs, or in a monitor
        command's answer)."""
        self.send(b"O" + text.encode().hex().encode())

    def drop(self, why: str) -> None:
        """End the connection from any thread: a read waiting on it returns None."""
        if self.why is None:
            self.why = why
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
