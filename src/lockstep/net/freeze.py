"""The freeze: frames addressed to a VM are held outside it, then delivered in order.

For each tap of the VM (DESIGN.md, "The freeze"):

- ``prepare``: a veth pair made for that tap (``ls<hash>f<i>`` / ``ls<hash>g<i>``),
  an AF_PACKET socket reading the ``g`` end in a capture thread, and an
  AF_PACKET socket on the tap for injection. The tap's ``clsact`` qdisc comes
  with the tap (:func:`lockstep.net.links.create_tap`): adding or removing a
  qdisc on a running link drops the frames in flight, adding a filter does not;
- ``engage`` (at the scheduled instant, before the VM pauses): an egress ``u32``
  match-all filter on the tap with ``mirred egress redirect`` to the ``f`` end.
  Every frame the host would hand to the VM now lands in our capture instead;
- ``drain``: wait until no frame arrived for a quiet period (bounded);
- ``deliver`` (while the VM is still paused, just before it resumes): inject
  the held frames in their order through the tap socket with
  ``PACKET_QDISC_BYPASS`` (so they skip the tap's qdisc and are not captured
  again). A paused QEMU does not read its tap, so they wait in the tap's own
  queue (made long enough for them first); then the filter goes. When the VM
  resumes it reads the held frames first, and whatever arrives after the
  filter went behind them: nothing overtakes a held frame;
- ``lift`` (after the VM resumed): stop the capture, count what was delivered
  and dropped, remove the veth pair.
  (Delivering after the resume, as this module once did, let a frame that
  arrived just after the filter went reach the VM before frames still on their
  way through the capture: 208 reordered in 5 cycles on a slow machine.)

Frames are held in memory up to a bound, spilled to a pcap file beyond it, and
dropped (and counted) past a hard limit: never silently. Captured frames get
their deferred (offloaded) checksums completed (:mod:`lockstep.net.frames`), so
they are valid both when injected and in the state's pcap. GSO super-frames
(larger than the MTU) are counted in ``gso`` and kept as they are: plain
injection cannot segment them (a known limit; UDP streams never produce them).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lockstep.errors import NetError
from lockstep.net import pcap
from lockstep.net.frames import finish_frame
from lockstep.net.links import LINK_PREFIX, OUR_LINK, delete_link, ensure_clsact, netlink

__all__ = [
    "FreezeLimits",
    "FreezeState",
    "NicFreeze",
    "cleanup_freeze_links",
    "freeze_pair",
    "prepare_tap",
]

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_QDISC_BYPASS = 20
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33
CLSACT_EGRESS = 0xFFFFFFF3
_FILTER_PRIO = 1
_RCVBUF = 32 << 20
_YIELD_EVERY = 256  # frames injected between two turns of the event loop
_QUEUE_SPARE = 1024  # tap queue room beyond the held frames, for what arrives after the lift
_SETTLE_LIMIT = 0.5  # s: longest wait at lift for redirected frames still on their way

T = TypeVar("T")


def freeze_pair(tap: str) -> tuple[str, str]:
    """The veth pair made for ``tap``: (redirect end, capture end).

    A tap lockstep made gives its own stem and index; one made by someone
    else (libvirt's ``vnet3``) a stem hashed from its name, index 0: either
    way the pair is one of lockstep's links (:data:`OUR_LINK`).
    """
    m = OUR_LINK.match(tap)
    if m and m.group(1) == "t":
        stem, index = tap[: -len(m.group(1) + m.group(2))], m.group(2)
    elif m is None and tap:
        stem, index = f"{LINK_PREFIX}{hashlib.sha256(f'tap {tap}'.encode()).hexdigest()[:8]}", "0"
    else:
        raise NetError(f"{tap!r} is no tap to freeze")
    return f"{stem}f{index}", f"{stem}g{index}"


async def prepare_tap(tap: str, *, netns: str | None = None) -> None:
    """Make a tap lockstep did not make (libvirt's) ready for freezes, once, when first seen.

    It gets a ``clsact`` qdisc unless it has one (adding a qdisc to a running
    link drops the frames in flight for a moment, so never at a freeze), and a
    freeze filter a crash left on it goes.

    Raises:
        NetError: the tap is missing or the qdisc could not be added.
    """
    async with netlink(netns) as ipr:
        found = await ipr.link_lookup(ifname=tap)
        if not found:
            raise NetError(f"tap {tap}{' in namespace ' + netns if netns else ''} does not exist")
        try:
            await ensure_clsact(ipr, found[0])
        except NetlinkError as exc:
            raise NetError(f"cannot add a clsact qdisc to tap {tap}: {exc}") from exc
        await _delete_filter(ipr, found[0])


@dataclass(frozen=True)
class FreezeLimits:
    """How many frames per VM are held in memory, and the hard limit."""

    in_memory: int = 4096
    limit: int = 262144


class FreezeState(enum.Enum):
    """Lifecycle of a freeze: NEW -> PREPARED -> ENGAGED -> DELIVERED -> LIFTED.

    Any state may go to LIFTED (a freeze is lifted however it ends); a freeze
    prepared but never engaged may deliver (a state's frames, on a restore).
    """

    NEW = "new"
    PREPARED = "prepared"
    ENGAGED = "engaged"
    DELIVERED = "delivered"
    LIFTED = "lifted"


_FREEZE_ALLOWED: dict[FreezeState, frozenset[FreezeState]] = {
    FreezeState.NEW: frozenset({FreezeState.PREPARED, FreezeState.LIFTED}),
    FreezeState.PREPARED: frozenset(
        {FreezeState.ENGAGED, FreezeState.DELIVERED, FreezeState.LIFTED}
    ),
    FreezeState.ENGAGED: frozenset({FreezeState.DELIVERED, FreezeState.LIFTED}),
    FreezeState.DELIVERED: frozenset({FreezeState.LIFTED}),
    FreezeState.LIFTED: frozenset(),
}


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` with the calling thread inside ``netns`` (a helper thread does it).

    Sockets keep the namespace they were made in, so this is how an in-process
    service against a lab host opens its packet sockets.
    """
    if netns is None:
        return fn()
    from pyroute2.netns import setns

    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            setns(netns)
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=runner, name=f"netns-{netns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


async def _delete_filter(ipr: Any, index: int) -> bool:
    """Delete the freeze's filter from tap ``index`` (not the qdisc); say whether it was there."""
    try:
        await ipr.tc(
            "del-filter", index=index, parent=CLSACT_EGRESS, protocol=ETH_P_ALL, prio=_FILTER_PRIO
        )
    except NetlinkError:
        return False
    return True


def _disable_ipv6(*links: str) -> None:
    """Turn IPv6 off on ``links`` (in the calling thread's namespace), if it is there."""
    for link in links:
        knob = Path("/proc/sys/net/ipv6/conf") / link / "disable_ipv6"
        with contextlib.suppress(FileNotFoundError):
            knob.write_text("1\n")


class _FrameQueue:
    """Frames of one NIC, in arrival order: memory first, then a spill file."""

    def __init__(self, in_memory: int, spill_dir: Path) -> None:
        self.in_memory = in_memory
        self.spill_dir = spill_dir
        self.memory: list[pcap.Frame] = []
        self._spill: Any = None
        self.spilled = 0

    def __len__(self) -> int:
        return len(self.memory) + self.spilled

    def append(self, frame: pcap.Frame) -> None:
        if self._spill is None and len(self.memory) < self.in_memory:
            self.memory.append(frame)
            return
        if self._spill is None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._spill = tempfile.TemporaryFile(dir=self.spill_dir, prefix="frames-")  # noqa: SIM115
            self._spill.write(pcap.encode_header())
        pcap.append_records(self._spill, [frame])
        self.spilled += 1

    def __iter__(self) -> Iterator[pcap.Frame]:
        yield from self.memory
        if self._spill is not None:
            self._spill.flush()
            self._spill.seek(0)
            yield from pcap.read_records(self._spill, "the frames spilled to disk")

    def clear(self) -> None:
        self.memory.clear()
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        self.spilled = 0


class _Nic:
    """The freeze of one tap."""

    def __init__(
        self, tap: str, limits: FreezeLimits, spill_dir: Path, hold_from: frozenset[bytes] | None
    ) -> None:
        self.tap = tap
        self.hold_from = hold_from  # source MACs whose frames are held; None: all
        self.redirect_end, self.capture_end = freeze_pair(tap)
        self.queue = _FrameQueue(limits.in_memory, spill_dir)
        self.saved: list[pcap.Frame] = []  # loaded from a state: delivered first
        self.capture: socket.socket | None = None
        self.inject: socket.socket | None = None
        self.redirect_mac = b""
        self.tap_index = 0
        self.redirect_index = 0
        self.capture_index = 0
        # Frames the capture end received (the kernel's count, at engage) and
        # those our socket read since (its own count): equal once none is on its way.
        self.rx_base = 0
        self.seen = 0
        self.seen_base = 0


class NicFreeze:
    """Holds the frames addressed to one VM's NICs outside the VM (see module doc)."""

    def __init__(
        self,
        vm: str,
        taps: Sequence[str],
        *,
        netns: str | None = None,
        limits: FreezeLimits | None = None,
        spill_dir: Path | None = None,
        hold_from: Sequence[Sequence[str] | None] = (),
    ) -> None:
        """Freeze ``taps`` of ``vm`` (nothing happens before :meth:`prepare`).

        ``hold_from``: per tap, the source MACs whose frames are held (None or
        missing: all); other frames are not held, only counted in ``ignored``.
        """
        self.vm = vm
        self.netns = netns
        self.limits = limits or FreezeLimits()
        spill = spill_dir or Path(tempfile.gettempdir())
        sources = [
            None if macs is None else frozenset(bytes.fromhex(m.replace(":", "")) for m in macs)
            for macs in hold_from
        ]
        sources += [None] * (len(taps) - len(sources))
        self._nics = [_Nic(t, self.limits, spill, s) for t, s in zip(taps, sources, strict=False)]
        self.state = FreezeState.NEW
        self.history = [FreezeState.NEW]
        self.held = 0
        self.delivered = 0
        self.dropped = 0
        self.stale = 0
        self.ignored = 0  # from outside ``hold_from``: not held
        self.gso = 0  # GSO super-frames held (delivered as captured; see module doc)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_arrival = time.monotonic()
        self._ipr: Any = None
        # Between deliver and lift: frames injected per NIC, the taps' drop
        # counters before, and the restore's boundary of stale frames.
        self._sent: list[int] = []
        self._dropped_before: list[int] = []
        self._discard_before: float | None = None

    def _set(self, state: FreezeState) -> None:
        if state not in _FREEZE_ALLOWED[self.state]:
            raise NetError(
                f"freeze of VM {self.vm}: cannot go from {self.state.value} to {state.value}"
            )
        self.state = state
        self.history.append(state)

    def _where(self, link: str) -> str:
        return f"{link}{' in namespace ' + self.netns if self.netns else ''} (VM {self.vm})"

    # -- prepare ---------------------------------------------------------------

    async def prepare(self) -> None:
        """Make the veth pairs, the qdiscs and the sockets; nothing is held yet.

        Raises:
            NetError: a link, qdisc or socket could not be made (all undone).
        """
        try:
            self._ipr = AsyncIPRoute(netns=self.netns, flags=0) if self.netns else AsyncIPRoute()
            await self._ipr.setup_endpoint()
            for nic in self._nics:
                await self._prepare_nic(nic)
        except (NetlinkError, OSError) as exc:
            await self.lift()
            raise NetError(f"cannot prepare the freeze of VM {self.vm}: {exc}") from exc
        except BaseException:
            await self.lift()
            raise
        for nic in self._nics:
            t = threading.Thread(target=self._capture_loop, args=(nic,), daemon=True)
            t.start()
            self._threads.append(t)
        self._set(FreezeState.PREPARED)

    async def _prepare_nic(self, nic: _Nic) -> None:
        ipr = self._ipr
        taps = await ipr.link_lookup(ifname=nic.tap)
        if not taps:
            raise NetError(f"tap {self._where(nic.tap)} does not exist")
        nic.tap_index = taps[0]
        for end in (nic.redirect_end, nic.capture_end):
            if await ipr.link_lookup(ifname=end):
                await ipr.link("del", ifname=end)
        await ipr.link("add", ifname=nic.redirect_end, kind="veth", peer=nic.capture_end)
        # No IPv6 on the pair: nothing of their own (DAD, router solicitations)
        # mixes with the held frames or their count.
        await asyncio.to_thread(
            in_netns, self.netns, lambda: _disable_ipv6(nic.redirect_end, nic.capture_end)
        )
        for end in (nic.redirect_end, nic.capture_end):
            await ipr.link("set", ifname=end, state="up")
        nic.redirect_index = (await ipr.link_lookup(ifname=nic.redirect_end))[0]
        nic.capture_index = (await ipr.link_lookup(ifname=nic.capture_end))[0]
        links = [link async for link in await ipr.get_links(nic.redirect_index)]
        nic.redirect_mac = bytes.fromhex(str(links[0].get("address")).replace(":", ""))
        await ensure_clsact(ipr, nic.tap_index)  # a tap made before clsact came with taps
        await _delete_filter(ipr, nic.tap_index)

        def sockets() -> tuple[socket.socket, socket.socket]:
            # Protocol 0 receives nothing until bound: a socket made with
            # ETH_P_ALL queues every interface's frames until its bind, and
            # those would be taken for frames held for this VM.
            cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            cap.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF)
            # Each frame with its virtio-net header: deferred checksums show.
            cap.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            cap.bind((nic.capture_end, ETH_P_ALL))
            cap.settimeout(0.05)
            inj = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            inj.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            inj.bind((nic.tap, 0))
            return cap, inj

        nic.capture, nic.inject = in_netns(self.netns, sockets)

    def _capture_loop(self, nic: _Nic) -> None:
        sock = nic.capture
        assert sock is not None
        while not self._stop.is_set():
            try:
                data, addr = sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self._accept(nic, data, addr)

    def _accept(self, nic: _Nic, data: bytes, addr: tuple[object, ...]) -> None:
        """Hold one frame read from the capture socket, if it is one the filter redirected."""
        if addr[2] == PACKET_OUTGOING:  # the capture end's own emission: not received
            return
        try:
            frame, gso = finish_frame(data)
        except ValueError:
            frame, gso = b"", False
        source = frame[6:12]
        with self._lock:
            nic.seen += 1
            if not frame or source == nic.redirect_mac:  # what the redirect end itself sent
                return
            if nic.hold_from is not None and source not in nic.hold_from:
                self.ignored += 1
                return
            self.gso += gso
            self._last_arrival = time.monotonic()
            if self.held - self.delivered >= self.limits.limit:
                self.dropped += 1
                return
            nic.queue.append((time.time(), frame))
            self.held += 1

    def _read_pending(self, nic: _Nic) -> None:
        """Hold every frame still in the capture socket (its reader thread has stopped)."""
        sock = nic.capture
        if sock is None:
            return
        sock.setblocking(False)
        while True:
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._accept(nic, data, addr)

    # -- engage ---------------------------------------------------------------

    async def engage(self) -> None:
        """Start holding: redirect every frame for the VM into our capture.

        Fast (one netlink request per NIC, well under a millisecond): it runs at
        the scheduled instant, just before the VM pauses.

        Raises:
            NetError: a filter could not be added.
        """
        if self.state != FreezeState.PREPARED:
            raise NetError(
                f"freeze of VM {self.vm} is {self.state.value}; engage needs it prepared"
            )
        try:
            for nic in self._nics:
                nic.rx_base = (await self._counters(nic.capture_index))[0]
                with self._lock:
                    nic.seen_base = nic.seen
                await self._ipr.tc(
                    "add-filter",
                    "u32",
                    index=nic.tap_index,
                    parent=CLSACT_EGRESS,
                    protocol=ETH_P_ALL,
                    prio=_FILTER_PRIO,
                    target=0x1,
                    keys=["0x0/0x0+0"],
                    action={
                        "kind": "mirred",
                        "direction": "egress",
                        "action": "redirect",
                        "ifindex": nic.redirect_index,
                    },
                )
        except NetlinkError as exc:
            raise NetError(f"cannot engage the freeze of VM {self.vm}: {exc}") from exc
        self._set(FreezeState.ENGAGED)

    # -- drain / files ------------------------------------------------------------

    async def drain(self, quiet: float, limit: float) -> None:
        """Return once no frame arrived for ``quiet`` s, or after ``limit`` s."""
        end = time.monotonic() + limit
        while (now := time.monotonic()) < end:
            with self._lock:
                since = now - self._last_arrival
            if since >= quiet:
                return
            await asyncio.sleep(min(quiet - since, end - now, 0.05))

    def write_pcaps(self, directory: Path, stem: str) -> list[str]:
        """Write each NIC's held frames to ``<stem>.nic<i>.pcap``; return the file names.

        Raises:
            NetError: a file could not be written.
        """
        names = []
        with self._lock:
            for i, nic in enumerate(self._nics):
                name = f"{stem}.nic{i}.pcap"
                pcap.write_pcap(directory / name, list(nic.queue))
                names.append(name)
        return names

    def load_pcaps(self, paths: Sequence[Path]) -> int:
        """Hold the frames of a state's pcap files (one per NIC, in order) for delivery.

        Returns how many frames were loaded.

        Raises:
            NetError: a file is missing or malformed, or there are more files than NICs.
        """
        if len(paths) > len(self._nics):
            raise NetError(f"VM {self.vm}: {len(paths)} frame files for {len(self._nics)} NICs")
        loaded = 0
        for nic, path in zip(self._nics, paths, strict=False):
            frames = list(pcap.read_pcap(path))
            with self._lock:
                nic.saved.extend(frames)
                self.held += len(frames)
            loaded += len(frames)
        return loaded

    # -- deliver / lift -----------------------------------------------------------

    async def _counters(self, index: int) -> tuple[int, int]:
        """(rx_packets, tx_dropped) of link ``index``; zeros if it cannot be read."""
        try:
            link = next(iter([x async for x in await self._ipr.get_links(index)]))
            stats = link.get("IFLA_STATS64") or link.get("IFLA_STATS") or {}
            return int(stats.get("rx_packets", 0)), int(stats.get("tx_dropped", 0))
        except (NetlinkError, IndexError, OSError):
            return 0, 0

    async def _tx_dropped(self, nic: _Nic) -> int:
        return (await self._counters(nic.tap_index))[1]

    async def _in_flight(self, nic: _Nic) -> int:
        """Frames the capture end received that our socket has not read yet."""
        received = (await self._counters(nic.capture_index))[0] - nic.rx_base
        with self._lock:
            return received - (nic.seen - nic.seen_base)

    async def _settle(self, nic: _Nic) -> None:
        """Wait (bounded) until every frame redirected before the filter went has been read.

        A redirected frame reaches the capture end through the kernel's backlog:
        it can still be on its way when the filter is gone.
        """
        end = time.monotonic() + _SETTLE_LIMIT
        while time.monotonic() < end:
            if await self._in_flight(nic) <= 0:
                return
            await asyncio.sleep(0.001)  # polled: the kernel's count has no event to wait on

    async def _inject(self, nic: _Nic, frames: list[pcap.Frame]) -> int:
        sock = nic.inject
        assert sock is not None
        sent = 0
        for i, (_ts, data) in enumerate(frames):
            try:
                sock.send(data)
                sent += 1
            except OSError:
                with self._lock:
                    self.dropped += 1
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
        return sent

    async def _make_room(self, nic: _Nic) -> None:
        """Lengthen the tap's queue to hold every frame held for it, and more.

        The tap queues what the paused VM does not read; past its length it
        drops. Growing it keeps what is queued (the kernel resizes the ring).
        """
        with self._lock:
            need = len(nic.saved) + len(nic.queue) + _QUEUE_SPARE
        try:
            link = next(iter([x async for x in await self._ipr.get_links(nic.tap_index)]))
            if int(link.get("IFLA_TXQLEN") or 0) < need:
                await self._ipr.link("set", index=nic.tap_index, txqlen=need)
        except (NetlinkError, StopIteration, OSError) as exc:
            raise NetError(
                f"cannot lengthen the queue of tap {self._where(nic.tap)}: {exc}"
            ) from exc

    def _take(self, nic: _Nic, discard_before: float | None) -> list[pcap.Frame]:
        """The live frames held so far, minus those from before ``discard_before``."""
        with self._lock:
            batch = list(nic.queue)
            nic.queue.clear()
            if discard_before is None:
                return batch
            fresh = [f for f in batch if f[0] >= discard_before]
            self.stale += len(batch) - len(fresh)
            self.held -= len(batch) - len(fresh)
            return fresh

    async def queue_saved(self) -> int:
        """Queue a state's frames (:meth:`load_pcaps`) on the taps now; return how many.

        For a restore: the new VM is paused (QEMU reads nothing yet) and no
        frame of its new timeline exists yet, so they are first in its queue.
        What the taps drop is counted as dropped.

        Raises:
            NetError: a tap's queue could not be made long enough.
        """
        before = [await self._tx_dropped(nic) for nic in self._nics]
        queued = 0
        for i, nic in enumerate(self._nics):
            await self._make_room(nic)
            saved, nic.saved = nic.saved, []
            sent = await self._inject(nic, saved)
            lost = max(0, await self._tx_dropped(nic) - before[i])
            with self._lock:
                self.delivered += sent - lost
                self.dropped += lost
            queued += sent - lost
        return queued

    async def deliver(self, discard_before: float | None = None) -> None:
        """Queue the held frames on the taps in order and remove the filters; the VM is paused.

        A state's saved frames go first, then the frames captured live, then
        those arriving meanwhile. With ``discard_before`` (a restore: the
        common resume instant, less a margin), live frames captured before it
        belong to the timeline being replaced and are discarded (counted as
        ``stale``), never delivered (``math.inf``: every live frame). What the
        tap drops is counted as dropped.

        Order: the paused VM reads nothing, so the frames wait in the tap's
        queue in the order injected; once the filter is gone, new frames queue
        behind them. Only a frame sent while the filter goes (on the redirect
        path, a moment after a direct one) could come second; nothing of the
        group is sent then, as every VM of the group is paused.

        Only what must come before the VM resumes is done here (a few netlink
        requests): :meth:`lift`, after the resume, stops the capture and
        removes the rest.

        Raises:
            NetError: a tap's queue could not be made long enough.
        """
        if self.state not in (FreezeState.ENGAGED, FreezeState.PREPARED):
            return
        self._dropped_before = [await self._tx_dropped(nic) for nic in self._nics]
        self._sent = [0] * len(self._nics)
        self._discard_before = discard_before
        for nic in self._nics:
            await self._make_room(nic)
        for i, nic in enumerate(self._nics):
            saved, nic.saved = nic.saved, []
            self._sent[i] = await self._inject(nic, saved)
            while batch := self._take(nic, discard_before):
                self._sent[i] += await self._inject(nic, batch)
        # No frame is redirected once the filters are gone. Those redirected
        # just before may still be on their way to the capture end: wait until
        # the readers have every one (the kernel's count says when) and deliver them.
        for nic in self._nics:
            await self._remove_filter(nic)
        for nic in self._nics:
            await self._settle(nic)
        for i, nic in enumerate(self._nics):
            self._sent[i] += await self._inject(nic, self._take(nic, discard_before))
        self._set(FreezeState.DELIVERED)

    async def _account(self) -> None:
        """After a delivery: stop the readers, deliver what they left, count what was lost.

        Frames that never reached the capture (a full socket dropped them) or
        that a tap dropped are counted as dropped.
        """
        await self._stop_readers()
        for i, nic in enumerate(self._nics):
            self._read_pending(nic)
            self._sent[i] += await self._inject(nic, self._take(nic, self._discard_before))
            missing = max(await self._in_flight(nic), 0)
            lost = max(0, await self._tx_dropped(nic) - self._dropped_before[i])
            with self._lock:
                self.delivered += self._sent[i] - lost
                self.dropped += lost + missing

    async def _stop_readers(self) -> None:
        self._stop.set()
        for t in self._threads:
            await asyncio.to_thread(t.join, 1.0)
        self._threads = []

    async def _remove_filter(self, nic: _Nic) -> None:
        if self._ipr is None or not nic.tap_index:
            return
        await _delete_filter(self._ipr, nic.tap_index)

    async def lift(self) -> None:
        """Remove filters, veths and sockets; frames still held are discarded.

        After :meth:`deliver`, this is where the frames delivered and dropped
        are counted. Idempotent; never raises for what is already gone.
        """
        if self.state == FreezeState.LIFTED:
            return
        if self.state == FreezeState.DELIVERED:
            await self._account()
        for nic in self._nics:
            await self._remove_filter(nic)
        await self._stop_readers()
        for nic in self._nics:
            for s in (nic.capture, nic.inject):
                if s is not None:
                    s.close()
            nic.capture = nic.inject = None
            nic.queue.clear()
            if self._ipr is not None:
                with contextlib.suppress(NetlinkError):
                    if await self._ipr.link_lookup(ifname=nic.redirect_end):
                        await self._ipr.link("del", ifname=nic.redirect_end)
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        self._set(FreezeState.LIFTED)


async def cleanup_freeze_links(*, netns: str | None = None) -> list[str]:
    """Remove every freeze leftover of lockstep's (veth pairs, filters on its taps).

    Called at execd start: a crash mid-freeze must not leave a filter that
    would redirect a VM's frames into a dead socket.

    Raises:
        NetError: netlink could not be reached.
    """
    removed = []
    stale = []
    async with netlink(netns) as ipr:
        async for link in await ipr.get_links():
            name = str(link.get("ifname"))
            m = OUR_LINK.match(name)
            if not m:
                continue
            if m.group(1) == "t":
                if await _delete_filter(ipr, link["index"]):
                    removed.append(f"filter on {name}")
            elif m.group(1) == "f":
                stale.append(name)
    for name in stale:
        if await delete_link(name, netns=netns):
            removed.append(name)
    return removed
