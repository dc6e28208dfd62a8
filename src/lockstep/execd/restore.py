"""A restore on one host, atomic: the new VMs made ready beside the running ones, then swapped in.

Each VM of the state is a :class:`~lockstep.execd.driver.Replacement` of its
driver. While the running VMs run on, every host prepares all it can
(:meth:`RestoreOperation.prepare`): for lockstep's QEMU driver the whole new
VM (QEMU paused on a fresh layer, memory loaded, NICs frozen, the state's
frames queued, on the VM's spare taps); for a libvirt domain, which cannot
exist twice, its fresh layers and XML. Nothing of the running group changes,
so any failure before the switch-over discards what was prepared and the group
runs on untouched.

The switch-over pauses the old VMs at one instant on every host, swaps each
new VM in (:meth:`RestoreOperation.switch`: the old taps leave the bridges; a
libvirt domain is saved aside and the state's domain restored paused, its taps
frozen and its frames queued), lets the old timeline's last frames arrive and
drops them, and resumes the new VMs at a second common instant
(:meth:`RestoreOperation.resume`). A group of QEMU VMs only does it in one
call: the old VMs pause ``SWITCH_LEAD`` before the new ones resume. Until the
commit, an abort (or the dead-man's timer at the deadline, on every host at
once) swaps back: the old VMs come back (a libvirt domain from what was saved
aside) and resume at a common instant.

Faults injected into the group (:mod:`lockstep.execd.inject`) end with the
switch-over: its freezes as it begins (the frozen VM is replaced), its network
faults once the new VMs run (they run on other taps, or are frozen anew, and
no rule names them).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lockstep.errors import LockstepError
from lockstep.execd.driver import Replacement
from lockstep.execd.guest_clock import set_guest_clocks
from lockstep.execd.host import Host, gather_all
from lockstep.execd.instants import pause_at, resume_at
from lockstep.execd.model import GuestTime, VmReport
from lockstep.execd.ops import Operation, OperationError, OpKind, OpPhase
from lockstep.execd.vms import HostVm
from lockstep.group import VmSpec
from lockstep.store import Manifest
from lockstep.vm.machine import VmRunstate

__all__ = ["SWITCH_LEAD", "RestoreOperation"]

log = logging.getLogger(__name__)

# The old VMs pause this long before the new ones resume, when both are done
# in one call: time to take their taps out of the bridges, let the old
# timeline's last frames arrive (they are dropped) and lift the new VMs'
# freezes. It is the switch-over's whole cost for lockstep's QEMU driver.
SWITCH_LEAD = 0.03
_SETTLE = 0.003  # s after the old VMs paused before their last frames count as arrived
_QUIET = 0.002  # s without a frame that count as quiet then
_QUIET_LIMIT = 0.006  # s: the longest that wait


class RestoreOperation(Operation):
    """One restore of state ``state`` on this host."""

    kind = OpKind.RESTORE

    def __init__(
        self,
        host: Host,
        op: str,
        state: str,
        vms: list[str],
        deadline: float,
        *,
        manifest: Manifest | None = None,
        orphan: bool = False,
    ) -> None:
        super().__init__(host, op, state, vms, deadline, orphan=orphan)
        self.manifest = manifest
        self.swaps: dict[str, Replacement] = {}  # by VM, in name order

    @property
    def folder(self) -> Path:
        """Where the new VMs' files are until the commit moves them home."""
        return self.host.vms.restoring / self.id

    @property
    def new(self) -> dict[str, HostVm]:
        """The VMs being restored, those that exist yet."""
        return {n: rep.new for n, rep in self.swaps.items() if rep.new is not None}

    @property
    def old(self) -> dict[str, HostVm]:
        """The VMs they replace, once swapped."""
        return {n: rep.old for n, rep in self.swaps.items() if rep.old is not None}

    @classmethod
    def open(
        cls,
        host: Host,
        op: str,
        state: str,
        deadline: float,
        *,
        refuse_held: Callable[[Sequence[str]], None],
    ) -> RestoreOperation:
        """A new restore of ``state``; its record is on disk before any new VM starts.

        ``refuse_held`` sees the state's VM names before anything is made.

        Raises:
            StateNotFound: the state is not (completely) on this host.
            OperationError: ``refuse_held`` refused.
        """
        manifest = host.store.show(state)
        names = sorted(manifest.vms)
        refuse_held(names)
        operation = cls(host, op, state, names, deadline, manifest=manifest)
        operation.save_record()
        return operation

    def extra_record(self) -> dict[str, Any]:
        """What each replacement needs, so a restarted execd can finish or undo the restore."""
        return {"new": {name: rep.record() for name, rep in self.swaps.items()}}

    def held_chains(self) -> dict[str, list[str]]:
        """The layer chains of the new VMs before the switch-over, of the old ones after."""
        held = {}
        for rep in self.swaps.values():
            held.update(rep.held_layers())
        return held

    # -- prepare -------------------------------------------------------------------

    async def prepare(self) -> list[VmReport]:
        """Make ready every VM of the state beside the running one (see the module docstring).

        On any failure everything prepared so far is discarded (the running
        VMs were never touched) and the operation ends.

        Raises:
            VmError, NetError, DiskError: a new VM could not be made ready.
        """
        self.life.require(OpPhase.OPEN)
        assert self.manifest is not None
        await self.host.fault.at("prepare_restore:before")
        try:
            for name, rec in sorted(self.manifest.vms.items()):
                driver = self.host.driver(VmSpec.model_validate(rec.spec))
                self.swaps[name] = driver.replacement(
                    self.id, self.manifest.group, self.state, name, rec
                )
            self.save_record()
            reports = await gather_all([rep.prepare() for rep in self.swaps.values()])
        except BaseException:
            with contextlib.suppress(LockstepError):
                await self._discard_new()
            self.advance(OpPhase.ABORTED)
            raise
        self.save_record()
        self.advance(OpPhase.PREPARED)
        await self.host.fault.at("prepare_restore:after")
        return reports

    # -- the switch-over ------------------------------------------------------------

    async def switch(self, at: float) -> list[VmReport]:
        """Pause the old VMs at ``at`` and put the new ones in their place, paused.

        Each report has the old VM's pause instant (none if the VM did not
        run here before, or was not running: crashed, or frozen by a fault).
        The group's injected freezes end here. Then the new VMs wait, frozen,
        for :meth:`resume`.

        Raises:
            OperationError: the restore is not prepared.
            VmError, NetError: the switch failed (the caller aborts: it swaps back).
        """
        self.life.require(OpPhase.PREPARED)
        assert self.manifest is not None  # a prepared restore has its manifest
        self.host.faults.end_freezes(self.manifest.group)
        olds = {n: vm for n in self.swaps if (vm := self.host.vms.get(n)) is not None}
        # From here on an undo swaps back and resumes the old VMs, whatever failed.
        self.advance(OpPhase.SWITCHED)
        # An old VM whose QEMU died (the crash a test made: why it restores) has nothing to pause.
        alive = [vm for vm in olds.values() if vm.machine.alive()]
        paused = await pause_at(self.host, alive, at)
        await gather_all([rep.swap(olds.get(n)) for n, rep in self.swaps.items()])
        self.save_record()
        # The old timeline's last frames (sent just before its VMs paused, on
        # any host) arrive at the new taps' freezes, and are dropped with the rest.
        await asyncio.sleep(max(0.0, at + _SETTLE - self.host.clock.now()))
        news = list(self.new.values())
        await gather_all([vm.freeze.drain(_QUIET, _QUIET_LIMIT) for vm in news if vm.freeze])
        return [VmReport(name=r.name, paused_at=r.paused_at) for r in paused]

    async def resume(self, at: float, guest_time: GuestTime | None = None) -> list[VmReport]:
        """Resume the new VMs at ``at`` with their frames (switching over first if not yet).

        Switched over in one call, the old VMs pause at ``at - SWITCH_LEAD``.
        Each report has the new VM's resume instant and frames, and the old
        VM's pause instant if it paused in this call. The group's injected
        network faults end here (see the module's docstring). Then the wall
        clocks of the guests ``guest_time`` names are set to true time
        (:mod:`lockstep.execd.guest_clock`; each report says by how much, or why not).

        Raises:
            OperationError: the restore is not prepared or switched.
            VmError, NetError: the switch-over failed (the caller aborts: it
                swaps back).
        """
        self.life.require(OpPhase.PREPARED, OpPhase.SWITCHED)
        await self.host.fault.at("resume:before")
        paused: dict[str, float | None] = {}
        if self.phase is OpPhase.PREPARED:
            paused = {r.name: r.paused_at for r in await self.switch(at - SWITCH_LEAD)}
        news = list(self.new.values())
        reports = await resume_at(self.host, news, at, discard_before=math.inf)
        for vm in news:
            self.host.vms.register(vm)
        self.advance(OpPhase.RESUMED)
        assert self.manifest is not None  # a prepared restore has its manifest
        await self.host.faults.switched_over(self.manifest.group)
        await self.host.fault.at("resume:after")
        clocks = {}
        if guest_time is not None:
            shift = guest_time.true_at - at
            chosen = [vm for vm in news if vm.name in guest_time.vms]
            clocks = await set_guest_clocks(chosen, self.host.clock.now, shift)
        out = []
        for r in reports:
            clock = clocks.get(r.name)
            if clock is not None:
                r = dataclasses.replace(
                    r, clock_correction_ms=clock.correction_ms, clock_note=clock.note
                )
            out.append(dataclasses.replace(r, paused_at=paused.get(r.name)))
        return out

    async def commit(self) -> None:
        """The old VMs go for good and the new ones' files move home; the restore is done.

        Raises:
            OperationError: the restore has not switched over.
        """
        self.life.require(OpPhase.RESUMED)
        await gather_all([rep.commit() for rep in self.swaps.values()])
        shutil.rmtree(self.folder, ignore_errors=True)
        self.swaps = {}
        self.advance(OpPhase.COMMITTED)
        self.host.collect_garbage()

    # -- undo ----------------------------------------------------------------------

    async def _discard_new(self) -> None:
        """Drop every new VM and what was made for it; the running VMs stay."""
        swaps = list(self.swaps.values())
        failures = await asyncio.gather(*(rep.discard() for rep in swaps), return_exceptions=True)
        self.swaps = {}
        shutil.rmtree(self.folder, ignore_errors=True)
        self.host.collect_garbage()
        for failure in failures:
            if isinstance(failure, BaseException):
                raise failure

    async def abort(self, resume_at_: float | None) -> list[VmReport]:
        """Undo the restore; the VMs it was to replace run (again).

        Before the switch-over what was prepared is discarded and the running
        VMs never noticed. After it, it swaps back: the new VMs pause, the old
        ones come back and resume at ``resume_at_``, then the new ones are
        discarded.

        Raises:
            OperationError: the restore is committed.
        """
        if self.phase is OpPhase.COMMITTED:
            raise OperationError(f"operation {self.id} is committed; it cannot be aborted")
        if self.phase is OpPhase.ABORTED:
            return []
        reports: list[VmReport] = []
        names = list(self.swaps)
        try:
            if self.phase in (OpPhase.SWITCHED, OpPhase.RESUMED):
                reports = await self._switch_back(resume_at_)
            await self._discard_new()
        finally:
            self.advance(OpPhase.ABORTED)
        return reports or [VmReport(name=n) for n in names]

    async def _switch_back(self, at: float | None) -> list[VmReport]:
        when = at if at is not None else self.host.clock.now() + SWITCH_LEAD
        news = [vm for vm in self.new.values() if vm.machine.runstate is VmRunstate.RUNNING]
        await pause_at(self.host, news, when - SWITCH_LEAD)

        async def back(rep: Replacement) -> HostVm | None:
            if not rep.swapped:  # paused, perhaps, but still in place
                return self.host.vms.get(rep.name)
            old = await rep.swap_back()
            rep.old = None
            return old

        olds = [vm for vm in await gather_all([back(r) for r in self.swaps.values()]) if vm]
        reports = await resume_at(self.host, olds, when)
        for vm in olds:
            self.host.vms.register(vm)
        return reports

    async def expire(self) -> None:
        """At the deadline, with no word from the caller, the restore is undone.

        Before the switch-over what was prepared goes. After it, the host
        swaps back at the deadline, a common instant with every other host: a
        caller that never committed never said "restored", and one that failed
        after the switch-over aborted everywhere it could reach.
        """
        switched = self.phase in (OpPhase.SWITCHED, OpPhase.RESUMED)
        await self.abort(self.deadline if switched else None)

    # -- after an execd restart ------------------------------------------------------

    async def adopt(self, records: dict[str, Any]) -> None:
        """Take back the replacements an earlier execd recorded (``records``, by VM).

        Before the switch-over they are discarded at once (the running VMs
        never changed). After it, the new VMs are what this host runs; the old
        ones wait for an abort or the deadline (a swap back).
        """
        for name, record in sorted(records.items()):
            # An execd of before recorded a QEMU VM's folder alone.
            data = {"driver": "qemu", "rundir": record} if isinstance(record, str) else record
            switched = self.phase in (OpPhase.SWITCHED, OpPhase.RESUMED)
            try:
                driver = self.host.drivers[str(data.get("driver"))]
                rep = driver.adopt_replacement(name, data)
                await rep.adopt_after_restart(self.host.vms.get(name), switched=switched)
            except (LockstepError, KeyError, OSError, ValueError, TypeError) as exc:
                log.warning(
                    "restore %s: VM %s's replacement not taken back: %s", self.id, name, exc
                )
                continue
            self.swaps[name] = rep
        if self.phase not in (OpPhase.SWITCHED, OpPhase.RESUMED):
            await self.abort(None)
            return
        if self.phase is OpPhase.RESUMED:
            for rep in self.swaps.values():
                if rep.new is not None:
                    self.host.vms.register(rep.new)
