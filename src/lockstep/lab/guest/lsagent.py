#!/usr/bin/python3
"""lockstep's lab cluster agent: what a lab guest's cluster middleware would notice.

Why it exists: lockstep promises that cluster software inside the VMs never
notices a save or restore. This agent stands in for that software in every lab
guest and writes down everything it notices, so ``lockstep lab verify`` can
show (from the guests' own words) that nothing was noticed. It does two things:

* **primary/standby heartbeats** with its pair peer over UDP, like keepalived or
  corosync: a standby that stops hearing its primary takes over; a primary that
  hears another primary reports split brain;
* **sequence-numbered UDP streams** to every other guest, so the receivers can
  count lost, duplicated and reordered packets.

Everything goes to the serial console (/dev/ttyS0) as JSON lines, one object
per line, always starting with ``{"t":``::

    {"t": guest wall time, "m": guest monotonic time, "vm": name, "r": run id,
     "n": line number of this run (1, 2, ...), "event": ..., ...}

``r`` and ``n`` let ``lockstep lab verify`` cut the appended console log into
the guest's own timelines: after a restore the guest continues from the saved
state, so its line numbers go back. Events: ``start``, ``role``, ``takeover``,
``split_brain`` (``onset`` true on the first line of an episode, then once a
second while it lasts), ``split_brain_end``, ``heartbeat_miss``,
``heartbeat_stats``, ``stream_stats`` (per sender, periodic), ``stream_gap``,
``stream_dup``, ``stream_reorder`` (per sender, as they happen; their counts are
deltas, so no count is ever logged twice), ``stream_reset`` (a sender rebooted).

Time: every timeout runs on the guest's monotonic clock. Under QEMU the guest's
clocks (wall and monotonic) stand still while the VM is paused and return to
the saved values on restore, so a well-synchronised pause is invisible here,
as it is to real cluster software.

The failure detector, the pair state machine and the stream accounting are pure
classes that take the time as an argument; the I/O loop around them is thin.
Stdlib only: it runs on the guest's Debian python3 (3.11), and the host's tests
import it by file path.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import ipaddress
import json
import os
import selectors
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

HEARTBEAT_PORT = 7101
STREAM_PORT = 7102
STATS_EVERY = 1.0  # seconds between heartbeat_stats / stream_stats lines
SPLIT_REPEAT = 1.0  # seconds between split_brain lines while it lasts
ANOMALY_EVERY = 0.1  # an anomaly line per sender at most this often; the rest is summed
REORDER_WINDOW = 4096  # sequence numbers behind the highest still told apart
STREAM_TICK = 0.1  # stream packets go out, and are read, in bursts this often (see serve)
MAX_BURST = 0.1  # seconds of stream packets sent at once to catch up after a stall
BOOT_GRACE = 60.0  # a standby that never heard its primary takes over after this
RECV_BUFFER = 1 << 20
STREAM_HEADER = struct.Struct("!3sQ")  # sender's run id (3 bytes), sequence number
MAX_NAME = 32


class Role(enum.Enum):
    """A guest's role in its pair."""

    PRIMARY = "primary"
    STANDBY = "standby"


@dataclass(frozen=True)
class Note:
    """Something the agent noticed: an event name and its fields, for one log line."""

    event: str
    fields: dict[str, Any] = field(default_factory=dict)


# --- pure: failure detection and the pair's state machine --------------------------------


class FailureDetector:
    """When the peer was last heard, on the caller's monotonic clock.

    The peer is suspected once it has been silent for longer than ``timeout``
    (strictly longer: a heartbeat exactly on the deadline still counts). The
    detector is armed by the first heartbeat: a peer never heard cannot fail.
    """

    def __init__(self, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError(f"the failure timeout must be positive, not {timeout}")
        self.timeout = timeout
        self.last_heard: float | None = None

    def heard(self, now: float) -> float | None:
        """Record a heartbeat at ``now``; return the gap since the previous one."""
        gap = None if self.last_heard is None else now - self.last_heard
        self.last_heard = now
        return gap

    def silent_for(self, now: float) -> float | None:
        """Seconds since the peer was last heard (None: never heard)."""
        return None if self.last_heard is None else now - self.last_heard

    def expired(self, now: float) -> bool:
        """Has the peer been silent for longer than the timeout?"""
        silent = self.silent_for(now)
        return silent is not None and silent > self.timeout

    def deadline(self) -> float | None:
        """The instant after which the peer counts as failed (None: not armed)."""
        return None if self.last_heard is None else self.last_heard + self.timeout


class PairMachine:
    """The primary/standby state machine of one guest of a pair.

    State: this guest's role, whether it is in split brain, and its detector.
    Inputs, each with the monotonic time it happened at:

    ``heard(now, peer_role)`` (a heartbeat from the peer):
      re-arm the detector; then
        primary & peer primary, not split    -> split brain begins (``split_brain``, onset)
        primary & peer standby, split        -> split brain ends (``split_brain_end``)
        anything else                        -> nothing
    ``tick(now)`` (time passes), in this order:
        peer silent > late_after, first time in this silence -> ``heartbeat_miss``
        standby & peer silent > timeout      -> become primary (``takeover``)
        standby & never heard & now - start > grace -> become primary (``takeover``)
        primary & split & peer silent > timeout -> split brain ends (``split_brain_end``)
        split, SPLIT_REPEAT since last line  -> ``split_brain`` again (it lasts)

    There is no way back: a guest that took over stays primary (a real cluster
    would demote one side; the lab only needs to see that it happened).
    """

    def __init__(
        self,
        role: Role,
        *,
        heartbeat: float,
        timeout: float,
        started: float,
        grace: float = BOOT_GRACE,
    ) -> None:
        if heartbeat <= 0 or timeout <= heartbeat:
            raise ValueError(
                f"need 0 < heartbeat < timeout, not heartbeat {heartbeat} and timeout {timeout}"
            )
        self.role = role
        self.heartbeat = heartbeat
        self.detector = FailureDetector(timeout)
        self.started = started
        self.grace = grace
        self.late_after = (heartbeat + timeout) / 2  # halfway between on time and failed
        self.split_brain = False
        self.peer_role: Role | None = None
        self._split_said: float = 0.0
        self._miss_said = False

    def heard(self, now: float, peer_role: Role) -> list[Note]:
        """A heartbeat from the peer, which says it is ``peer_role``."""
        gap = self.detector.heard(now)
        self._miss_said = False
        self.peer_role = peer_role
        notes: list[Note] = []
        if self.role is Role.PRIMARY and peer_role is Role.PRIMARY and not self.split_brain:
            self.split_brain = True
            self._split_said = now
            notes.append(Note("split_brain", {"onset": True, "peer_role": peer_role.value}))
        elif self.role is Role.PRIMARY and peer_role is Role.STANDBY and self.split_brain:
            self.split_brain = False
            gap_s = None if gap is None else round(gap, 3)
            notes.append(Note("split_brain_end", {"why": "peer is standby", "gap_s": gap_s}))
        return notes

    def tick(self, now: float) -> list[Note]:
        """Time has reached ``now``: apply every timeout that is due."""
        notes: list[Note] = []
        silent = self.detector.silent_for(now)
        if silent is not None and silent > self.late_after and not self._miss_said:
            self._miss_said = True
            notes.append(Note("heartbeat_miss", {"silent_s": _r(silent)}))
        if self.role is Role.STANDBY:
            if self.detector.expired(now):
                assert silent is not None
                notes.append(self._take_over("peer silent", silent))
            elif silent is None and now - self.started > self.grace:
                notes.append(self._take_over("peer never heard", now - self.started))
        elif self.split_brain and self.detector.expired(now):
            self.split_brain = False
            notes.append(Note("split_brain_end", {"why": "peer silent", "silent_s": _r(silent)}))
        if self.split_brain and now - self._split_said >= SPLIT_REPEAT:
            self._split_said = now
            notes.append(Note("split_brain", {"onset": False, "peer_role": Role.PRIMARY.value}))
        return notes

    def next_deadline(self, now: float) -> float:
        """The next instant at which :meth:`tick` may have something to say (>= now)."""
        candidates = [now + self.heartbeat]
        last = self.detector.last_heard
        if last is not None:
            if not self._miss_said:
                candidates.append(last + self.late_after)
            if self.role is Role.STANDBY or self.split_brain:
                candidates.append(last + self.detector.timeout)
        elif self.role is Role.STANDBY:
            candidates.append(self.started + self.grace)
        if self.split_brain:
            candidates.append(self._split_said + SPLIT_REPEAT)
        # Strictly after a deadline: step just past it so tick() sees it expired.
        return max(now, min(candidates) + 1e-6)

    def _take_over(self, why: str, silent: float) -> Note:
        previous = self.role
        self.role = Role.PRIMARY
        return Note(
            "takeover",
            {"from": previous.value, "to": self.role.value, "why": why, "silent_s": _r(silent)},
        )


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --- pure: stream accounting --------------------------------------------------------------


class Arrival(enum.Enum):
    """What one stream packet was, seen from its receiver."""

    FIRST = "first"  # first packet of this sender's run: the baseline
    IN_ORDER = "in_order"
    GAP = "gap"  # ahead of the next expected: the skipped ones are counted lost
    LATE = "late"  # one that was counted lost arrived after all: reordered, not lost
    DUPLICATE = "duplicate"
    RESET = "reset"  # the sender's run changed (it rebooted): a new baseline


class StreamReceiver:
    """Accounting of one sender's sequence-numbered stream.

    ``lost`` counts sequence numbers skipped and not (yet) arrived: a packet that
    arrives after a later one is taken back out of ``lost`` and counted
    ``reordered``. Packets more than ``window`` behind the highest are too old
    to tell apart and count as duplicates (the receiver had them or gave them up).
    """

    def __init__(self, window: int = REORDER_WINDOW) -> None:
        self.window = window
        self.run: bytes | None = None
        self.highest = -1
        self.received = 0
        self.lost = 0
        self.duplicated = 0
        self.reordered = 0
        self._missing: set[int] = set()

    def receive(self, run: bytes, seq: int) -> tuple[Arrival, int]:
        """Account for packet ``seq`` of the sender's run ``run``; return what it was.

        The int is the change in ``lost`` it made (positive for a gap, -1 when a
        packet counted lost arrived late, else 0).
        """
        if self.run != run:
            first = self.run is None
            self.run, self.highest = run, seq
            self._missing.clear()
            self.received += 1
            return (Arrival.FIRST if first else Arrival.RESET), 0
        if seq > self.highest:
            skipped = seq - self.highest - 1
            if skipped:
                self._missing.update(range(max(self.highest + 1, seq - self.window), seq))
            self.highest = seq
            self.received += 1
            if len(self._missing) > self.window:
                floor = seq - self.window
                self._missing = {s for s in self._missing if s >= floor}
            self.lost += skipped
            return (Arrival.GAP if skipped else Arrival.IN_ORDER), skipped
        if seq in self._missing:
            self._missing.discard(seq)
            self.received += 1
            self.reordered += 1
            self.lost -= 1
            return Arrival.LATE, -1
        self.duplicated += 1
        return Arrival.DUPLICATE, 0


@dataclass
class PendingAnomalies:
    """Anomalies of one sender not logged yet (one line per kind per ANOMALY_EVERY at most).

    Every count is a delta since the previous line, so summing a log's lines
    never counts an anomaly twice. A late arrival was counted lost when its gap
    was seen: its ``stream_reorder`` line takes it back (``lost`` -1 each).
    """

    gaps: int = 0
    lost: int = 0  # skipped by the gaps
    duplicated: int = 0
    reordered: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    said_at: float = float("-inf")

    def add(self, arrival: Arrival, lost_delta: int, seq: int) -> None:
        """Count one anomalous arrival (``lost_delta`` as :meth:`StreamReceiver.receive` said)."""
        if arrival is Arrival.GAP:
            self.gaps += 1
            self.lost += lost_delta
        elif arrival is Arrival.LATE:
            self.reordered += 1
        elif arrival is Arrival.DUPLICATE:
            self.duplicated += 1
        else:
            return
        self.first_seq = seq if self.first_seq is None else self.first_seq
        self.last_seq = seq

    def empty(self) -> bool:
        """Nothing to log."""
        return not (self.gaps or self.duplicated or self.reordered)

    def take(self, sender: str) -> list[Note]:
        """The lines for what is pending; the counts start again from zero."""
        where = {"from": sender, "first_seq": self.first_seq, "last_seq": self.last_seq}
        out: list[Note] = []
        if self.gaps:
            out.append(Note("stream_gap", {**where, "gaps": self.gaps, "lost": self.lost}))
        if self.reordered:
            fields = {**where, "reordered": self.reordered, "lost": -self.reordered}
            out.append(Note("stream_reorder", fields))
        if self.duplicated:
            out.append(Note("stream_dup", {**where, "duplicated": self.duplicated}))
        self.gaps = self.lost = self.duplicated = self.reordered = 0
        self.first_seq = self.last_seq = None
        return out


def encode_packet(run: bytes, seq: int, name: bytes) -> bytes:
    """A stream packet: the sender's run id, the sequence number, the sender's name."""
    return STREAM_HEADER.pack(run, seq) + name


def decode_packet(data: bytes) -> tuple[bytes, int, str] | None:
    """(run, seq, sender) of a stream packet, or None when it is not one."""
    if len(data) <= STREAM_HEADER.size or len(data) > STREAM_HEADER.size + MAX_NAME:
        return None
    run, seq = STREAM_HEADER.unpack_from(data)
    try:
        name = data[STREAM_HEADER.size :].decode("ascii")
    except UnicodeDecodeError:
        return None
    return run, seq, name


def encode_heartbeat(name: str, role: Role, seq: int) -> bytes:
    """A heartbeat packet (small JSON: a few per second at most)."""
    message = {"hb": seq, "from": name, "role": role.value}
    return json.dumps(message, separators=(",", ":")).encode()


def decode_heartbeat(data: bytes) -> tuple[str, Role] | None:
    """(sender, its role) of a heartbeat packet, or None when it is not one."""
    try:
        message = json.loads(data.decode("utf-8"))
        return str(message["from"]), Role(message["role"])
    except (ValueError, KeyError, TypeError):
        return None


# --- I/O: the console log and the loop ----------------------------------------------------


class ConsoleLog:
    """JSON lines on the console, each with the guest's times, name, run id and line number.

    Each line goes out in one write() so that no other writer's output lands
    inside it. Writes block: the serial port drains fast under QEMU, and a
    dropped line would drop counts.
    """

    def __init__(
        self,
        write: Callable[[bytes], None],
        vm: str,
        run: str,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self.vm = vm
        self.run = run
        self.lines = 0
        self._wall = wall
        self._mono = mono

    def say(self, event: str, **fields: Any) -> None:
        """Write one line for ``event``."""
        self.lines += 1
        line = {
            "t": round(self._wall(), 3),
            "m": round(self._mono(), 3),
            "vm": self.vm,
            "r": self.run,
            "n": self.lines,
            "event": event,
            **fields,
        }
        try:
            self._write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
        except OSError as exc:
            print(f"lsagent: cannot write to the console: {exc}", file=sys.stderr)

    def notes(self, notes: Sequence[Note]) -> None:
        """Write one line per note."""
        for note in notes:
            self.say(note.event, **note.fields)


@dataclass(frozen=True)
class Config:
    """What the agent was started with (see :func:`parse_args`)."""

    name: str
    role: Role
    peer: str
    peer_ip: str
    heartbeat: float
    timeout: float
    streams: tuple[str, ...]
    rate: float
    console: str
    bind: str
    grace: float
    stats_every: float


def parse_args(argv: Sequence[str]) -> Config:
    """The configuration from the command line (argparse exits 2 on bad input)."""
    p = argparse.ArgumentParser(prog="lsagent", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--name", required=True, help="this guest's name (p1)")
    p.add_argument("-r", "--role", required=True, choices=[r.value for r in Role])
    p.add_argument("-p", "--peer", required=True, help="the pair peer's name (s1)")
    p.add_argument("-a", "--peer-ip", required=True, help="the pair peer's address")
    p.add_argument("-b", "--heartbeat", type=float, default=1.0, help="seconds between beats")
    p.add_argument("-t", "--timeout", type=float, default=3.0, help="seconds of silence = failed")
    p.add_argument("-s", "--streams", default="", help="addresses to stream to, comma-separated")
    p.add_argument("-R", "--rate", type=float, default=200.0, help="stream packets/s per address")
    p.add_argument("-c", "--console", default="/dev/ttyS0", help="where to log ('-': stdout)")
    p.add_argument("-B", "--bind", default="", help="local address to bind (default: any)")
    p.add_argument("-g", "--grace", type=float, default=BOOT_GRACE, help=argparse.SUPPRESS)
    p.add_argument("-i", "--stats", type=float, default=STATS_EVERY, help="seconds between stats")
    a = p.parse_args(list(argv))
    if not 0 < a.heartbeat < a.timeout:
        p.error(f"need 0 < heartbeat < timeout (got {a.heartbeat} and {a.timeout})")
    if a.rate < 0 or a.stats <= 0:
        p.error("--rate must be >= 0 and --stats > 0")
    if not 0 < len(a.name.encode()) <= MAX_NAME or not a.name.isascii():
        p.error(f"--name must be 1 to {MAX_NAME} ASCII characters")
    streams = tuple(s.strip() for s in a.streams.split(",") if s.strip())
    for address in (a.peer_ip, *streams):
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            p.error(f"{address!r} is not an IPv4 address")
    return Config(
        name=a.name,
        role=Role(a.role),
        peer=a.peer,
        peer_ip=a.peer_ip,
        heartbeat=a.heartbeat,
        timeout=a.timeout,
        streams=streams,
        rate=a.rate,
        console=a.console,
        bind=a.bind,
        grace=a.grace,
        stats_every=a.stats,
    )


def _udp_socket(bind: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    force = getattr(socket, "SO_RCVBUFFORCE", 33)
    try:  # root may exceed rmem_max: held frames arrive in one burst after a restore
        sock.setsockopt(socket.SOL_SOCKET, force, RECV_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
    sock.bind((bind, port))
    sock.setblocking(False)
    return sock


def _run_id() -> str:
    """Six hex digits that differ between boots (no entropy needed so early in a boot)."""
    return f"{(time.time_ns() ^ (os.getpid() << 24)) & 0xFFFFFF:06x}"


class Agent:
    """The I/O loop: sockets, timers on the monotonic clock, and the pure parts above."""

    def __init__(self, config: Config, log: ConsoleLog) -> None:
        self.config = config
        self.log = log
        now = time.monotonic()
        self.machine = PairMachine(
            config.role,
            heartbeat=config.heartbeat,
            timeout=config.timeout,
            started=now,
            grace=config.grace,
        )
        self.hb_sock = _udp_socket(config.bind, HEARTBEAT_PORT)
        self.stream_sock = _udp_socket(config.bind, STREAM_PORT)
        self.receivers: dict[str, StreamReceiver] = {}
        self.pending: dict[str, PendingAnomalies] = {}
        self.period_rx: dict[str, int] = {}
        self.run = bytes.fromhex(log.run)
        self.name = config.name.encode()
        self.hb_seq = 0
        self.hb_rx = 0
        self.hb_gap_max = 0.0
        self.sent = 0
        self.send_errors = 0
        self.send_errnos: set[int | None] = set()
        self.stream_start = now
        self.next_hb = now
        self.next_stats = now + config.stats_every

    def start(self) -> None:
        """Log the start and the initial role."""
        c = self.config
        self.log.say(
            "start",
            role=c.role.value,
            peer=c.peer,
            peer_ip=c.peer_ip,
            heartbeat=c.heartbeat,
            timeout=c.timeout,
            streams=list(c.streams),
            rate=c.rate,
            pid=os.getpid(),
        )
        self.log.say("role", role=self.machine.role.value, peer=c.peer)

    def serve(self, until: float | None = None) -> None:
        """Run the loop (forever, or until the monotonic time ``until``).

        Heartbeats are read as they arrive: their arrival times are what the
        failure detector judges. Stream packets are not woken for: they wait in
        the socket (its buffer holds seconds of them) and are read every
        ``STREAM_TICK``, in the wake-up that sends this guest's own stream, or
        in any other wake-up (every stats period if this guest streams
        nothing). Under TCG every wake-up of a guest costs the host
        milliseconds of CPU, so this is what keeps a lab with streams cheap.
        """
        selector = selectors.DefaultSelector()
        selector.register(self.hb_sock, selectors.EVENT_READ, self._read_heartbeats)
        rate = self.config.rate
        stream_every = max(1.0 / rate, STREAM_TICK) if rate > 0 and self.config.streams else None
        # A guest that streams nothing itself is streamed to by nobody in the lab.
        read_every = STREAM_TICK if stream_every is not None else self.config.stats_every
        next_stream = time.monotonic()
        while until is None or time.monotonic() < until:
            now = time.monotonic()
            if now >= self.next_hb:
                self._send_heartbeat()
                # After a stall, beat now and keep the cadence from here (no bursts).
                self.next_hb = max(self.next_hb + self.config.heartbeat, now)
            if stream_every is not None and now >= next_stream:
                self._send_stream(now)
                next_stream = max(next_stream + stream_every, now)
            self._read_stream(now)
            next_read = now + read_every
            if self.machine.detector.expired(now):
                # A heartbeat already here but not read (this loop was late) is not silence.
                self._read_heartbeats(now)
            self.log.notes(self.machine.tick(now))
            self._flush_anomalies(now, force=False)
            if now >= self.next_stats:
                self._stats()
                self.next_stats = max(self.next_stats + self.config.stats_every, now)
            wake = [self.next_hb, self.next_stats, self.machine.next_deadline(now), next_read]
            if stream_every is not None:
                wake.append(next_stream)
            if any(not p.empty() for p in self.pending.values()):
                wake.append(now + ANOMALY_EVERY)
            if until is not None:
                wake.append(until)
            for key, _ in selector.select(max(min(wake) - time.monotonic(), 0.0)):
                key.data(time.monotonic())

    def _send_heartbeat(self) -> None:
        self.hb_seq += 1
        packet = encode_heartbeat(self.config.name, self.machine.role, self.hb_seq)
        self._sendto(self.hb_sock, packet, (self.config.peer_ip, HEARTBEAT_PORT))

    def _send_stream(self, now: float) -> None:
        due = int((now - self.stream_start) * self.config.rate) - self.sent
        cap = max(int(self.config.rate * MAX_BURST), 1)
        if due > cap:  # a stall (the guest was starved): skip the schedule, not numbers
            self.stream_start += (due - cap) / self.config.rate
            due = cap
        for _ in range(due):
            packet = encode_packet(self.run, self.sent, self.name)
            for address in self.config.streams:
                self._sendto(self.stream_sock, packet, (address, STREAM_PORT))
            self.sent += 1

    def _sendto(self, sock: socket.socket, packet: bytes, address: tuple[str, int]) -> None:
        try:
            sock.sendto(packet, address)
        except OSError as exc:  # unreachable peer, full buffer: counted, never fatal
            self.send_errors += 1
            if exc.errno not in self.send_errnos:  # said once per kind: the console is slow
                self.send_errnos.add(exc.errno)
                self.log.say("send_error", to=address[0], error=str(exc))

    def _read_heartbeats(self, now: float) -> None:
        for data in _drain(self.hb_sock):
            beat = decode_heartbeat(data)
            if beat is None or beat[0] != self.config.peer:
                continue
            gap = self.machine.detector.silent_for(now)
            if gap is not None:
                self.hb_gap_max = max(self.hb_gap_max, gap)
            self.hb_rx += 1
            self.log.notes(self.machine.heard(now, beat[1]))

    def _read_stream(self, now: float) -> None:
        for data in _drain(self.stream_sock):
            packet = decode_packet(data)
            if packet is None:
                continue
            run, seq, sender = packet
            receiver = self.receivers.get(sender)
            if receiver is None:
                receiver = self.receivers[sender] = StreamReceiver()
            arrival, lost_delta = receiver.receive(run, seq)
            self.period_rx[sender] = self.period_rx.get(sender, 0) + 1
            if arrival is Arrival.RESET:
                self._flush_anomalies(now, force=True)
                self.log.say("stream_reset", **{"from": sender, "seq": seq})
            elif arrival in (Arrival.GAP, Arrival.LATE, Arrival.DUPLICATE):
                self.pending.setdefault(sender, PendingAnomalies()).add(arrival, lost_delta, seq)
        self._flush_anomalies(now, force=False)

    def _flush_anomalies(self, now: float, *, force: bool) -> None:
        for sender, pending in self.pending.items():
            if not pending.empty() and (force or now - pending.said_at >= ANOMALY_EVERY):
                pending.said_at = now
                self.log.notes(pending.take(sender))

    def _stats(self) -> None:
        m = self.machine
        peer_role = None if m.peer_role is None else m.peer_role.value
        silent = m.detector.silent_for(time.monotonic())
        if silent is not None:  # a peer silent all period long shows here too
            self.hb_gap_max = max(self.hb_gap_max, silent)
        self.log.say(
            "heartbeat_stats",
            role=m.role.value,
            peer_role=peer_role,
            rx=self.hb_rx,
            gap_max_s=round(self.hb_gap_max, 3),
            sent=self.sent,
            send_errors=self.send_errors,
        )
        self.hb_rx, self.hb_gap_max = 0, 0.0
        for sender, r in sorted(self.receivers.items()):
            self.log.say(
                "stream_stats",
                **{"from": sender},
                rx=self.period_rx.get(sender, 0),
                received=r.received,
                lost=r.lost,
                duplicated=r.duplicated,
                reordered=r.reordered,
                last_seq=r.highest,
            )
        self.period_rx.clear()


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(2048))
        except (BlockingIOError, InterruptedError):
            return out
        except OSError:  # ICMP errors queued on the socket: nothing to read
            return out


def console_writer(path: str) -> Callable[[bytes], None]:
    """A function writing whole lines to ``path`` (``-``: stdout).

    Raises:
        OSError: the path cannot be opened for writing.
    """
    fd = sys.stdout.fileno() if path == "-" else os.open(path, os.O_WRONLY | os.O_NOCTTY)

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


def main(argv: Sequence[str]) -> int:
    """Run the agent with ``argv`` (without the program name) until killed."""
    config = parse_args(argv)
    try:
        write = console_writer(config.console)
    except OSError as exc:
        print(f"lsagent: cannot open {config.console}: {exc}; logging to stdout", file=sys.stderr)
        write = console_writer("-")
    log = ConsoleLog(write, config.name, _run_id())
    try:
        agent = Agent(config, log)
    except OSError as exc:
        log.say("error", error=f"cannot open the agent's sockets: {exc}")
        return 1
    agent.start()
    with contextlib.suppress(KeyboardInterrupt):
        agent.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
