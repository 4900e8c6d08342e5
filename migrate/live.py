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
import threading
import time
import zlib
from dataclasses import dataclass

from kvmguest.memory import PAGE_SIZE as PAGE
from kvmguest.memory import GuestMemory, Region, RegionSpec
from kvmguest.state import MachineState, StateError

from migrate import format as fmt
from kvmguest.errors import EXIT_GUEST_LOST

from migrate.errors import SaveError
from migrate.format import SnapshotError
from migrate.channels import PAGE_KINDS, Readers, Senders, accept_channels, page_record
from migrate.formats.stream import (HEAD, KIND_END, KIND_MEMFD, KIND_PASS_END, KIND_POSTCOPY,
                                    KIND_SHAPE, KIND_STATE, MAGIC, MAX_BLOCK_LIST, RECORD,
                                    blob_record, json_record, parse_blocks, pass_records)
from migrate.pageio import fault_point
from migrate.wire import (AddressError, MigrationError, Tls, recv_exact, recv_with_fds,
                          send_with_fds, sendall)
from migrate.writer import PassStats

GREETING = b"KVMGMIG2\n"    # the destination speaks first (after TLS), then a 16-byte token
TOKEN = 16
VERSION = 2                 # the migration protocol's version (its header's version field)
ACK, REFUSED = b"KVMGACK\n", b"KVMGNAK\n"     # the destination's answer, then a reason
FINISHED = b"KVMGFIN\n"     # post-copy: the destination has every page
POSTCOPY_MODES = ("auto", "now", "off")   # when the source may switch to post-copy
PAGE_HELLO = b"KVMGPAG1"    # a page channel (--threads): this, the token, its u32 number
MAX_CHANNELS = 16
ACK_TIMEOUT = 600.0          # seconds the source waits for the answer (a restore's checks)
STALL = 60.0                 # seconds without a byte before a peer counts as gone


class GuestLost(SaveError):
    """Post-copy broke off: neither side has the whole guest any more (docs/migration.md)."""

    exit_code = EXIT_GUEST_LOST


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


def _pushing(pusher, result: dict) -> None:
    """The push, in a thread that yields to the one answering faults: ``result`` gets
    the pages pushed, or the error."""
    from migrate.postcopy import background
    background()
    try:
        result["pages"] = pusher.push()
    except (OSError, EOFError) as err:
        result["error"] = err


class SocketWriter:
    """The source's half: a live save's writer (write_pass, settle, finish, abort) whose
    records go to the destination at ``address``; ``shape`` (kvmguest.state.machine_shape)
    goes first, so the destination makes the machine during pre-copy. ``postcopy``: "now"
    (switch after pass 0), "auto" (switch when pre-copy does not converge) or "off"."""

    def __init__(self, address: str, memory, cancel=None, tls: Tls | None = None,
                 shape: dict | None = None, postcopy: str = "auto", local: bool = False,
                 channels: int = 1):
        self.address, self.path = address, address
        self.cancel = cancel
        self.on_progress = None
        self.regions = list(memory.saved_regions)
        self.passes: list[PassStats] = []
        self.sock = self.fault = None
        self.tls = tls
        self.deferred: dict | None = None      # post-copy: the pages still to send
        self.pusher = None                     # post-copy: migrate.postcopy.Pusher
        self.committed = False                 # the destination acknowledged: its guest now
        self.postcopy_stats: dict = {}
        self.shared_slots: set[int] = set()    # local: RAM handed over, never sent
        if local:
            if not address.startswith("unix:"):
                raise AddressError("a local migration goes to a Unix socket (unix:PATH)")
            if any(r.memfd < 0 for r in memory.regions):
                raise SaveError("a local migration hands the guest's RAM over: run the guest "
                                "with --shared-memory")
            self.shared_slots = {r.slot for r in memory.regions}
        self.sock = self._connect()
        try:           # with TLS 1.3 a refused certificate shows here, not in the handshake
            greeting = recv_exact(self.sock, len(GREETING) + TOKEN)
        except (OSError, EOFError) as err:
            self.close()
            if tls is not None:
                raise SaveError(f"TLS with the destination failed: it did not accept this "
                                f"side's certificate ({err})") from None
            raise SaveError(f"the destination {address} did not greet: {err}") from None
        if greeting[:len(GREETING)] != GREETING:
            self.close()
            raise SaveError(f"{address} is not a kvmguest waiting for a migration (or one "
                            "of another version)")
        self.token = greeting[len(GREETING):]
        blocks = json.dumps([{"name": r.name, "gpa": r.gpa, "size": r.size, "slot": r.slot}
                             for r in self.regions]).encode()
        shared = [bi for bi, r in enumerate(self.regions) if r.slot in self.shared_slots]
        self._send([HEAD.pack(MAGIC, VERSION, len(self.regions), b"\0" * 48),
                    struct.pack("<I", len(blocks)), blocks,
                    *json_record(KIND_SHAPE, {"shape": shape, "postcopy": postcopy,
                                               "local": shared, "channels": channels})])
        if shared:                  # the memfds, passed with the record's first byte
            fds = [self.regions[bi].memfd for bi in shared]
            try:
                send_with_fds(self.sock, RECORD.pack(KIND_MEMFD, len(fds), 0), fds)
            except OSError as err:
                self.close()
                raise SaveError(f"cannot hand the guest's memory over: {err.strerror}") \
                    from None
        self.page_regions = [None if r.slot in self.shared_slots else r for r in self.regions]
        self.senders = None               # --threads: the page channels' senders
        if channels > 1:
            socks = [self.sock]
            try:
                for i in range(1, channels):
                    socks.append(self._connect())
                    socks[-1].sendall(PAGE_HELLO + self.token + struct.pack("<I", i))
            except (SaveError, OSError) as err:
                for sock in socks[1:]:
                    sock.close()
                self.close()
                raise SaveError(f"cannot open page channel {len(socks)}: {err}") from None
            self.senders = Senders(socks, self.address)
        self._fault_ready = None
        if postcopy != "off":      # the fault channel, connected while pre-copy runs
            from migrate.postcopy import Pusher
            self.fault_error = None
            self._fault_ready = threading.Event()
            self.pusher = Pusher(self.regions, self.sock, None)
            threading.Thread(target=self._connect_fault, daemon=True,
                             name="post-copy faults").start()

    def _connect(self):
        where = parse_address(self.address, self.tls is not None)
        sock = None
        try:
            if where[0] == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(STALL)
                sock.connect(where[1])
            else:
                sock = socket.create_connection(where[1:], timeout=STALL)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.tls is not None:
                    sock = self.tls.client(sock, where[1])
        except OSError as err:
            if sock is not None:
                sock.close()
            raise SaveError(f"cannot reach the destination {self.address}: "
                            f"{err.strerror or err}") from None
        return sock

    def _connect_fault(self) -> None:
        """The fault channel's thread: connected during pre-copy, then serving faults
        (none come before a post-copy switch) until the channel closes."""
        from migrate.postcopy import FAULT_HELLO
        try:
            sock = self._connect()
            sock.sendall(FAULT_HELLO + self.token)
            self.fault = self.pusher.fault = sock
        except (SaveError, OSError) as err:
            self.fault_error = str(err)
            return
        finally:
            self._fault_ready.set()
        self.pusher.serve_faults()

    def can_postcopy(self) -> bool:
        if self._fault_ready is None:
            return False
        self._fault_ready.wait(STALL)
        return self.fault is not None

    def _send(self, bufs) -> None:
        try:
            sendall(self.sock, bufs)
        except OSError as err:
            why = self._refusal()
            if why:
                raise SaveError(f"the destination refused the guest: {why}; it runs on "
                                "here") from None
            raise SaveError(f"the destination {self.address} went away: "
                            f"{err.strerror or err}") from None

    def _refusal(self) -> str:
        """The reason a destination that stopped reading gave, if it gave one."""
        try:
            self.sock.settimeout(1.0)
            data = self.sock.recv(4096)
        except OSError:
            return ""
        if data.startswith(REFUSED):
            return data[len(REFUSED):].decode(errors="replace").strip() or "no reason"
        return ""

    def settle(self) -> None:
        pass

    def write_pass(self, dirty) -> PassStats:
        stats = PassStats(len(self.passes))
        t = time.perf_counter()
        send = self._send if self.senders is None else self.senders.send
        for bufs in pass_records(self.page_regions, dirty, stats, zero_runs=True):
            if self.cancel is not None and self.cancel.is_set():
                raise SaveError("migration cancelled; the guest runs on here")
            if bufs:
                send(bufs)
                fault_point("pass0" if stats.index == 0 else "midpass")
        if self.senders is not None:
            self.senders.end_pass(RECORD.pack(KIND_PASS_END, 0, 0))
        stats.bytes_written = stats.pages_written * PAGE
        stats.seconds = time.perf_counter() - t
        self.passes.append(stats)
        return stats

    def defer(self, dirty: dict) -> PassStats:
        """Post-copy: instead of the last pages, which pages are still to come (per block
        a u64 count and the u32 page indices); they follow once the destination runs the
        guest. Called before the pause (what the guest dirtied since the last pass) and
        after it (what came after that)."""
        import numpy as np
        stats = PassStats(len(self.passes))
        parts = []
        for r in self.regions:
            idx = np.asarray(dirty.get(r.slot, []), dtype="<u4")
            stats.pages_dirty += len(idx)
            parts += [struct.pack("<Q", len(idx)), idx.tobytes()]
        self._send(blob_record(KIND_POSTCOPY, b"".join(parts)))
        if self.deferred is None:
            self.deferred = {}
            self.passes.append(stats)
        else:
            self.passes[-1].pages_dirty += stats.pages_dirty
        for slot, pages in dirty.items():
            self.deferred.setdefault(slot, []).append(np.asarray(pages, dtype=np.int64))
        return stats

    def finish(self, state: dict) -> None:
        """The state and the end record, then the destination's answer: SaveError unless
        it acknowledges (the caller then resumes the guest here). After a post-copy
        switch, the remaining pages follow the acknowledgement (GuestLost if the
        destination goes away before it has them all)."""
        if self.senders is not None:
            self.senders.end(RECORD.pack(KIND_END, 0, 0))
        self._send([*json_record(KIND_STATE, state), RECORD.pack(KIND_END, 0, 0)])
        self.sock.settimeout(ACK_TIMEOUT)
        try:
            answer = recv_exact(self.sock, len(ACK))
            if answer == REFUSED:
                why = self.sock.recv(4096).decode(errors="replace").strip()
                raise SaveError(f"the destination refused the guest: {why or 'no reason'}; "
                                "it runs on here")
            if answer != ACK:
                raise SaveError("the destination answered nonsense; the guest runs on here")
        except (OSError, EOFError) as err:
            self.close()
            raise SaveError(f"the destination {self.address} did not acknowledge "
                            f"({getattr(err, 'strerror', None) or err or 'closed'}); "
                            "the guest runs on here") from None
        except BaseException:
            self.close()
            raise
        self.committed = True
        try:
            if self.deferred is not None:
                self._serve_postcopy()
        finally:
            self.close()

    def _serve_postcopy(self) -> None:
        import sys

        import numpy as np
        pusher = self.pusher
        switch = sys.getswitchinterval()
        sys.setswitchinterval(5e-5)      # a fault's answer must not wait 5 ms for the GIL
        t = time.perf_counter()
        remote = {slot: np.unique(np.concatenate(parts)) for slot, parts in self.deferred.items()}
        self.passes[-1].pages_dirty = sum(len(v) for v in remote.values())   # no page twice
        pusher.set_remote(remote)
        result: dict = {}
        push = threading.Thread(target=_pushing, args=(pusher, result),
                                name="post-copy push", daemon=True)
        try:
            push.start()
            push.join()
            if "pages" not in result:
                raise result.get("error") or EOFError("the push failed")
            self.sock.settimeout(ACK_TIMEOUT)
            if recv_exact(self.sock, len(FINISHED)) != FINISHED:
                raise EOFError("it answered nonsense")
        except (OSError, EOFError) as err:
            raise GuestLost(f"the destination {self.address} went away during post-copy "
                            f"({getattr(err, 'strerror', None) or err or 'closed'}): the "
                            "guest is lost") from None
        finally:
            sys.setswitchinterval(switch)
        with pusher.served:          # the destination closes the channel when it has all
            pusher.served.wait_for(lambda: pusher.closed, STALL)
        self.postcopy_stats = {"pushed": result["pages"], "answered": pusher.answered,
                               "seconds": time.perf_counter() - t}

    def abort(self) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "senders", None) is not None:
            self.senders.close()
            self.senders = None
        for name in ("sock", "fault"):
            sock = getattr(self, name)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)    # wakes a thread reading it
                except OSError:
                    pass
                sock.close()
                setattr(self, name, None)


@dataclass
class Incoming:
    """One migration as received (receive): the machine made from its shape during
    pre-copy and still to complete, and for post-copy the pages still to come."""
    saved: MachineState
    memory: GuestMemory
    machine: object                     # Machine.prepare_restore's
    conn: socket.socket
    pages: int
    regions: list                       # the blocks' regions, in the stream's order
    pager: object = None                # post-copy: migrate.postcopy.PagerProcess
    receiver: object = None             # post-copy (None: pre-copy completed): the
    #                                     migrate.postcopy.Receiver, not going yet

    def discard(self) -> None:
        if self.receiver is not None:
            self.receiver.cancel()
        if self.pager is not None:
            self.pager.dismiss()
        self.machine.close()            # and its memory and KVM
        self.conn.close()


def _blob(conn, bound: int, what: str) -> bytes:
    length, crc = struct.unpack("<QI", recv_exact(conn, 12))
    if length > bound:
        raise MigrationError(f"{what} of {length} bytes exceeds {bound}")
    data = recv_exact(conn, length)
    if zlib.crc32(data) != crc:
        raise MigrationError(f"the checksum of {what} does not match")
    return data


def _check_shape(obj, nblocks: int) -> tuple[dict, str, list[int], int]:
    """The shape record: (shape, post-copy mode, the blocks a local migration hands over,
    the page channels)."""
    from kvmguest.state import MAX_VCPUS
    try:
        shape, mode, local, channels = obj["shape"], obj["postcopy"], obj["local"], \
            obj["channels"]
        cpuids, irqchip, pit = shape["cpuids"], shape["irqchip"], shape["pit"]
        ok = (isinstance(cpuids, list) and 1 <= len(cpuids) <= MAX_VCPUS
              and all(isinstance(c, str) for c in cpuids) and type(irqchip) is bool
              and type(pit) is bool and mode in POSTCOPY_MODES and len(shape) == 3
              and isinstance(local, list) and all(type(b) is int for b in local)
              and sorted(set(local)) == local and all(0 <= b < nblocks for b in local)
              and not (local and mode != "off")
              and type(channels) is int and 1 <= channels <= MAX_CHANNELS)
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise MigrationError("the machine's shape does not decode")
    return shape, mode, local, channels


def _receive_memfds(conn: socket.socket, count: int) -> list[int]:
    """The KIND_MEMFD record and the memfds passed with it (a local migration)."""
    if not isinstance(conn, socket.socket) or conn.family != socket.AF_UNIX:
        raise MigrationError("memory handed over other than on a Unix socket")
    data, fds = recv_with_fds(conn, RECORD.size, count)
    kind, n, _ = RECORD.unpack(data)
    if kind != KIND_MEMFD or n != count or len(fds) != count:
        for fd in fds:
            os.close(fd)
        raise MigrationError(f"the shared memory did not follow the shape ({len(fds)} of "
                             f"{count} memfds)")
    return fds


def _remote_pages(data: bytes, blocks) -> list:
    """The post-copy record's page lists: a bool array per block (checked: in range)."""
    import numpy as np
    out, at = [], 0
    for b in blocks:
        if at + 8 > len(data):
            raise MigrationError("the post-copy page list is cut short")
        (n,) = struct.unpack_from("<Q", data, at)
        at += 8
        if n > b.npages or at + 4 * n > len(data):
            raise MigrationError("the post-copy page list does not fit its blocks")
        idx = np.frombuffer(data, "<u4", n, at)
        at += 4 * n
        if n and int(idx.max()) >= b.npages:
            raise MigrationError("the post-copy page list names a page out of range")
        bits = np.zeros(b.npages, dtype=np.bool_)
        bits[idx] = True
        out.append(bits)
    if at != len(data):
        raise MigrationError("the post-copy page list has bytes beyond its blocks")
    return out


def _memory(blocks, local: list[int], fds: list[int]) -> GuestMemory:
    """The blocks' memory: fresh, or (a local migration) the memfds handed over."""
    from kvmguest.memory import GuestMemoryError, shared_region
    given = dict(zip(local, fds))
    regions = []
    try:
        for bi, b in enumerate(blocks):
            spec = RegionSpec(b.slot, b.gpa, b.size, b.name)
            if bi in given:
                regions.append(shared_region(spec, given.pop(bi)))
            else:
                regions.append(Region(spec))
    except GuestMemoryError as err:
        for fd in given.values():
            os.close(fd)
        for r in regions:
            r.close()
        raise MigrationError(f"the memory handed over cannot be used: {err}") from None
    return GuestMemory(regions)


def receive(server: socket.socket, tls: Tls | None = None, kvm=None, pager=None) -> Incoming:
    """Take one migration from ``server``: the machine is made (Machine.prepare_restore,
    on ``kvm``, which it then owns) as soon as the shape arrives and memory is filled as
    pages arrive; answer with ACK (restore_incoming) or refuse(). MigrationError on a broken or
    hostile stream or a machine that cannot be made here. ``pager``: a PagerProcess
    started beforehand (one is started when the source may switch to post-copy)."""
    from kvmguest.machine import Machine
    from migrate.postcopy import PagerProcess, PostcopyError, Receiver
    machine = memory = receiver = readers = None
    try:
        conn, _ = server.accept()
    except BaseException:
        if pager is not None:
            pager.dismiss()
        raise
    conn.settimeout(STALL)
    token = pager.token if pager is not None else os.urandom(TOKEN)
    try:
        if tls is not None:
            conn = tls.server(conn)
        conn.sendall(GREETING + token)
        magic, version, nblocks, _ = HEAD.unpack(recv_exact(conn, HEAD.size))
        if magic != MAGIC:
            raise MigrationError("not a kvmguest migration (bad magic)")
        if version != VERSION:
            raise MigrationError(f"migration protocol version {version}; this kvmguest speaks "
                                 f"version {VERSION}")
        (blen,) = struct.unpack("<I", recv_exact(conn, 4))
        if blen > MAX_BLOCK_LIST:
            raise MigrationError(f"a block list of {blen} bytes is too large")
        blocks = parse_blocks(recv_exact(conn, blen), nblocks)
        if RECORD.unpack(recv_exact(conn, RECORD.size))[0] != KIND_SHAPE:
            raise MigrationError("the machine's shape does not follow the block list")
        shape, mode, local, channels = _check_shape(
            fmt.parse_json(_blob(conn, 1 << 20, "the shape"), "machine shape"), nblocks)
        memory = _memory(blocks, local, _receive_memfds(conn, len(local)) if local else [])
        regions = [memory.region_of_slot(b.slot) for b in blocks]
        try:
            machine = Machine.prepare_restore(shape, memory, kvm=kvm, own_kvm=True)
        except (StateError, ValueError, OSError) as err:
            memory.close()
            raise MigrationError(f"the machine cannot be made here: {err}") from None
        if channels > 1:            # before the pager may take a connection
            readers = Readers(accept_channels(server, channels - 1, token, tls, PAGE_HELLO,
                                              STALL), regions, blocks)
        if mode == "off" and pager is not None:
            pager.dismiss()
            pager = None
        elif mode != "off":
            if pager is None:
                pager = PagerProcess(server, tls, token)
            pager.go()
        state, received, pages, switched = None, 0, 0, 0
        while True:
            kind, bi, index = RECORD.unpack(recv_exact(conn, RECORD.size))
            if kind in PAGE_KINDS:
                received += 1
                if received == 256:
                    fault_point("incoming-pages")         # crash tests: mid-stream
                pages += page_record(conn, kind, bi, index, blocks, regions)
            elif kind == KIND_POSTCOPY:       # before the source's pause, then after it
                if pager is None or switched == 2:
                    raise MigrationError("a post-copy record the shape did not announce")
                bound = sum(8 + 4 * b.npages for b in blocks)
                more = _remote_pages(_blob(conn, bound, "the post-copy page list"), blocks)
                try:
                    pager.arm(regions, more)
                except PostcopyError as err:
                    raise MigrationError(f"post-copy cannot be set up here: {err}") from None
                if receiver is None:
                    receiver = Receiver(pager, conn, regions)
                switched += 1
            elif kind == KIND_STATE:
                if state is not None:
                    raise MigrationError("two state records")
                state = fmt.parse_json(_blob(conn, fmt.MAX_STATE, "the state"),
                                       "migration state")
                if not isinstance(state, dict):
                    raise MigrationError("the state is not kvmguest state")
            elif kind == KIND_PASS_END and readers is not None:
                readers.end_pass(STALL)
            elif kind == KIND_END:
                if readers is not None:
                    readers.finish(STALL)
                    pages += readers.pages
                    readers.close()
                    readers = None
                break
            else:
                raise MigrationError(f"unknown record kind {kind}")
        if state is None:
            raise MigrationError("the stream ended without the guest's state")
        try:
            decoded = MachineState.from_json(state)
        except StateError as err:
            raise MigrationError(f"state: {err}") from None
        if receiver is None and pager is not None:
            pager.dismiss()
            pager = None
        return Incoming(decoded, memory, machine, conn, pages, regions, pager, receiver)
    except BaseException as err:
        if readers is not None:
            readers.close()
        if receiver is not None:
            receiver.cancel()
        if pager is not None:
            pager.dismiss()
        if machine is not None:
            machine.close()
        elif memory is not None:
            memory.close()
        if isinstance(err, MigrationError):
            refuse(conn, str(err))
        else:
            conn.close()
        if isinstance(err, (OSError, EOFError)):
            raise MigrationError(f"the migration broke off: "
                                 f"{getattr(err, 'strerror', None) or err}") from None
        raise


def restore_incoming(server: socket.socket, *, stream=None, console_capacity: int = 1 << 20,
                     disks: dict[str, str] | None = None, tls: Tls | None = None,
                     on_lost=None):
    """`restore --incoming`: one migration taken from ``server`` (a listening socket:
    kvmguest.front.control.listen_for_migration), checked whole, its machine completed
    paused at start, then acknowledged (the source stops its copy). A machine that cannot
    be made is refused, with the reason, and the source runs its guest on.

    After a post-copy switch the guest may run before all its pages are here: they are
    fetched as it touches them (migrate/postcopy.py), ``machine.postcopy`` (a Receiver)
    says when all are in, and ``on_lost(why)`` is called, from a thread, if the source
    goes away first: the guest is lost (by default the machine is stopped)."""
    from kvmguest.machine import open_kvm
    from migrate.reader import RestoreReport
    from migrate.postcopy import PagerProcess
    kvm = open_kvm()
    t = time.perf_counter()
    try:
        pager = PagerProcess(server, tls)
    except OSError:
        pager = None             # started when the source says it may switch, or never
    try:
        inc = receive(server, tls, kvm, pager)
    except BaseException:
        kvm.close()
        raise
    machine = inc.machine
    try:
        machine.complete_restore(inc.saved, stream=stream, console_capacity=console_capacity,
                                 disks=disks)
    except BaseException as err:
        refuse(inc.conn, str(err) or type(err).__name__)
        inc.discard()
        from migrate.postcopy import PostcopyError
        if isinstance(err, (StateError, ValueError, OSError, SnapshotError, PostcopyError)):
            raise MigrationError(f"the guest cannot be made here: {err}") from None
        raise
    try:
        inc.conn.sendall(ACK)
    except OSError as err:
        inc.discard()
        raise MigrationError(f"the source went away before it was told the guest is "
                             f"here ({err.strerror}); it runs the guest on") from None
    if inc.receiver is None:
        inc.conn.close()
    else:              # the pushed pages are taken once the vCPUs run (Machine.start)
        machine.postcopy = inc.receiver
        inc.receiver.on_lost = on_lost or (lambda why: _lose(machine, why))
    return machine, RestoreReport("(migration)", False, inc.pages, inc.pages * PAGE,
                                  time.perf_counter() - t)


def _lose(machine, why: str) -> None:
    import logging
    logging.getLogger(__name__).error("post-copy broke off: %s; the guest is lost", why)
    machine.event = "lost"
    machine.stop()


def refuse(conn: socket.socket, why: str) -> None:
    try:
        conn.sendall(REFUSED + why.encode(errors="replace")[:4000] + b"\n")
    except OSError:
        pass
    conn.close()


__all__ = ["MigrationError", "SocketWriter", "Tls", "parse_address", "receive", "refuse",
           "restore_incoming"]
