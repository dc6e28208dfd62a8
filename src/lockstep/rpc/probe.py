"""The light clock-probe path beside gRPC: UDP on the execd's address, keyed per sync.

A gRPC round trip costs a millisecond or more of Python and TLS on a slow
machine; a UDP datagram answered by a thread that does nothing else costs tens
of microseconds, and the kernel stamps its arrival (``SO_TIMESTAMPNS``) on both
sides, so the time a process takes to wake up is not counted as network delay.
The clock error bound is half the delay, so this is what makes the bound small.

Only a caller of the group can use it: the caller asks for a key over the
mutual-TLS channel (the ``ProbeKey`` call), and every probe and reply carries a
MAC under that key. The responder ignores, and counts, probes that are

- **forged**: unknown key id, or a MAC that does not verify;
- **replayed**: a sequence number not above the last one answered under that key;
- **stale**: a valid MAC under a key whose life has ended.

The caller likewise ignores (and counts) replies that do not verify or answer
another probe (a late reply to a probe it gave up on).

Wire format, network byte order; ``mac`` = HMAC-SHA256(key, the bytes before it)[:16]::

    probe = "LSP1" | 0x01 | key_id (8) | seq (u64) | mac (16)
    reply = "LSP1" | 0x02 | key_id (8) | seq (u64) | t1 (f64) | t2 (f64) | mac (16)

``t1`` is when the probe arrived (the kernel's stamp), ``t2`` when the reply
left (stamped just before it is sent), both on the execd's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from lockstep.errors import RpcError
from lockstep.execd.model import ProbeReply

__all__ = [
    "KEY_LIFE",
    "ProbeCounts",
    "ProbeKey",
    "ProbeResponder",
    "UdpProbePath",
    "decode_probe",
    "decode_reply",
    "encode_probe",
    "encode_reply",
]

log = logging.getLogger(__name__)

MAGIC = b"LSP1"
_PROBE = struct.Struct("!4sB8sQ")
_REPLY = struct.Struct("!4sB8sQdd")
_MAC_SIZE = 16
_KIND_PROBE = 1
_KIND_REPLY = 2
KEY_LIFE = 120.0  # seconds a key is good for: one sync (or a few) of one operation
_LIVE_KEYS = 64  # the newest keys kept; older ones are forgotten
_DEAD_KEYS = 256  # expired keys remembered, to tell stale probes from forged ones
SO_TIMESTAMPNS = 35  # SO_TIMESTAMPNS_OLD: a struct timespec of two longs (64-bit Linux)
_TIMESPEC = struct.Struct("@ll")


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:_MAC_SIZE]


def encode_probe(key_id: bytes, key: bytes, seq: int) -> bytes:
    """One probe datagram."""
    body = _PROBE.pack(MAGIC, _KIND_PROBE, key_id, seq)
    return body + _mac(key, body)


def decode_probe(data: bytes) -> tuple[bytes, int, bytes, bytes] | None:
    """(key id, seq, body, mac) of a probe datagram; None if it is not one."""
    if len(data) != _PROBE.size + _MAC_SIZE:
        return None
    magic, kind, key_id, seq = _PROBE.unpack_from(data)
    if magic != MAGIC or kind != _KIND_PROBE:
        return None
    return key_id, seq, data[: _PROBE.size], data[_PROBE.size :]


def encode_reply(key_id: bytes, key: bytes, seq: int, t1: float, t2: float) -> bytes:
    """One reply datagram."""
    body = _REPLY.pack(MAGIC, _KIND_REPLY, key_id, seq, t1, t2)
    return body + _mac(key, body)


def decode_reply(data: bytes, key_id: bytes, key: bytes) -> tuple[int, float, float] | None:
    """(seq, t1, t2) of a reply under ``key``; None if it is not one or does not verify."""
    if len(data) != _REPLY.size + _MAC_SIZE:
        return None
    magic, kind, got_id, seq, t1, t2 = _REPLY.unpack_from(data)
    if magic != MAGIC or kind != _KIND_REPLY or got_id != key_id:
        return None
    if not hmac.compare_digest(_mac(key, data[: _REPLY.size]), data[_REPLY.size :]):
        return None
    return seq, t1, t2


def _kernel_stamp(ancdata: list[tuple[int, int, bytes]]) -> float | None:
    """The receive time the kernel attached to a datagram (wall clock), if any."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return float(sec + nsec * 1e-9)
    return None


def _stamped_socket(family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    return sock


_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


@dataclass(frozen=True)
class ProbeKey:
    """What the ``ProbeKey`` call hands a caller: where to probe, under which key."""

    port: int  # 0: this execd has no UDP probe path
    key_id: bytes = b""
    key: bytes = b""
    valid_for: float = 0.0
    counts: ProbeCounts | None = None


@dataclass
class ProbeCounts:
    """What a responder did with the datagrams it got, since it started."""

    answered: int = 0
    forged: int = 0
    replayed: int = 0
    stale: int = 0


@dataclass
class _Key:
    key: bytes
    expires: float  # monotonic
    last_seq: int = 0


@dataclass
class ProbeResponder:
    """Answers clock probes on UDP ``address`` from a thread of its own.

    ``from_wall`` turns a wall-clock instant into the execd's clock (its
    ``--clock-offset``); ``stall`` runs between stamping a reply and sending
    it (the fault hook makes the path slow and asymmetric there).
    """

    address: tuple[str, int]
    from_wall: Callable[[float], float]
    stall: Callable[[], None] = lambda: None
    key_life: float = KEY_LIFE
    now: Callable[[], float] = time.monotonic
    counts: ProbeCounts = field(default_factory=ProbeCounts)
    _live: OrderedDict[bytes, _Key] = field(default_factory=OrderedDict)
    _dead: OrderedDict[bytes, bytes] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        """The UDP port it answers on (0 before :meth:`start`, or if it could not bind)."""
        return 0 if self._sock is None else int(self._sock.getsockname()[1])

    def start(self) -> bool:
        """Bind and start answering; False (and a warning) if the address cannot be bound."""
        host, port = self.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = _stamped_socket(family)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            log.warning(
                "no UDP clock-probe path on %s:%d (%s); callers fall back to gRPC probes",
                host, port, exc.strerror,
            )  # fmt: skip
            return False
        sock.settimeout(0.25)  # how soon close() is noticed
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="clock-probe", daemon=True)
        self._thread.start()
        return True

    def close(self) -> None:
        """Stop answering and release the port."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def issue_key(self) -> ProbeKey:
        """A fresh key for one caller's sync (the oldest live keys are forgotten)."""
        key_id, key = secrets.token_bytes(8), secrets.token_bytes(32)
        with self._lock:
            self._expire()
            self._live[key_id] = _Key(key, self.now() + self.key_life)
            while len(self._live) > _LIVE_KEYS:
                old_id, old = self._live.popitem(last=False)
                self._bury(old_id, old.key)
            counts = ProbeCounts(**vars(self.counts))
        return ProbeKey(self.port, key_id, key, self.key_life, counts)

    def _bury(self, key_id: bytes, key: bytes) -> None:
        self._dead[key_id] = key
        while len(self._dead) > _DEAD_KEYS:
            self._dead.popitem(last=False)

    def _expire(self) -> None:
        now = self.now()
        for key_id in [k for k, v in self._live.items() if v.expires <= now]:
            self._bury(key_id, self._live.pop(key_id).key)

    def answer(self, data: bytes, received: float) -> bytes | None:
        """The reply to datagram ``data`` (arrived at wall time ``received``), or None.

        None means ignored; the reason is counted (forged, replayed or stale).
        """
        probe = decode_probe(data)
        with self._lock:
            if probe is None:
                self.counts.forged += 1
                return None
            key_id, seq, body, mac = probe
            self._expire()
            live = self._live.get(key_id)
            key = live.key if live is not None else self._dead.get(key_id)
            if key is None or not hmac.compare_digest(_mac(key, body), mac):
                self.counts.forged += 1
                return None
            if live is None:
                self.counts.stale += 1
                return None
            if seq <= live.last_seq:
                self.counts.replayed += 1
                return None
            live.last_seq = seq
            self.counts.answered += 1
        return encode_reply(key_id, key, seq, self.from_wall(received), self.from_wall(time.time()))

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                data, ancdata, _flags, peer = sock.recvmsg(256, _ANCILLARY)
            except TimeoutError:
                continue
            except OSError:
                return
            received = _kernel_stamp(ancdata)
            reply = self.answer(data, received if received is not None else time.time())
            if reply is None:
                continue
            self.stall()
            with contextlib.suppress(OSError):
                sock.sendto(reply, peer)


class UdpProbePath:
    """The caller's end of one execd's UDP probe path, under one key.

    :meth:`sample` sends one probe and waits for its reply; the caller's
    timestamps are its own wall clock (send) and the kernel's (receipt).
    """

    def __init__(self, host: str, target: tuple[str, int], key: ProbeKey) -> None:
        self.host = host
        self.target = target
        self._key = key
        self._seq = 0
        self.ignored = 0  # replies that did not verify or answered another probe
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        self._sock = _stamped_socket(family)
        self._sock.setblocking(False)

    @property
    def description(self) -> str:
        """Where the probes go, for reports."""
        return f"udp {self.target[0]}:{self.target[1]}"

    @property
    def refused(self) -> dict[str, int]:
        """What the execd's responder had ignored when it issued the key, by reason."""
        c = self._key.counts or ProbeCounts()
        return {"forged": c.forged, "replayed": c.replayed, "stale": c.stale}

    def close(self) -> None:
        """Release the socket."""
        self._sock.close()

    def _read(self) -> tuple[int, float, float, float] | None:
        """One waiting reply that verifies: (seq, t1, t2, received); None if none is left."""
        while True:
            try:
                data, ancdata, _flags, _peer = self._sock.recvmsg(256, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return None
            received = _kernel_stamp(ancdata)
            got = decode_reply(data, self._key.key_id, self._key.key)
            if got is None:
                self.ignored += 1
                continue
            return *got, received if received is not None else time.time()

    async def sample(self, timeout: float) -> tuple[float, ProbeReply, float] | None:
        """One probe: (sent, the execd's stamps, received); None if no reply came in time.

        Raises:
            RpcError: the probe could not be sent (no route, say).
        """
        loop = asyncio.get_running_loop()
        self._seq += 1
        packet = encode_probe(self._key.key_id, self._key.key, self._seq)
        readable = asyncio.Event()
        fd = self._sock.fileno()
        loop.add_reader(fd, readable.set)
        try:
            sent = time.time()
            try:
                self._sock.sendto(packet, self.target)
            except OSError as exc:
                raise RpcError(
                    f"cannot send a clock probe to host {self.host} ({self.description}):"
                    f" {exc.strerror}"
                ) from exc
            end = loop.time() + timeout
            while (left := end - loop.time()) > 0:
                try:
                    await asyncio.wait_for(readable.wait(), left)
                except TimeoutError:
                    break
                readable.clear()
                while (got := self._read()) is not None:
                    seq, t1, t2, received = got
                    if seq == self._seq:
                        return sent, ProbeReply(received=t1, sent=t2), received
                    self.ignored += 1  # a late reply to a probe given up on
            return None
        finally:
            loop.remove_reader(fd)
