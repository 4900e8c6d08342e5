"""What both ends of a migration speak with (migrate/live.py, migrate/postcopy.py): whole
reads and writes on a socket, mutual TLS, and the errors a connection ends in."""

from __future__ import annotations

import os
import socket
import struct

from kvmguest.errors import EXIT_BAD_INPUT

from migrate.errors import SaveError
from migrate.format import SnapshotError


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


def sendall(sock: socket.socket, bufs) -> None:
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


def recv_exact(sock: socket.socket, n: int, into=None) -> bytes:
    buf = into if into is not None else bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("the other side closed the connection mid-stream")
        got += k
    return bytes(buf) if into is None else b""


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """``data`` with ``fds`` passed along (SCM_RIGHTS) on a Unix socket."""
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           struct.pack(f"{len(fds)}i", *fds))])


def recv_with_fds(sock: socket.socket, n: int, max_fds: int) -> tuple[bytes, list[int]]:
    """``n`` bytes and the file descriptors passed with their first one (at most
    ``max_fds``); on failure those descriptors are closed."""
    data, anc, _, _ = sock.recvmsg(n, socket.CMSG_SPACE(4 * max_fds))
    fds: list[int] = []
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(raw) // 4}i", raw[:len(raw) // 4 * 4])
    try:
        if not data:
            raise EOFError("the other side closed the connection mid-stream")
        if len(data) < n:
            data += recv_exact(sock, n - len(data))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return data, fds
