"""A restore on one host, atomic: the new VMs are made beside the running ones, then switched to.

The running VMs keep running while every host prepares the new ones
(:meth:`RestoreOperation.prepare`): a fresh layer over the state's layer, QEMU
started paused in ``restoring/<op>/<vm>/`` on the VM's spare tap names, its
memory loaded, its taps frozen (frames of the running timeline are captured,
never delivered) and the state's held frames queued on its taps. Nothing of
the running group changes, so any failure before the switch-over discards the
new VMs and the group runs on untouched.

The switch-over (:meth:`RestoreOperation.resume`, at the caller's common
instant ``at``) pauses the old VMs at ``at - SWITCH_LEAD`` on every host, takes
their taps out of the bridges, lets the old timeline's last frames arrive and
drops them, lifts the new VMs' freezes and resumes the new VMs at ``at``. The
old VMs stay paused until the commit quits them and moves the new VMs' files
home; an abort after the switch-over switches back, and so does the dead-man's
timer at the deadline (on every host at once) if the caller went quiet.

Faults injected into the group (:mod:`lockstep.execd.inject`) end with the
switch-over: its freezes as it begins (the frozen VM is replaced), its network
faults once the new VMs run (they run on other taps, which no rule names).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from lockstep import disk
from lockstep.errors import LockstepError, VmError
from lockstep.execd.guest_clock import set_guest_clocks
from lockstep.execd.host import Host, gather_all
from lockstep.execd.instants import pause_at, resume_at
from lockstep.execd.model import GuestTime, VmReport
from lockstep.execd.ops import Operation, OperationError, OpKind, OpPhase
from lockstep.execd.vms import VM_RECORD, HostVm, VmRuntime
from lockstep.group import VmSpec
from lockstep.store import Manifest, VmRecord
from lockstep.vm import memory

__all__ = ["SWITCH_LEAD", "RestoreOperation"]

log = logging.getLogger(__name__)

# The old VMs pause this long before the new ones resume: time to take their
# taps out of the bridges, let the old timeline's last frames arrive (they are
# dropped) and lift the new VMs' freezes. It is the switch-over's whole cost.
SWITCH_LEAD = 0.03
_SETTLE = 0.003  # s after the old VMs paused before their last frames count as arrived
_QUIET = 0.002  # s without a frame that count as quiet then
_QUIET_LIMIT = 0.006  # s: the longest that wait


def _kill(vm: HostVm) -> None:
    """For the fault hook: SIGKILL a new VM's QEMU (as if it crashed while loading)."""
    if vm.machine.pid is not None:
        os.kill(vm.machine.pid, signal.SIGKILL)


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
        self.new: dict[str, HostVm] = {}  # the VMs being restored
        self.old: dict[str, HostVm] = {}  # the VMs they replace, once switched over

    @property
    def folder(self) -> Path:
        """Where the new VMs' files are until the commit moves them home."""
        return self.host.vms.restoring / self.id

    @classmethod
    def open(cls, host: Host, op: str, state: str, deadline: float) -> RestoreOperation:
        """A new restore of ``state``; its record is on disk before any new VM starts.

        Raises:
            StateNotFound: the state is not (completely) on this host.
        """
        manifest = host.store.show(state)
        operation = cls(host, op, state, sorted(manifest.vms), deadline, manifest=manifest)
        operation.save_record()
        return operation

    def extra_record(self) -> dict[str, Any]:
        """Where the new VMs are, so a restarted execd can finish or undo the restore."""
        return {"new": {name: str(vm.rundir) for name, vm in self.new.items()}}

    def held_chains(self) -> dict[str, list[str]]:
        """The layer chains of the new VMs before the switch-over, of the old ones after."""
        held = {}
        for which, vms in (("being restored", self.new), ("being replaced", self.old)):
            for name, vm in vms.items():
                if self.host.vms.get(name) is not vm and vm.runtime.chain:
                    held[f"{name} ({which})"] = vm.runtime.chain
        return held

    # -- prepare -------------------------------------------------------------------

    async def prepare(self) -> list[VmReport]:
        """Make every VM of the state beside the running one, paused, its frames queued.

        On any failure every new VM made so far is discarded (the running VMs
        were never touched) and the operation ends.

        Raises:
            VmError, NetError, DiskError: a new VM could not be made.
        """
        self.life.require(OpPhase.OPEN)
        assert self.manifest is not None
        await self.host.fault.at("prepare_restore:before")
        try:
            reports = await gather_all(
                [self._prepare_one(n, r) for n, r in sorted(self.manifest.vms.items())]
            )
        except BaseException:
            with contextlib.suppress(LockstepError):
                await self._discard_new()
            self.advance(OpPhase.ABORTED)
            raise
        self.advance(OpPhase.PREPARED)
        await self.host.fault.at("prepare_restore:after")
        return reports

    async def _prepare_one(self, name: str, rec: VmRecord) -> VmReport:
        assert self.manifest is not None
        host, state_dir = self.host, self.host.store.states_dir / self.state
        spec = VmSpec.model_validate(rec.spec)
        running = host.vms.get(name)
        runtime = VmRuntime(
            spec=spec,
            group=self.manifest.group,
            taps=host.vms.taps(
                self.manifest.group, spec, avoid=running.runtime.taps if running else ()
            ),
            state=self.state,
        )
        rundir = self.folder / name
        rundir.mkdir(parents=True, exist_ok=True)
        vm = host.vms.new_vm(runtime, rundir)
        self.new[name] = vm
        self.save_record()
        if rec.layer is not None:
            layers = host.store.layers_dir
            plan = disk.plan_fresh_overlay(layers, name, disk.layer_path(layers, rec.layer))
            await disk.create_overlay(plan)
            runtime.layer = plan.layer_id
            runtime.chain = [*rec.chain, plan.layer_id]
        ram = await asyncio.to_thread(
            memory.restore_ram,
            spec,
            None if rec.ram is None else state_dir / rec.ram,
            vm.machine.paths.ram,
            state=self.state,
        )
        runtime.ram = None if ram.ram is None else str(ram.ram.path)
        runtime.ram_shared = ram.ram is not None and ram.ram.shared
        runtime.memory_note = ram.later
        # Frozen before QEMU opens the taps: a frame of the running timeline
        # must never wait in a new tap's queue; the freeze takes it, and it is
        # dropped at the switch-over.
        await host.vms.make_taps(runtime)
        vm.freeze = host.vms.freeze_for(vm)
        await vm.freeze.prepare()
        await vm.freeze.engage()
        await host.vms.start(vm, incoming=True)
        host.vms.persist(vm)
        assert rec.memory is not None
        await host.fault.at("prepare_restore:load", lambda: _kill(vm))
        await vm.machine.load_memory(state_dir / rec.memory, ignore_shared=ram.fast)
        # The state's frames go first in the new VM's queue: it reads nothing
        # until it resumes, and nothing of its new timeline exists yet.
        loaded = vm.freeze.load_pcaps([state_dir / f for f in rec.frames])
        await vm.freeze.queue_saved()
        return VmReport(
            name=name,
            frames_held=loaded,
            memory_path="fast" if ram.fast else "standard",
            memory_note=ram.note,
        )

    # -- the switch-over ------------------------------------------------------------

    async def resume(self, at: float, guest_time: GuestTime | None = None) -> list[VmReport]:
        """Switch over: the old VMs pause at ``at - SWITCH_LEAD``, the new ones resume at ``at``.

        Each report has the new VM's resume instant and frames, and the old
        VM's pause instant (none if the VM did not run here before, or was
        not running: crashed, or frozen by a fault). The group's injected
        faults end here (see the module's docstring). Then the wall clocks of
        the guests ``guest_time`` names are set to true time
        (:mod:`lockstep.execd.guest_clock`; each report says by how much, or why not).

        Raises:
            OperationError: the restore is not prepared.
            VmError, NetError: the switch-over failed (the caller aborts: it
                switches back).
        """
        self.life.require(OpPhase.PREPARED)
        await self.host.fault.at("resume:before")
        assert self.manifest is not None  # a prepared restore has its manifest
        self.host.faults.end_freezes(self.manifest.group)
        self.old = {n: vm for n in self.new if (vm := self.host.vms.get(n)) is not None}
        olds, news = list(self.old.values()), list(self.new.values())
        stop_at = at - SWITCH_LEAD
        # An old VM whose QEMU died (the crash a test made: why it restores) has nothing to pause.
        alive = [vm for vm in olds if vm.machine.alive()]
        paused = {r.name: r.paused_at for r in await pause_at(self.host, alive, stop_at)}
        await gather_all([self.host.vms.bridge_taps(vm, attached=False) for vm in olds])
        # The old timeline's last frames (sent just before its VMs paused, on
        # any host) arrive at the new taps' freezes, and are dropped with the rest.
        await asyncio.sleep(max(0.0, stop_at + _SETTLE - self.host.clock.now()))
        await gather_all([vm.freeze.drain(_QUIET, _QUIET_LIMIT) for vm in news if vm.freeze])
        reports = await resume_at(self.host, news, at, discard_before=math.inf)
        for vm in news:
            self.host.vms.register(vm)
        self.advance(OpPhase.RESUMED)
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
        """Quit the old VMs and move the new VMs' files home; the restore is done.

        Raises:
            OperationError: the restore has not switched over.
        """
        self.life.require(OpPhase.RESUMED)
        # The replaced VMs' memory and disk layers are of no more use: kill them.
        await gather_all([self.host.vms.discard(vm, graceful=False) for vm in self.old.values()])
        for vm in self.new.values():
            self.host.vms.move_home(vm)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.old, self.new = {}, {}
        self.advance(OpPhase.COMMITTED)
        self.host.collect_garbage()

    # -- undo ----------------------------------------------------------------------

    async def _discard_new(self) -> None:
        """Quit every new VM, remove its taps, folder and layer; the running VMs stay."""
        new, self.new = self.new, {}
        failures = await asyncio.gather(
            *(self.host.vms.discard(vm, graceful=False) for vm in new.values()),
            return_exceptions=True,
        )
        shutil.rmtree(self.folder, ignore_errors=True)
        self.host.collect_garbage()
        for failure in failures:
            if isinstance(failure, BaseException):
                raise failure

    async def abort(self, resume_at_: float | None) -> list[VmReport]:
        """Undo the restore; the VMs it was to replace run (again).

        Before the switch-over the new VMs are discarded and the running ones
        never noticed. After it, it switches back: the new VMs pause, the old
        ones get their taps back and resume at ``resume_at_``, then the new VMs
        are discarded.

        Raises:
            OperationError: the restore is committed.
        """
        if self.phase is OpPhase.COMMITTED:
            raise OperationError(f"operation {self.id} is committed; it cannot be aborted")
        if self.phase is OpPhase.ABORTED:
            return []
        reports: list[VmReport] = []
        if self.phase is OpPhase.RESUMED:
            reports = await self._switch_back(resume_at_)
        names = list(self.new)
        try:
            await self._discard_new()
        finally:
            self.advance(OpPhase.ABORTED)
        return reports or [VmReport(name=n) for n in names]

    async def _switch_back(self, at: float | None) -> list[VmReport]:
        news, olds = list(self.new.values()), list(self.old.values())
        when = at if at is not None else self.host.clock.now() + SWITCH_LEAD
        await pause_at(self.host, news, when - SWITCH_LEAD)
        await gather_all([self.host.vms.bridge_taps(vm, attached=False) for vm in news])
        await gather_all([self.host.vms.bridge_taps(vm, attached=True) for vm in olds])
        reports = await resume_at(self.host, olds, when)
        for vm in olds:
            self.host.vms.register(vm)
        self.old = {}
        return reports

    async def expire(self) -> None:
        """At the deadline, with no word from the caller, the restore is undone.

        Before the switch-over the new VMs go. After it, the host switches back
        at the deadline, a common instant with every other host: a caller that
        never committed never said "restored", and one that failed after the
        switch-over aborted everywhere it could reach.
        """
        await self.abort(self.deadline if self.phase is OpPhase.RESUMED else None)

    # -- after an execd restart ------------------------------------------------------

    async def adopt(self, new_dirs: dict[str, str]) -> None:
        """Take back the new VMs found in ``new_dirs`` after an execd restart.

        Before the switch-over they are discarded at once (the running VMs
        never changed). After it they run and are what this host runs; the
        old ones, paused, wait for an abort or the deadline (a switch back).
        """
        for name, folder in sorted(new_dirs.items()):
            rundir = Path(folder)
            try:
                runtime = VmRuntime.from_json((rundir / VM_RECORD).read_text())
            except (OSError, ValueError, TypeError) as exc:
                log.warning("restore %s: VM %s's record is unreadable: %s", self.id, name, exc)
                shutil.rmtree(rundir, ignore_errors=True)
                continue
            vm = self.host.vms.new_vm(runtime, rundir)
            try:
                await vm.machine.attach()
            except VmError as exc:
                log.warning("restore %s: VM %s not re-attached: %s", self.id, name, exc)
            self.new[name] = vm
        if self.phase is not OpPhase.RESUMED:
            await self.abort(None)
            return
        for name, vm in self.new.items():
            old = self.host.vms.get(name)
            if old is not None and old is not vm:
                self.old[name] = old
            self.host.vms.register(vm)
