"""--threads: a migration's pre-copy passes spread over several connections (page
channels), as QEMU's multifd does. The source hands each batch of page records to the
next channel's sender thread; every channel ends each pass with a KIND_PASS_END record,
and the destination's readers meet at a barrier there, so that no copy of a page from a
later pass is written before every copy from an earlier one (the last copy wins)."""

from __future__ import annotations

import mmap
import queue
import socket
import struct
import threading

from kvmguest.memory import PAGE_SIZE as PAGE

from migrate.errors import SaveError
from migrate.formats.stream import (KIND_END, KIND_PAGE, KIND_PASS_END, KIND_ZERO,
                                    KIND_ZERO_RUN, RECORD)
from migrate.wire import MigrationError, recv_exact, sendall

_FLUSH = object()


class Senders:
    """The source's page channels (the main connection first), a thread each."""

    def __init__(self, socks: list[socket.socket], address: str):
        self.socks, self.address = socks, address
        self.queues = [queue.Queue(maxsize=4) for _ in socks]
        self.error: BaseException | None = None
        self.next = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                         name=f"page channel {i}") for i in range(len(socks))]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        q, sock = self.queues[i], self.socks[i]
        while True:
            bufs = q.get()
            try:
                if bufs is None:
                    return
                if bufs is not _FLUSH and self.error is None:
                    sendall(sock, bufs)
            except OSError as err:
                self.error = err
            finally:
                q.task_done()

    def _check(self) -> None:
        if self.error is not None:
            raise SaveError(f"the destination {self.address} went away: "
                            f"{getattr(self.error, 'strerror', None) or self.error}")

    def send(self, bufs) -> None:
        self._check()
        self.queues[self.next].put(bufs)
        self.next = (self.next + 1) % len(self.queues)

    def end_pass(self, marker: bytes) -> None:
        """Every channel's share of the pass sent, then its KIND_PASS_END."""
        for q in self.queues:
            q.put([marker])
        for q in self.queues:
            q.join()
        self._check()

    def end(self, record: bytes) -> None:
        """The end record on every page channel past the main connection."""
        for q in self.queues[1:]:
            q.put([record])
        for q in self.queues:
            q.join()
        self._check()

    def close(self) -> None:
        for q in self.queues:
            q.put(None)
        for t in self.threads:
            t.join(5)
        for sock in self.socks[1:]:
            sock.close()


def accept_channels(server: socket.socket, count: int, token: bytes, tls, hello: bytes,
                    timeout: float) -> list[socket.socket]:
    """The source's ``count`` page channels, each checked by the token and its number."""
    socks: list[socket.socket] = []
    try:
        server.settimeout(timeout)
        for i in range(1, count + 1):
            conn, _ = server.accept()
            conn.settimeout(timeout)
            socks.append(conn)
            if tls is not None:
                socks[-1] = conn = tls.server(conn)
            if recv_exact(conn, len(hello) + len(token) + 4) != \
                    hello + token + struct.pack("<I", i):
                raise MigrationError(f"page channel {i} is not this migration's")
    except (OSError, EOFError) as err:
        for sock in socks:
            sock.close()
        raise MigrationError(f"page channel {len(socks)} did not open: {err}") from None
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


PAGE_KINDS = (KIND_PAGE, KIND_ZERO, KIND_ZERO_RUN)


def page_record(sock, kind: int, bi: int, index: int, blocks, regions) -> int:
    """The rest of a page record (one of PAGE_KINDS, its header read) taken into guest
    memory, checked against ``blocks``: a page read straight into its place, zero pages
    dropped (an anonymous page reads as zeros, nothing stays resident). Returns the pages
    read. The main connection's loop (migrate/live.py) and each page channel's use it."""
    count = struct.unpack("<Q", recv_exact(sock, 8))[0] if kind == KIND_ZERO_RUN else 1
    if bi >= len(blocks) or index >= blocks[bi].npages or count > blocks[bi].npages - index:
        raise MigrationError(f"a record for page {index} of block {bi} is out of range")
    r = regions[bi]
    if kind == KIND_PAGE:
        recv_exact(sock, PAGE, into=r.array[index * PAGE:(index + 1) * PAGE])
        return 1
    r.map.madvise(mmap.MADV_DONTNEED, index * PAGE, count * PAGE)
    return 0


class Readers:
    """The destination's page channels past the main connection: a thread each, writing
    pages straight into guest memory; every pass ends at a barrier with the main loop."""

    def __init__(self, socks, regions, blocks):
        self.socks, self.regions, self.blocks = socks, regions, blocks
        self.barrier = threading.Barrier(len(socks) + 1)
        self.error: str | None = None
        self.pages = 0
        self.threads = [threading.Thread(target=self._run, args=(s,), daemon=True,
                                         name="page channel") for s in socks]
        for t in self.threads:
            t.start()

    def _run(self, sock) -> None:
        try:
            while True:
                kind, bi, index = RECORD.unpack(recv_exact(sock, RECORD.size))
                if kind == KIND_PASS_END:
                    self.barrier.wait()
                    continue
                if kind == KIND_END:
                    return
                if kind not in PAGE_KINDS:
                    raise MigrationError(f"record kind {kind} on a page channel")
                self.pages += page_record(sock, kind, bi, index, self.blocks, self.regions)
        except (OSError, EOFError, MigrationError, threading.BrokenBarrierError) as err:
            self.error = self.error or str(err) or type(err).__name__
            self.barrier.abort()

    def end_pass(self, timeout: float) -> None:
        """The main loop's KIND_PASS_END: wait for every channel's."""
        try:
            self.barrier.wait(timeout)
        except threading.BrokenBarrierError:
            raise MigrationError(f"a page channel broke off: {self.error or 'stalled'}") \
                from None

    def finish(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)
        if self.error is not None or any(t.is_alive() for t in self.threads):
            raise MigrationError(f"a page channel broke off: {self.error or 'no end record'}")

    def close(self) -> None:
        self.barrier.abort()
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
