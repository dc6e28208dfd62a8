"""Acting on VMs at a common instant: freeze and pause them, or queue their frames and resume them.

The caller gives every host the same instant (converted to each host's
clock); these helpers meet it as precisely as the host allows
(:meth:`lockstep.execd.clock.ExecdClock.at_instant`) and report each VM's
instant as QEMU stamped it, on this execd's clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from lockstep.errors import LockstepError
from lockstep.execd.host import Host, gather_all
from lockstep.execd.model import VmReport
from lockstep.execd.vms import HostVm
from lockstep.vm.machine import VmRunstate

__all__ = [
    "announce",
    "deliver_frames",
    "frame_report",
    "freeze_and_pause",
    "lift_freezes",
    "pause_at",
    "resume_at",
]

log = logging.getLogger(__name__)

# An instant met later than this is logged: the skew the caller reports then
# comes from this host being late, not from QEMU.
LATE_S = 0.001


async def freeze_and_pause(host: Host, vms: Sequence[HostVm], at: float) -> list[VmReport]:
    """Freeze each VM's NICs just before ``at``, pause the VMs at ``at``.

    The NICs freeze ``frames_lead`` before the pause (see ExecdConfig): a
    frame that reached QEMU but not yet the guest when the VM stops would be
    dropped by QEMU; the lead lets the guest take it first.

    Raises:
        NetError: a freeze could not be prepared or engaged.
        VmError: a VM could not be paused.
    """
    for vm in vms:
        vm.freeze = host.vms.freeze_for(vm)
        await vm.freeze.prepare()
    # The lead needs no precision: a plain sleep, no spin.
    await asyncio.sleep(max(0.0, at - host.config.frames_lead - host.clock.now()))
    await gather_all([vm.freeze.engage() for vm in vms if vm.freeze is not None])
    return await pause_at(host, vms, at)


async def pause_at(host: Host, vms: Sequence[HostVm], at: float) -> list[VmReport]:
    """Pause the running VMs of ``vms`` at ``at``; report QEMU's STOP instants.

    Raises:
        VmError: a VM could not be paused.
    """
    running = [vm for vm in vms if vm.machine.runstate is VmRunstate.RUNNING]

    async def one(vm: HostVm) -> VmReport:
        wall = await vm.machine.pause()
        return VmReport(name=vm.name, paused_at=host.clock.from_wall(wall))

    qemu = [t for vm in running for t in vm.machine.control_threads()]
    vcpus = [t for vm in running for t in vm.machine.vcpu_threads()]
    async with host.clock.at_instant(at, qemu, vcpus) as late:
        reports = await gather_all([one(vm) for vm in running])
    _log_if_late("pause", late, running)
    return reports


def _log_if_late(action: str, late: float, vms: Sequence[HostVm]) -> None:
    if late > LATE_S and vms:
        log.warning(
            "%s of VMs %s began %.1f ms after its instant: this host got the call, or finished"
            " what comes before it, too late (a busy host?)",
            action, ", ".join(vm.name for vm in vms), late * 1000,
        )  # fmt: skip


async def deliver_frames(vms: Sequence[HostVm], discard_before: float | None) -> None:
    """Queue each paused VM's held frames on its taps and remove its freeze's filters.

    No VM of the group runs then, so nothing can overtake them
    (:meth:`lockstep.net.freeze.NicFreeze.deliver`); the freezes are lifted
    after the VMs resume. ``discard_before``: live frames captured before it
    (host wall clock) are of a replaced timeline.
    """
    await gather_all([vm.freeze.deliver(discard_before) for vm in vms if vm.freeze is not None])


async def lift_freezes(vms: Sequence[HostVm]) -> None:
    """Lift the VMs' freezes (after a delivery: count what was delivered and dropped)."""

    async def one(vm: HostVm) -> None:
        if vm.freeze is None:
            return
        await vm.freeze.lift()
        if vm.freeze.stale:
            log.info("VM %s: %d frames of a replaced timeline discarded", vm.name, vm.freeze.stale)

    await gather_all([one(vm) for vm in vms])


def frame_report(vm: HostVm, resumed_at: float | None) -> VmReport:
    """``vm``'s report: its resume instant and its freeze's frame counts (none without one)."""
    f = vm.freeze
    if f is None:
        return VmReport(name=vm.name, resumed_at=resumed_at)
    return VmReport(
        name=vm.name,
        resumed_at=resumed_at,
        frames_held=f.held,
        frames_delivered=f.delivered,
        frames_dropped=f.dropped,
        frames_ignored=f.ignored,
    )


async def announce(vms: Sequence[HostVm]) -> None:
    """Announce the NICs of ``vms`` (just resumed) to the network: QMP announce-self.

    After a restore (or a switch back) an address may live on another VM than
    machines outside the group last saw; the guests' gratuitous ARPs put their
    ARP caches right. Done after the resume instant, never before it. A VM
    whose QEMU refuses is logged, not failed: it runs, and an outside
    machine's stale cache is no reason to undo a save or restore.
    """
    with_nics = [vm for vm in vms if vm.runtime.spec.nics]
    results = await asyncio.gather(
        *(vm.machine.announce() for vm in with_nics), return_exceptions=True
    )
    for vm, result in zip(with_nics, results, strict=True):
        if isinstance(result, LockstepError):
            log.warning("VM %s: its NICs were not announced: %s", vm.name, result)
        elif isinstance(result, BaseException):
            raise result


async def resume_at(
    host: Host, vms: Sequence[HostVm], at: float | None, *, discard_before: float | None = None
) -> list[VmReport]:
    """Queue the paused VMs' held frames, resume the VMs at ``at``, announce them, lift freezes.

    ``at`` None: as soon as the frames are queued. The VMs resumed are
    announced to the network right after (:func:`announce`). Each report has the VM's
    RESUME instant (None if it was not paused) and its frame counts.

    Raises:
        NetError: a freeze could not be delivered.
        VmError: a VM could not be resumed.
    """
    await deliver_frames(vms, discard_before)
    walls: dict[str, float] = {}

    async def wake(vm: HostVm) -> None:
        if vm.machine.runstate in (VmRunstate.PAUSED, VmRunstate.SAVED):
            walls[vm.name] = await vm.machine.resume()

    qemu = [t for vm in vms for t in vm.machine.control_threads()]
    async with host.clock.at_instant(at if at is not None else host.clock.now(), qemu) as late:
        await gather_all([wake(vm) for vm in vms])
    if at is not None:
        _log_if_late("resume", late, [vm for vm in vms if vm.name in walls])
    await announce([vm for vm in vms if vm.name in walls])
    await lift_freezes(vms)
    reports = []
    for vm in vms:
        wall = walls.get(vm.name)
        reports.append(frame_report(vm, None if wall is None else host.clock.from_wall(wall)))
        vm.freeze = None
    return reports
