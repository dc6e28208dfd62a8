"""Restored guests' wall clocks, set to true time through the QEMU guest agent.

A restored guest's wall clock goes on from where it was at the save: it is as
old as the state (apt refuses "not valid yet" release files, TLS certificates
and tokens look expired or not yet valid, etcd warns of clock differences).
Right after the switch-over this sets every restored guest's wall clock to
true time with qemu-ga's ``guest-set-time`` (an explicit time, in ns), all
guests at once; their monotonic clocks are not touched, so their heartbeats and
timers see no jump.

True time is the caller's clock: it comes as the caller's time at the resume
instant (:class:`~lockstep.execd.model.GuestTime`), so every guest of the group
gets the same time whatever each host's own clock says.

The agent's latency is compensated: a few ``guest-get-time`` probes first,
timed on this host; the quickest one's round trip, halved, is how long the
set command takes to reach the guest, and the time sent is true time that much
ahead. The quickest probe also says how far behind the guest was: the
correction reported. Then the clock is checked the same way, and set again
while it is measurably more than :data:`TOLERANCE` off: just after a restore
a guest's vCPU waits for a host core often and long (each guest starts with no
translated code), so a first set was seen to take effect 25-140 ms late; the
second one, in a guest caught up, lands within a millisecond.

A libvirt domain's agent channel is libvirt's: the same is done through
libvirt's ``virDomainGetTime``/``virDomainSetTime``.

A VM whose guest has no agent listening (its port closed: no qemu-ga) is
reported as such and not waited for; an agent that fails or does not answer is
reported, never a failure of the restore: the guests run either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from lockstep.errors import LockstepError
from lockstep.execd.vms import HostVm
from lockstep.vm.agent import GuestAgent
from lockstep.vm.domain import Domain
from lockstep.vm.machine import Machine

__all__ = [
    "NO_AGENT",
    "ClockSet",
    "TimeProbe",
    "best_probe",
    "correction_ms",
    "set_again",
    "set_guest_clocks",
    "time_to_send",
]

log = logging.getLogger(__name__)

NO_AGENT = "no guest agent"
PROBES = 3  # guest-get-time round trips before (and after) a set; the quickest one counts
SETS = 3  # at most, while the clock is found off after a set
TOLERANCE = 0.001  # s a guest's clock may be off and stay as set
ANSWER_TIMEOUT = 2.0  # s for the sync and each probe (a guest busy catching up after a restore)
# s for guest-set-time: qemu-ga sets the clock at once, then runs `hwclock -w`
# (which waits for the RTC's next second) before it answers.
SET_TIMEOUT = 5.0


@dataclass(frozen=True)
class TimeProbe:
    """One ``guest-get-time``: sent and answered (this host's clock, s), the guest's time (s)."""

    sent: float
    guest: float
    received: float

    @property
    def rtt(self) -> float:
        """The round trip, s."""
        return self.received - self.sent


@dataclass(frozen=True)
class ClockSet:
    """What became of one guest's wall clock: its correction (ms, None: not set) and why not."""

    vm: str
    correction_ms: float | None = None
    note: str = ""


def best_probe(probes: Sequence[TimeProbe]) -> TimeProbe:
    """The probe with the shortest round trip: the one that says the most.

    Raises:
        ValueError: no probe.
    """
    if not probes:
        raise ValueError("no time probe")
    return min(probes, key=lambda p: p.rtt)


def correction_ms(probe: TimeProbe, shift: float) -> float:
    """How far the guest's clock is behind true time (ms; negative: ahead).

    True time is this host's clock plus ``shift``; the guest read its clock
    about half way through the probe's round trip.
    """
    return ((probe.sent + probe.received) / 2 + shift - probe.guest) * 1000


def set_again(probe: TimeProbe, shift: float, tolerance: float = TOLERANCE) -> bool:
    """Whether the probe shows the clock further off than ``tolerance`` and than it can tell.

    The probe places the guest's reading within half its round trip: an offset
    smaller than that may be none at all.
    """
    off = abs(correction_ms(probe, shift)) / 1000
    return off > tolerance and off > probe.rtt / 2


def time_to_send(true_now: float, probe: TimeProbe) -> int:
    """The time (ns) to send now, so that it is true when the guest sets it.

    The set command reaches the guest about half a round trip after it leaves.
    """
    return round((true_now + probe.rtt / 2) * 1e9)


GetTime = Callable[[], Awaitable[float]]
SetTime = Callable[[int], Awaitable[None]]


async def _probe(get: GetTime, now: Callable[[], float]) -> TimeProbe:
    """The quickest of :data:`PROBES` round trips reading the guest's clock."""
    probes = []
    for _ in range(PROBES):
        sent = now()
        guest = await get()
        probes.append(TimeProbe(sent=sent, guest=guest, received=now()))
    return best_probe(probes)


async def _set_with(
    get: GetTime, put: SetTime, now: Callable[[], float], shift: float
) -> tuple[float, TimeProbe]:
    """Set a guest's clock through ``put`` (ns), checked through ``get``.

    Returns the correction (ms) and the last probe.
    """
    probe = await _probe(get, now)
    behind = correction_ms(probe, shift)
    for _ in range(SETS):
        await put(time_to_send(now() + shift, probe))
        probe = await _probe(get, now)
        if not set_again(probe, shift):
            break
    return behind, probe


async def _set_one(vm: HostVm, now: Callable[[], float], shift: float) -> ClockSet:
    try:
        if not await vm.machine.guest_agent_open():
            return ClockSet(vm.name, note=NO_AGENT)
        if isinstance(vm.machine, Domain):
            # libvirt holds the domain's agent channel: its own calls go through it.
            dom = vm.machine

            async def put_domain(ns: int) -> None:
                await dom.set_guest_time(ns / 1e9)

            behind, probe = await _set_with(dom.guest_time, put_domain, now, shift)
        else:
            assert isinstance(vm.machine, Machine)  # one of the two kinds of VM
            async with GuestAgent(vm.name, vm.machine.paths.agent) as agent:
                await agent.sync(ANSWER_TIMEOUT)

                async def get() -> float:
                    guest_ns = await agent.execute("guest-get-time", timeout=ANSWER_TIMEOUT)
                    return int(guest_ns) / 1e9

                async def put(ns: int) -> None:
                    await agent.execute("guest-set-time", {"time": ns}, timeout=SET_TIMEOUT)

                behind, probe = await _set_with(get, put, now, shift)
    except (LockstepError, ValueError, TypeError) as exc:
        log.warning("VM %s: its wall clock was not set: %s", vm.name, exc)
        return ClockSet(vm.name, note=f"not set: {exc}")
    log.info(
        "VM %s: wall clock moved %+.3f ms; now %+.3f ms off true time (± %.3f ms)",
        vm.name, behind, -correction_ms(probe, shift), probe.rtt * 500,
    )  # fmt: skip
    return ClockSet(vm.name, behind)


async def set_guest_clocks(
    vms: Sequence[HostVm], now: Callable[[], float], shift: float
) -> dict[str, ClockSet]:
    """Set the wall clock of every guest of ``vms`` (running) to true time, all at once.

    ``now`` is this host's clock; true time is ``now() + shift``. Never raises
    for a guest: each one's outcome is in its :class:`ClockSet`.
    """
    sets = await asyncio.gather(*(_set_one(vm, now, shift) for vm in vms))
    return {s.vm: s for s in sets}
