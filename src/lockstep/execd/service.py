"""The execd service: one host's VMs, operations and states. No gRPC here.

It composes the parts of an execd and hands each call to the part it is for:

- the VMs this host runs (:class:`~lockstep.execd.vms.VmRegistry`): up, down, status;
- the operations in progress, one object each (:class:`~lockstep.execd.save.SaveOperation`,
  :class:`~lockstep.execd.restore.RestoreOperation`): every step of a save or
  restore, abort and extend; their records (:class:`~lockstep.execd.journal.Journal`)
  and the dead-man's timer (:class:`~lockstep.execd.deadman.DeadMan`);
- the committed states (:class:`~lockstep.execd.states.StateCatalog`);
- the faults a user injected (:class:`~lockstep.execd.inject.FaultBook`).

What it must survive a restart with is on disk: each VM's ``run/<vm>/vm.json``
next to QEMU's pid file and QMP socket, and each operation's record, so
:meth:`HostService.start` re-attaches to the VMs it left running and takes its
operations back (they can then only be aborted or expire).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from lockstep.errors import LockstepError, VmError
from lockstep.execd.clock import ExecdClock
from lockstep.execd.deadman import DeadMan
from lockstep.execd.fault import Fault
from lockstep.execd.host import Host, gather_all
from lockstep.execd.inject import FaultBook
from lockstep.execd.journal import Journal
from lockstep.execd.libvirt_driver import LibvirtDriver
from lockstep.execd.model import (
    ExecdConfig,
    FaultAction,
    FaultReply,
    GuestTime,
    ProbeReply,
    SaveProgress,
    StateInfo,
    VmReport,
    VmStatus,
)
from lockstep.execd.ops import Operation, OperationError, OpKind, OpPhase
from lockstep.execd.qemu_driver import QemuDriver
from lockstep.execd.restore import RestoreOperation
from lockstep.execd.save import SaveOperation
from lockstep.execd.states import StateCatalog
from lockstep.execd.vms import VM_RECORD, VmRegistry, VmRuntime
from lockstep.group import VmSpec, validate_name
from lockstep.net.freeze import cleanup_freeze_links
from lockstep.net.links import OUR_LINK, delete_link, list_links
from lockstep.store import StateStore, Verified
from lockstep.vm.machine import VmRunstate

__all__ = ["HostService"]

log = logging.getLogger(__name__)

Op = TypeVar("Op", bound=Operation)
_RECENT = 32  # committed saves kept for an undo, should another host fail to commit


class HostService:
    """One host's execd, transport-free (see :class:`lockstep.execd.api.ExecdApi`)."""

    def __init__(self, config: ExecdConfig) -> None:
        validate_name("host", config.host)
        self.config = config
        self.clock = ExecdClock(config.clock_offset)
        self.store = StateStore(config.root)
        self.vms = VmRegistry(config, self.store)
        self.faults = FaultBook(config.host, self.vms, netns=config.netns)
        self.host = Host(
            config=config,
            clock=self.clock,
            store=self.store,
            vms=self.vms,
            journal=Journal(self.vms.rundir / "ops"),
            fault=Fault.from_env(),
            faults=self.faults,
            chains_in_use=self._chains_in_use,
        )
        self.host.drivers.update(
            {d.kind: d for d in (QemuDriver(self.host), LibvirtDriver(self.host))}
        )
        self.catalog = StateCatalog(self.host)
        self.ops: dict[str, Operation] = {}
        self._recent: OrderedDict[str, SaveOperation] = OrderedDict()
        self.deadman = DeadMan(
            self.clock.now, lambda: list(self.ops.values()), self._expire, self._close
        )
        self._lock = asyncio.Lock()

    # -- lifecycle of the service -------------------------------------------

    async def start(self) -> None:
        """Clean up after a crash, re-attach to the VMs left running, take operations back.

        Staging states are dropped (a save that did not commit never
        happened), leftover freeze links are removed, every VM whose QEMU
        still runs is driven again, and every operation on record comes back
        as an orphan: a restore's new VMs are discarded (or, switched over,
        kept), paused VMs of a save resume at its deadline (a common instant
        with the other hosts); a save that had resumed its VMs ends at once.
        Paused VMs of no operation resume now (a VM frozen by a fault too),
        and the fault rules of the VMs' groups go: a restarted execd holds no
        fault.
        """
        for folder in (self.vms.rundir, self.store.layers_dir, self.vms.restoring):
            folder.mkdir(parents=True, exist_ok=True)
        for left in self.store.cleanup_staging():
            log.info("removed staging state left by a crash: %s", left)
        for link in await cleanup_freeze_links(netns=self.config.netns):
            log.info("removed freeze link left by a crash: %s", link)
        for record in sorted(self.vms.rundir.glob(f"*/{VM_RECORD}")):
            runtime = VmRuntime.from_json(record.read_text())
            try:
                vm = await self.host.driver(runtime.spec).adopt(runtime, record.parent)
            except VmError as exc:
                log.warning("VM %s not re-attached: %s", runtime.spec.name, exc)
                record.unlink()
                continue
            self.vms.register(vm)
            log.info("re-attached to VM %s (pid %s)", vm.name, vm.machine.pid)
        for data in self.host.journal.records():
            await self._adopt(data)
        waiting = {n for op in self.ops.values() for n in op.vms}
        for name, vm in self.vms.vms.items():
            paused = vm.machine.runstate in (VmRunstate.PAUSED, VmRunstate.SAVED)
            if paused and name not in waiting:
                with contextlib.suppress(LockstepError):
                    await vm.machine.resume()
        await self._remove_stray_taps()
        await self.faults.remove_tables({vm.runtime.group for vm in self.vms.vms.values()})
        self.deadman.start()

    async def _adopt(self, data: dict[str, Any]) -> None:
        """Take back an operation a previous execd left on record."""
        try:
            kind, phase = OpKind(str(data["kind"])), OpPhase(str(data["phase"]))
            op, state = validate_name("operation", str(data["id"])), str(data["state"])
            vms = [str(v) for v in data["vms"]]
            deadline = float(data["deadline"])
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("dropping unreadable operation record %s: %s", data, exc)
            if isinstance(data.get("id"), str):
                self.host.journal.remove(data["id"])
            return
        operation: Operation
        if kind is OpKind.SAVE:
            operation = SaveOperation(
                self.host, op, state, vms, deadline,
                keep_running=bool(data.get("keep_running", True)), orphan=True,
            )  # fmt: skip
        else:
            operation = RestoreOperation(self.host, op, state, vms, deadline, orphan=True)
        operation.life.found_in(phase)
        if isinstance(operation, SaveOperation) and phase is OpPhase.RESUMED:
            # Its VMs run and its staging is gone: nothing is left to undo or
            # wait for. Kept, it would act on the VMs at its deadline.
            operation.advance(OpPhase.ABORTED)
            log.info("operation %s had resumed its VMs; it ends (no state %r)", op, state)
            return
        self.ops[op] = operation
        if isinstance(operation, RestoreOperation):
            new = data.get("new") or {}
            await operation.adopt({str(k): v for k, v in dict(new).items()})
            if operation.ended:
                self._close(operation)

    async def _remove_stray_taps(self) -> None:
        """Delete lockstep's taps here that no VM and no operation uses (left by a crash)."""
        used = {t for vm in self.vms.vms.values() for t in vm.runtime.taps}
        for op in self.ops.values():
            if isinstance(op, RestoreOperation):
                used |= {t for vm in [*op.new.values(), *op.old.values()] for t in vm.runtime.taps}
        for link in await list_links(netns=self.config.netns):
            m = OUR_LINK.match(link)
            if m is not None and m.group(1) == "t" and link not in used:
                await delete_link(link, netns=self.config.netns)
                log.info("removed tap %s left by a crash", link)

    async def close(self) -> None:
        """Stop the dead-man's timer and drop QMP connections; the VMs keep running.

        A VM frozen by a fault stays paused; the next start resumes it.
        """
        await self.deadman.stop()
        self.faults.close()
        vms = list(self.vms.vms.values())
        for op in self.ops.values():
            if isinstance(op, RestoreOperation):
                vms += [vm for vm in op.new.values() if vm not in vms]
        for vm in vms:
            await vm.driver.close(vm)

    # -- clock ----------------------------------------------------------------

    def probe(self) -> ProbeReply:
        """Stamp a clock probe on this execd's clock."""
        self.host.fault.slow_probe()
        received = self.clock.now()
        return ProbeReply(received=received, sent=self.clock.now())

    def from_wall(self, wall: float) -> float:
        """A host wall-clock instant on this execd's clock."""
        return self.clock.from_wall(wall)

    # -- VMs ------------------------------------------------------------------

    async def status(self) -> list[VmStatus]:
        """The VMs of this host as they are now (a libvirt domain's live XML too)."""
        out = []
        for name, vm in sorted(self.vms.vms.items()):
            extra = vm.driver.status_extra(vm)
            try:
                xml = await vm.driver.describe(vm) if vm.machine.alive() else ""
            except LockstepError as exc:
                log.warning("VM %s: %s", name, exc)
                xml = ""
            out.append(
                VmStatus(
                    name=name,
                    runstate=vm.driver.runstate(vm),
                    pid=vm.machine.pid,
                    layer=",".join(vm.runtime.active_layers) or None,
                    state=vm.runtime.state,
                    driver=vm.driver.kind,
                    domain=extra.get("domain"),
                    uuid=extra.get("uuid"),
                    xml=xml or None,
                )
            )
        return out

    async def up(self, group: str, vms: Sequence[VmSpec]) -> list[VmStatus]:
        """Start the VMs that are not running, each on a fresh layer over its base.

        Raises:
            LockstepError: a VM could not be started (the others that started stay up).
        """
        validate_name("group", group)
        async with self._lock:
            todo = [
                s for s in vms if (vm := self.vms.get(s.name)) is None or not vm.machine.alive()
            ]

            async def one(spec: VmSpec) -> None:
                old = self.vms.get(spec.name)
                if old is not None:
                    await self.vms.discard(old)
                await self.host.driver(spec).up(group, spec)

            await gather_all([one(s) for s in todo])
            await self.faults.refresh(group)
        return await self.status()

    async def down(self, vms: Sequence[str]) -> list[VmStatus]:
        """Stop the named VMs (all when empty), remove their taps and unused layers.

        Raises:
            LockstepError: a VM could not be stopped.
        """
        async with self._lock:
            names = list(vms) or list(self.vms.vms)
            await gather_all([self.vms.discard(vm) for n in names if (vm := self.vms.get(n))])
            self.host.collect_garbage()
        return await self.status()

    def _chains_in_use(self) -> dict[str, list[str]]:
        chains = self.vms.active_chains()
        for op in self.ops.values():
            chains.update(op.held_chains())
        return chains

    # -- operations -------------------------------------------------------------

    def _op(self, op: str, kind: type[Op]) -> Op:
        """The operation ``op`` in progress here, of class ``kind``.

        Raises:
            OperationError: no such operation (it ended, or execd restarted), or
                one of another kind.
        """
        operation = self.ops.get(op)
        if operation is None:
            raise OperationError(
                f"host {self.config.host} has no operation {op} (it ended, or execd restarted)"
            )
        if not isinstance(operation, kind):
            raise OperationError(
                f"host {self.config.host}: operation {op} is a {operation.kind.value},"
                f" not a {kind.kind.value}"
            )
        return operation

    def _refuse_existing(self, op: str) -> None:
        if op in self.ops or op in self._recent:
            raise OperationError(f"host {self.config.host}: operation {op} exists already")

    def _refuse_held(self, names: Sequence[str]) -> None:
        """Refuse to open an operation on a VM that another one still holds.

        An operation left by a killed execd holds its VMs until its deadline:
        at its end it resumes or swaps back what it holds, and would undo a
        newer operation's work on the same VMs.

        Raises:
            OperationError: a VM of ``names`` is held (the holder named).
        """
        for other in self.ops.values():
            shared = sorted(set(names) & set(other.vms))
            if shared and not other.ended:
                left = max(0.0, other.deadline - self.clock.now())
                raise OperationError(
                    f"host {self.config.host}: VM {shared[0]} is held by operation {other.id}"
                    f" ({other.kind.value} {other.state!r}, {other.phase.value}); it ends when"
                    f" its caller finishes or aborts it, or at its deadline in {left:.1f} s"
                )

    def _close(self, operation: Any) -> None:
        """Forget an operation that ended (committed, aborted, expired or failed)."""
        self.ops.pop(operation.id, None)
        self.host.journal.remove(operation.id)

    def _ended(self, operation: Operation) -> None:
        """After a step: an operation that ended is forgotten; a committed save is kept a while.

        A committed save can still be undone (abort) when another host failed
        to commit; a few recent ones are kept for that.
        """
        if not operation.ended:
            return
        self._close(operation)
        if isinstance(operation, SaveOperation) and operation.phase is OpPhase.COMMITTED:
            self._recent[operation.id] = operation
            while len(self._recent) > _RECENT:
                self._recent.popitem(last=False)

    async def _expire(self, operation: Any) -> None:
        async with operation.ending():
            await operation.expire()
        self._close(operation)

    async def pause(
        self, op: str, state: str, at: float, vms: Sequence[str], deadline: float
    ) -> list[VmReport]:
        """Open save ``op`` of ``state``: freeze each VM's NICs just before ``at``, pause at ``at``.

        Raises:
            StateExists: the state is already on this host.
            OperationError: ``op`` exists already, a VM is unknown or not running,
                or a fault holds a VM frozen (its timer would resume it mid-save).
            VmError: a VM could not be paused (the caller aborts).
        """
        validate_name("state", state)
        self._refuse_existing(op)
        frozen = self.faults.frozen()
        if frozen:
            vm = min(frozen)
            raise OperationError(
                f"host {self.config.host}: VM {vm} is frozen by fault {frozen[vm]}; save once it"
                " runs again, or after `lockstep fault heal`"
            )
        await self.host.fault.at("pause:before")
        operation = SaveOperation.open(
            self.host, op, state, vms, deadline, refuse_held=self._refuse_held
        )
        self.ops[op] = operation
        async with operation.step():
            return await operation.pause(at)

    async def save_memory(
        self, op: str, keep_running: bool, progress: Callable[[SaveProgress], None] | None
    ) -> list[VmReport]:
        """Write each paused VM's memory into the staging state; freeze its disk layer.

        Raises:
            OperationError: the operation is not paused.
            VmError: memory could not be written (disk full, QEMU died...).
        """
        operation = self._op(op, SaveOperation)
        async with operation.step():
            return await operation.save_memory(keep_running, progress)

    async def drain(self, op: str, quiet: float, limit: float) -> list[VmReport]:
        """Capture until quiet, then write each VM's held frames into the state (pcap).

        Raises:
            OperationError: the operation's memory is not saved yet.
        """
        operation = self._op(op, SaveOperation)
        async with operation.step():
            return await operation.drain(quiet, limit)

    async def resume(
        self, op: str, at: float, guest_time: GuestTime | None = None
    ) -> list[VmReport]:
        """A save: queue held frames, resume its VMs at ``at``. A restore: switch over at ``at``.

        After a restore's switch-over the wall clocks of the guests ``guest_time``
        names are set to true time (a save has no use for it).

        Raises:
            OperationError: the operation is not ready to resume.
            VmError: a VM could not be paused or resumed.
        """
        operation = self._op(op, Operation)
        if not isinstance(operation, SaveOperation | RestoreOperation):
            raise OperationError(f"operation {op} cannot resume")
        async with operation.step():
            if isinstance(operation, RestoreOperation):
                return await operation.resume(at, guest_time)
            return await operation.resume(at)

    async def stop(self, op: str) -> list[VmReport]:
        """Destroy the operation's VMs after a committed ``save --stop``.

        Raises:
            OperationError: the save is not committed, or keeps its VMs running.
        """
        operation = self._op(op, SaveOperation)
        async with operation.step():
            reports = await operation.stop()
        self._ended(operation)
        return reports

    async def commit(self, op: str) -> StateInfo | None:
        """Make the operation permanent: a save's state becomes visible, a restore is done.

        Raises:
            OperationError: the operation is not ready to commit.
            StoreError: the state could not be committed (the caller aborts).
        """
        operation = self._op(op, Operation)
        async with operation.step():
            if isinstance(operation, RestoreOperation):
                await operation.commit()
                info = None
            elif isinstance(operation, SaveOperation):
                info = await operation.commit()
            else:
                raise OperationError(f"operation {op} cannot commit")
        self._ended(operation)
        return info

    async def abort(self, op: str, resume_at: float | None) -> list[VmReport]:
        """Undo ``op``: see :meth:`SaveOperation.abort` and :meth:`RestoreOperation.abort`.

        An operation this host does not know (it never started here, or
        already ended) has nothing to undo: that is not an error. A save this
        host already committed is undone (its state is removed, its disk
        layers stay under the running VMs), because another host failed.

        Raises:
            OperationError: the operation is committed and cannot be undone.
        """
        operation: Operation | None = self.ops.get(op) or self._recent.pop(op, None)
        if operation is None:
            return []
        try:
            async with operation.ending():  # after a step still running (a caller's timeout)
                return await operation.abort(resume_at)
        finally:
            if operation.ended:
                self._close(operation)

    def extend(self, op: str, deadline: float) -> None:
        """Push back ``op``'s dead-man deadline (kept on disk, for a restart).

        Raises:
            OperationError: no such operation.
        """
        self._op(op, Operation).extend(deadline)

    async def switch(self, op: str, at: float) -> list[VmReport]:
        """Pause restore ``op``'s old VMs at ``at``; put the new ones in their place, paused.

        Raises:
            OperationError: the restore is not prepared.
            VmError, NetError: the switch failed (the caller aborts: it swaps back).
        """
        operation = self._op(op, RestoreOperation)
        async with operation.step():
            return await operation.switch(at)

    async def prepare_restore(self, op: str, state: str, deadline: float) -> list[VmReport]:
        """Prepare the VMs of ``state`` beside the running ones, paused, ready to switch to.

        Nothing of what runs changes; on failure every VM made is discarded.

        Raises:
            StateNotFound: the state is not (completely) on this host.
            OperationError: ``op`` exists already.
            VmError: a VM could not be started or its memory not loaded.
        """
        validate_name("state", state)
        self._refuse_existing(op)
        operation = RestoreOperation.open(
            self.host, op, state, deadline, refuse_held=self._refuse_held
        )
        self.ops[op] = operation
        try:
            async with operation.step():
                return await operation.prepare()
        finally:
            self._ended(operation)

    # -- states -------------------------------------------------------------------

    def states(self) -> list[StateInfo]:
        """The committed states on this host, oldest first."""
        return self.catalog.listed()

    def state_show(self, name: str) -> dict[str, Any]:
        """One state's manifest as JSON-ready data.

        Raises:
            StateNotFound: no such state here.
        """
        return self.catalog.show(name)

    async def verify_state(self, name: str, deep: bool) -> Verified:
        """Check every file of state ``name`` against its manifest (see :class:`StateCatalog`).

        Raises:
            StateDamaged: a file is missing or not as committed.
            StateNotFound: no such state here.
        """
        return await self.catalog.verify(name, deep)

    def state_frames(self, name: str, vm: str) -> Iterator[tuple[str, bytes]]:
        """The frames held for ``vm`` in state ``name``: its NICs' pcap files, in chunks.

        Raises:
            StateNotFound: no such state here, or the state holds no VM ``vm`` here.
        """
        return self.catalog.frames(name, vm)

    async def state_delete(self, name: str) -> list[str]:
        """Delete a state nothing depends on; return the layer ids removed.

        Raises:
            StateNotFound: no such state here.
            StateInUse: another state or a VM depends on its layers.
        """
        return await self.catalog.delete(name)

    # -- faults injected on purpose -------------------------------------------------

    async def inject_fault(self, group: str, fault_id: str, action: FaultAction) -> FaultReply:
        """Inject a fault on this host's VMs of ``group``, heal its faults, or list them.

        See :class:`~lockstep.execd.inject.FaultBook`.

        Raises:
            OperationError: fault ``fault_id`` is held already, or the VM loses frames already.
            VmError: the VM is not here or not running, or QEMU failed the stop.
            NetError: nft is missing or refused the rules (nothing changed).
        """
        return await self.faults.act(group, fault_id, action)
