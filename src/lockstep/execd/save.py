"""A save on one host: pause at T, write memory, drain, resume at T or stop, commit; or undo.

The :class:`SaveOperation` owns everything the save makes: its staging state
(invisible until commit), the freezes of its VMs' NICs, the layer each VM's
disk froze at, the pcap files of the frames held and the RAM images of the
fast memory path. Any phase before the commit is undone by :meth:`abort`
(staging dropped, VMs resumed at the caller's common instant with their
frames); a commit is undone when another host failed to commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from lockstep.errors import StateNotFound
from lockstep.execd.clock import background
from lockstep.execd.driver import MEMORY_FILE, RAM_FILE
from lockstep.execd.host import Host, gather_all
from lockstep.execd.instants import freeze_and_pause, resume_at
from lockstep.execd.model import SaveProgress, StateInfo, VmReport
from lockstep.execd.ops import Operation, OperationError, OpKind, OpPhase
from lockstep.execd.vms import HostVm
from lockstep.store import DiskRecord, Manifest, Staging, VmRecord
from lockstep.vm.machine import VmRunstate

__all__ = ["MEMORY_FILE", "RAM_FILE", "SaveOperation", "state_info"]

log = logging.getLogger(__name__)


def state_info(m: Manifest) -> StateInfo:
    """A committed state as this host lists it."""
    return StateInfo(
        name=m.name,
        host=m.host,
        created_at=m.created_at,
        parent=m.parent,
        vms=sorted(m.vms),
        size_bytes=sum(f.size for f in m.files.values()),
    )


@dataclass
class _Kept:
    """What the state keeps of one VM: its frozen disks, those left alone, frames, RAM image."""

    disks: list[DiskRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    frames: list[str] = field(default_factory=list)
    ram: str | None = None


class SaveOperation(Operation):
    """One save of state ``state`` of this host's VMs ``vms``."""

    kind = OpKind.SAVE

    def __init__(
        self,
        host: Host,
        op: str,
        state: str,
        vms: list[str],
        deadline: float,
        *,
        staging: Staging | None = None,
        keep_running: bool = True,
        orphan: bool = False,
    ) -> None:
        super().__init__(host, op, state, vms, deadline, orphan=orphan)
        self.staging = staging
        self.keep_running = keep_running
        self.kept: dict[str, _Kept] = {}
        self.committed: Manifest | None = None

    @classmethod
    def open(
        cls,
        host: Host,
        op: str,
        state: str,
        names: Sequence[str],
        deadline: float,
        *,
        refuse_held: Callable[[Sequence[str]], None],
    ) -> SaveOperation:
        """A new save of ``names`` (every VM of the host if empty); its record is on disk.

        ``refuse_held`` sees the VM names before anything is made.

        Raises:
            OperationError: no VM, a VM is unknown or not running, or
                ``refuse_held`` refused.
            StateExists: the state is already on this host.
        """
        names = list(names) or sorted(host.vms.vms)
        if not names:
            raise OperationError(f"host {host.name} runs no VM to pause")
        refuse_held(names)
        for n in names:
            vm = host.vms.get(n)
            if vm is None:
                raise OperationError(f"host {host.name} runs no VM {n!r}")
            if vm.machine.runstate is not VmRunstate.RUNNING:
                raise OperationError(
                    f"VM {n} on host {host.name} is {vm.machine.runstate.value}, not running"
                )
        operation = cls(host, op, state, names, deadline, staging=host.store.begin(state))
        operation.save_record()
        return operation

    @property
    def awaits_after_commit(self) -> bool:
        """A ``save --stop`` destroys its VMs after the commit."""
        return not self.keep_running

    def extra_record(self) -> dict[str, Any]:
        """A restarted execd must know whether the VMs were to be stopped."""
        return {"keep_running": self.keep_running}

    def _killer(self) -> Callable[[], None]:
        """For the fault hook: SIGKILL the operation's first VM's QEMU."""

        def kill() -> None:
            vms = self.targets()
            if vms and vms[0].machine.pid is not None:
                os.kill(vms[0].machine.pid, 9)

        return kill

    # -- the steps -------------------------------------------------------------

    async def pause(self, at: float) -> list[VmReport]:
        """Freeze each VM's NICs just before ``at`` and pause the VMs at ``at``.

        Raises:
            NetError, VmError: a freeze or a pause failed (the caller aborts).
        """
        self.life.require(OpPhase.OPEN)
        reports = await freeze_and_pause(self.host, self.targets(), at)
        self.advance(OpPhase.PAUSED)
        await self.host.fault.at("pause:after")
        return reports

    async def save_memory(
        self, keep_running: bool, progress: Callable[[SaveProgress], None] | None
    ) -> list[VmReport]:
        """Write each paused VM's memory into the staging state; freeze every disk layer of it.

        With ``keep_running`` each VM moves to fresh layers on top of those the
        state keeps; otherwise the VM will be stopped and its layers are kept as
        they are (each VM's driver does it: :meth:`VmDriver.save`).

        Raises:
            OperationError: the operation is not paused.
            VmError: memory could not be written (disk full, QEMU died...).
        """
        self.life.require(OpPhase.PAUSED)
        self.keep_running = keep_running
        self.save_record()

        async def one(vm: HostVm) -> VmReport:
            assert self.staging is not None

            def report(done: int, total: int) -> None:
                if progress is not None:
                    progress(SaveProgress(vm=vm.name, done=done, total=total))

            saved = await vm.driver.save(
                vm, self.staging.path, keep_running=keep_running, progress=report
            )
            kept = self.kept.setdefault(vm.name, _Kept())
            kept.disks, kept.skipped, kept.ram = saved.disks, saved.skipped, saved.ram
            size = saved.report.memory_bytes
            report(size, size)
            return saved.report

        await self.host.fault.at("save_memory:before", self._killer())
        reports = await gather_all([one(vm) for vm in self.targets()])
        self.advance(OpPhase.SAVED)
        await self.host.fault.at("save_memory:after")
        return reports

    async def drain(self, quiet: float, limit: float) -> list[VmReport]:
        """Capture until quiet, then write each VM's held frames into the state (pcap).

        Quiet means no frame for ``quiet`` s; the wait is bounded by ``limit``
        s. The files are written on a worker thread (the event loop meets other
        calls' instants meanwhile).

        Raises:
            OperationError: the operation's memory is not saved yet.
            NetError: a pcap file could not be written.
        """
        self.life.require(OpPhase.SAVED)
        assert self.staging is not None
        staging = self.staging.path
        targets = self.targets()
        await gather_all([vm.freeze.drain(quiet, limit) for vm in targets if vm.freeze])
        reports = []
        for vm in targets:
            freeze = vm.freeze
            assert freeze is not None
            files = await asyncio.to_thread(freeze.write_pcaps, staging, vm.name)
            self.kept.setdefault(vm.name, _Kept()).frames = files
            reports.append(
                VmReport(
                    name=vm.name,
                    frames_held=freeze.held,
                    frames_dropped=freeze.dropped,
                    frames_ignored=freeze.ignored,
                )
            )
        self.advance(OpPhase.DRAINED)
        await self.host.fault.at("drain:after")
        return reports

    async def resume(self, at: float) -> list[VmReport]:
        """Queue the held frames on the paused VMs' taps, then resume the VMs at ``at``.

        Raises:
            OperationError: the save is not drained, or it stops its VMs (``--stop``).
            VmError: a VM could not be resumed.
        """
        self.life.require(OpPhase.DRAINED)
        await self.host.fault.at("resume:before")
        if not self.keep_running:
            raise OperationError(f"operation {self.id} saves with --stop; its VMs are not resumed")
        reports = await resume_at(self.host, self.targets(), at)
        self.advance(OpPhase.RESUMED)
        await self.host.fault.at("resume:after")
        return reports

    async def commit(self) -> StateInfo:
        """Make the state visible: the staging state is hashed, synced and renamed into place.

        Done at the lowest CPU priority on a worker thread: the running guests
        come first.

        Raises:
            OperationError: the save is not ready to commit.
            StoreError: the state could not be committed (the caller aborts).
        """
        self.life.require(OpPhase.RESUMED if self.keep_running else OpPhase.DRAINED)
        assert self.staging is not None
        manifest = self._manifest()
        await self.host.fault.at("commit:before")
        committed = await asyncio.to_thread(_in_background, self.staging.commit, manifest)
        self.staging = None
        self.committed = committed
        for vm in self.targets():
            vm.runtime.state = self.state
            self.host.vms.persist(vm)
        self.advance(OpPhase.COMMITTED)
        return state_info(committed)

    def _manifest(self) -> Manifest:
        targets = self.targets()
        groups = {vm.runtime.group for vm in targets}
        if len(groups) != 1:
            raise OperationError(
                f"host {self.host.name}: operation {self.id} spans groups"
                f" {', '.join(sorted(groups))}; a state holds one group"
            )
        parents = {vm.runtime.state for vm in targets}
        records = {}
        for vm in targets:
            kept = self.kept.get(vm.name, _Kept())
            records[vm.name] = VmRecord(
                disks=kept.disks,
                skipped=kept.skipped,
                spec=vm.runtime.spec.model_dump(mode="json"),
                memory=MEMORY_FILE.format(vm=vm.name),
                ram=kept.ram,
                frames=kept.frames,
            )
        return Manifest(
            name=self.state,
            group=groups.pop(),
            host=self.host.name,
            created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            parent=parents.pop() if len(parents) == 1 else None,
            vms=records,
            files={},
            complete=True,
        )

    async def stop(self) -> list[VmReport]:
        """Destroy the VMs after a committed ``save --stop``.

        Raises:
            OperationError: the save is not committed, or keeps its VMs running.
        """
        self.life.require(OpPhase.COMMITTED)
        if self.keep_running:
            raise OperationError(f"operation {self.id} keeps its VMs running; none is stopped")
        return await self._destroy()

    async def _destroy(self) -> list[VmReport]:
        targets = self.targets()
        reports = [
            VmReport(name=vm.name, frames_held=vm.freeze.held if vm.freeze else 0) for vm in targets
        ]
        await gather_all([self.host.vms.discard(vm) for vm in targets])
        self.advance(OpPhase.STOPPED)
        return reports

    # -- undo ------------------------------------------------------------------

    async def abort(self, resume_at_: float | None) -> list[VmReport]:
        """Undo the save: its staging or committed state goes; paused VMs resume at ``resume_at_``.

        A committed state is forgotten (its disk layers stay: the VMs run on
        them), because another host failed to commit. VMs already stopped by
        ``--stop`` cannot come back.

        Raises:
            OperationError: the VMs were already stopped after the commit.
        """
        if self.phase is OpPhase.STOPPED:
            raise OperationError(
                f"operation {self.id} is committed and its VMs are stopped; it cannot be undone"
            )
        if self.phase is OpPhase.ABORTED:
            return []
        if self.staging is not None:
            self.staging.abort()
            self.staging = None
        if self.committed is not None:
            with contextlib.suppress(StateNotFound):
                self.host.store.forget(self.state)
            log.info("operation %s: commit of state %r undone", self.id, self.state)
        reports: list[VmReport] = []
        targets = self.targets()
        waiting = (VmRunstate.PAUSED, VmRunstate.SAVED)
        if any(vm.freeze is not None or vm.machine.runstate in waiting for vm in targets):
            reports = await resume_at(self.host, targets, resume_at_)
        self.advance(OpPhase.ABORTED)
        return reports

    async def expire(self) -> None:
        """At the deadline: VMs paused by it resume; a committed ``--stop`` stops them."""
        if self.phase is OpPhase.COMMITTED:  # --stop: the state is safe, do what was asked
            await self._destroy()
            return
        await self.abort(self.deadline)


def _in_background(fn: Callable[[Manifest], Manifest], arg: Manifest) -> Manifest:
    """``fn(arg)`` at the lowest CPU priority (it runs while the VMs do)."""
    with background():
        return fn(arg)
