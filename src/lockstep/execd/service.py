"""The execd service: one host's VMs, layers, freezes and states. No gRPC here.

It composes the lower packages (vm, net, disk, store) into the steps the caller
schedules: pause at T, save memory, drain, resume at T, commit or abort, and
restore. It keeps what it must survive a restart with on disk: each VM's
runtime record (``run/<vm>/vm.json``) next to QEMU's pid file and QMP socket, so
:meth:`HostService.start` re-attaches to the VMs it left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from lockstep import disk
from lockstep.errors import LockstepError, StateNotFound, StoreError, VmError
from lockstep.execd.clock import ExecdClock, background
from lockstep.execd.fault import Fault
from lockstep.execd.model import (
    ExecdConfig,
    ProbeReply,
    SaveProgress,
    StateInfo,
    VmReport,
    VmStatus,
)
from lockstep.execd.ops import Operation, OperationError, OpKind, OpPhase
from lockstep.group import VmSpec, validate_name
from lockstep.net.freeze import FreezeLimits, NicFreeze, cleanup_freeze_links
from lockstep.net.links import create_tap, delete_link, tap_name
from lockstep.store import Manifest, Staging, StateStore, VmRecord
from lockstep.vm import memory
from lockstep.vm.argv import RamFile, VmPaths
from lockstep.vm.machine import Machine, MigrationProgress, VmRunstate

__all__ = ["HostService"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_MEMORY_FILE = "{vm}.mem"
# Frames captured this long before a restore's resume instant are from the old
# timeline; later ones may come from restored peers resuming a bit earlier.
_STALE_MARGIN = 0.05
_RAM_FILE = "{vm}.ram"  # the RAM image a fast save keeps (lockstep.vm.memory)
_CHUNK = 1 << 20  # bytes per piece when a state's file is sent


@dataclass
class VmRuntime:
    """What execd must remember about a VM it runs (persisted as ``vm.json``)."""

    spec: VmSpec
    group: str
    taps: list[str]
    layer: str | None = None  # active layer id (None: no disk)
    chain: list[str] = field(default_factory=list)  # layer ids over the base, ending in layer
    state: str | None = None  # state it was restored from or last saved as
    ram: str | None = None  # the file guest RAM is in (None: anonymous memory)
    ram_shared: bool = False  # the VM's own RAM file (else a state's image, mapped privately)
    memory_note: str = ""  # why its next save cannot take the fast path ("" if it can)

    @property
    def ram_file(self) -> RamFile | None:
        """Guest RAM's file as QEMU got it (None: anonymous memory)."""
        return None if self.ram is None else RamFile(Path(self.ram), shared=self.ram_shared)

    def to_json(self) -> str:
        """Serialise for ``vm.json``."""
        data = asdict(self)
        data["spec"] = self.spec.model_dump(mode="json")
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> VmRuntime:
        """Read back what :meth:`to_json` wrote."""
        data = json.loads(text)
        data["spec"] = VmSpec.model_validate(data["spec"])
        return cls(**data)


@dataclass
class _Vm:
    runtime: VmRuntime
    machine: Machine
    freeze: NicFreeze | None = None


P = ParamSpec("P")
R = TypeVar("R")
A = TypeVar("A")


def _step(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Mark a method ``(self, op, ...)`` as a step of operation ``op``.

    The dead-man's timer never expires an operation while one of its steps runs.
    """

    @functools.wraps(fn)
    async def step(*args: P.args, **kw: P.kwargs) -> R:
        service = args[0]
        op = kw["op"] if "op" in kw else args[1]
        assert isinstance(service, HostService)
        assert isinstance(op, str)
        service._busy[op] = service._busy.get(op, 0) + 1
        try:
            return await fn(*args, **kw)
        finally:
            left = service._busy.pop(op, 1) - 1
            if left:
                service._busy[op] = left

    return step


async def _gather_all(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Like gather, but waits for every task before raising the first failure."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)  # type: ignore[arg-type]


class HostService:
    """One host's execd, transport-free (see :class:`lockstep.execd.api.ExecdApi`)."""

    def __init__(self, config: ExecdConfig) -> None:
        validate_name("host", config.host)
        self.config = config
        self.clock = ExecdClock(config.clock_offset)
        self.store = StateStore(config.root)
        self.rundir = config.root / "run"
        self._vms: dict[str, _Vm] = {}
        self._ops: dict[str, Operation] = {}
        self._staging: dict[str, Staging] = {}
        # (op, vm) -> the layer id and chain the state keeps for that VM
        self._frozen: dict[tuple[str, str], tuple[str | None, list[str]]] = {}
        # (op, vm) -> pcap file names written into the state
        self._frames: dict[tuple[str, str], list[str]] = {}
        # (op, vm) -> the RAM image file a fast save wrote into the state
        self._ram_images: dict[tuple[str, str], str] = {}
        # Recently committed saves (op -> state), so a group-level failure can
        # still undo this host's commit through abort.
        self._committed: dict[str, str] = {}
        # op -> number of its steps running now (the dead-man waits for them)
        self._busy: dict[str, int] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._fault = Fault.from_env()
        self._lock = asyncio.Lock()

    # -- lifecycle of the service -------------------------------------------

    async def start(self) -> None:
        """Clean up after a crash and re-attach to the VMs left running.

        Staging states are dropped (an operation that did not commit never
        happened), leftover freeze links are removed, and every VM whose QEMU
        still runs is driven again.
        """
        self.rundir.mkdir(parents=True, exist_ok=True)
        self._opsdir.mkdir(parents=True, exist_ok=True)
        self.store.layers_dir.mkdir(parents=True, exist_ok=True)
        orphans = self._load_orphan_ops()
        for left in self.store.cleanup_staging():
            log.info("removed staging state left by a crash: %s", left)
        for link in await cleanup_freeze_links(netns=self.config.netns):
            log.info("removed freeze link left by a crash: %s", link)
        for record in sorted(self.rundir.glob("*/vm.json")):
            runtime = VmRuntime.from_json(record.read_text())
            machine = self._machine(runtime.spec)
            try:
                await machine.attach()
            except VmError as exc:
                log.warning("VM %s not re-attached: %s", runtime.spec.name, exc)
                record.unlink()
                continue
            self._vms[runtime.spec.name] = _Vm(runtime, machine)
            log.info("re-attached to VM %s (pid %s)", runtime.spec.name, machine.pid)
        # Paused VMs of an operation that died with the old execd resume at
        # that operation's deadline (a common instant with the other hosts);
        # paused VMs of no known operation resume now.
        waiting = {n for op in orphans for n in op.vms}
        for name, vm in self._vms.items():
            if vm.machine.runstate is not VmRunstate.RUNNING and name not in waiting:
                with contextlib.suppress(LockstepError):
                    await vm.machine.resume()
        for op in orphans:
            self._ops[op.id] = op
        self._watchdog = asyncio.create_task(self._watch(), name="dead-man")

    async def close(self) -> None:
        """Stop the dead-man's timer and drop QMP connections; the VMs keep running."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        for vm in self._vms.values():
            await vm.machine._drop_qmp()

    def _machine(self, spec: VmSpec) -> Machine:
        return Machine(
            spec,
            self.rundir / spec.name,
            netns=self.config.netns,
            qemu_binary=self.config.qemu_binary,
        )

    def _persist(self, runtime: VmRuntime) -> None:
        path = self.rundir / runtime.spec.name / "vm.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(runtime.to_json())
        os.replace(tmp, path)

    def _forget(self, name: str) -> None:
        (self.rundir / name / "vm.json").unlink(missing_ok=True)
        self._vms.pop(name, None)

    # -- operations on disk, and the dead-man's timer ---------------------------

    @property
    def _opsdir(self) -> Path:
        return self.rundir / "ops"

    def _open_op(self, operation: Operation) -> None:
        """Register an operation; its deadline is on disk before any VM pauses."""
        path = self._opsdir / f"{operation.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(operation.to_json()))
        os.replace(tmp, path)
        self._ops[operation.id] = operation

    def _close_op(self, op: str) -> None:
        """Forget an operation that ended (committed, aborted or expired)."""
        self._ops.pop(op, None)
        (self._opsdir / f"{op}.json").unlink(missing_ok=True)
        self._forget_op_data(op)

    def _load_orphan_ops(self) -> list[Operation]:
        """Operations left on disk by a previous execd (their VMs may still be paused)."""
        orphans = []
        for path in sorted(self._opsdir.glob("*.json")):
            try:
                orphans.append(Operation.orphan_from_json(json.loads(path.read_text())))
            except (ValueError, KeyError, OSError) as exc:
                log.warning("dropping unreadable operation record %s: %s", path, exc)
                path.unlink(missing_ok=True)
        return orphans

    async def _watch(self) -> None:
        """The dead-man's timer: operations whose caller went quiet resume their VMs.

        A caller commits, aborts or extends before an operation's deadline; if
        none of that came, the paused VMs resume at the deadline (a common
        instant with the other hosts, which got the same one), with their held
        frames, and a save's staging state is dropped.
        """
        while True:
            now = self.clock.now()
            due = [
                op
                for op in self._ops.values()
                if not self._busy.get(op.id)
                and op.deadline - now < 0.01
                and op.phase not in (OpPhase.COMMITTED, OpPhase.STOPPED, OpPhase.ABORTED)
            ]
            for op in due:
                log.warning(
                    "operation %s (%s %r): no word from the caller by its deadline;"
                    " resuming its VMs",
                    op.id, op.kind.value, op.state,
                )  # fmt: skip
                try:
                    await self._expire(op)
                except LockstepError as exc:
                    log.error("operation %s could not expire cleanly: %s", op.id, exc)
                    self._close_op(op.id)
            nearest = min((op.deadline for op in self._ops.values()), default=now + 1.0)
            await asyncio.sleep(min(0.05, max(0.0, nearest - self.clock.now() - 0.01)))

    def _killer(self, operation: Operation) -> Callable[[], None]:
        """For the fault hook: SIGKILL the operation's first VM's QEMU."""

        def kill() -> None:
            vms = self._op_vms(operation)
            if vms and vms[0].machine.pid is not None:
                os.kill(vms[0].machine.pid, 9)

        return kill

    async def _expire(self, operation: Operation) -> None:
        """Let an abandoned operation's VMs run again, resumed at its deadline.

        A restore orphaned by an execd restart is the exception: the caller saw
        it fail and stopped the other hosts' half-restored VMs, so its VMs are
        stopped too rather than resumed into an inconsistent group.
        """
        staging = self._staging.pop(operation.id, None)
        if staging is not None:
            staging.abort()
        targets = self._op_vms(operation)
        if operation.orphan and operation.kind is OpKind.RESTORE:
            await _gather_all([self._discard(vm.runtime.spec.name) for vm in targets])
            self._close_op(operation.id)
            return
        await self._resume_all(
            targets, operation.deadline, restoring=operation.kind is OpKind.RESTORE
        )
        self._close_op(operation.id)

    # -- clock ----------------------------------------------------------------

    def probe(self) -> ProbeReply:
        """Stamp a clock probe on this execd's clock."""
        self._fault.slow_probe()
        received = self.clock.now()
        return ProbeReply(received=received, sent=self.clock.now())

    def from_wall(self, wall: float) -> float:
        """A host wall-clock instant on this execd's clock."""
        return self.clock.from_wall(wall)

    # -- VMs ------------------------------------------------------------------

    def status(self) -> list[VmStatus]:
        """The VMs of this host as they are now."""
        out = []
        for name, vm in sorted(self._vms.items()):
            state = vm.machine.runstate.value
            if not vm.machine.alive():
                state = "crashed"
            out.append(
                VmStatus(
                    name=name,
                    runstate=state,
                    pid=vm.machine.pid,
                    layer=vm.runtime.layer,
                    state=vm.runtime.state,
                )
            )
        return out

    def _taps(self, group: str, spec: VmSpec) -> list[str]:
        return [tap_name(group, spec.name, i) for i in range(len(spec.nics))]

    async def _make_taps(self, runtime: VmRuntime) -> None:
        for tap, nic in zip(runtime.taps, runtime.spec.nics, strict=True):
            if nic.bridge is None:
                raise OperationError(
                    f"VM {runtime.spec.name}: NIC on {nic.network} names no bridge"
                )
            await create_tap(tap, nic.bridge, netns=self.config.netns)

    async def _launch(self, runtime: VmRuntime, *, incoming: bool) -> Machine:
        machine = self._machine(runtime.spec)
        if not incoming:  # a restore has set up runtime.ram already
            ram, runtime.memory_note = memory.boot_ram(runtime.spec, machine.paths.ram)
            runtime.ram = None if ram is None else str(ram.path)
            runtime.ram_shared = ram is not None
        await self._make_taps(runtime)
        layer = disk.layer_path(self.store.layers_dir, runtime.layer) if runtime.layer else None
        await machine.start(disk=layer, taps=runtime.taps, incoming=incoming, ram=runtime.ram_file)
        return machine

    async def _save_vm_memory(
        self, op: str, vm: _Vm, staging: Staging, keep_running: bool, progress: MigrationProgress
    ) -> VmReport:
        """Save one paused VM's memory into the staging state, fast or standard.

        Fast: the stream holds device state only and the state keeps a RAM
        image of the VM's RAM file (linked when the VM stops after the save,
        else reflinked or copied): see :mod:`lockstep.vm.memory`.

        Raises:
            VmError: the memory or the RAM image could not be written, or the
                VM's ``memory_path`` is "fast" and the fast path cannot be used.
        """
        rt = vm.runtime
        name = rt.spec.name
        shared = rt.ram is not None and rt.ram_shared
        plan = memory.plan_save(
            rt.spec,
            rt.ram_file,
            rt.memory_note,
            qemu_ignores_shared=shared and await vm.machine.can_ignore_shared(),
        )
        size = await vm.machine.save_memory(
            staging.file(_MEMORY_FILE.format(vm=name)), ignore_shared=plan.fast, progress=progress
        )
        if not plan.fast:
            return VmReport(
                name=name, memory_bytes=size, memory_path="standard", memory_note=plan.reason
            )
        assert rt.ram is not None
        image = _RAM_FILE.format(vm=name)
        kept = await asyncio.to_thread(
            memory.keep_ram_image, Path(rt.ram), staging.file(image), link=not keep_running
        )
        self._ram_images[(op, name)] = image
        size += (staging.path / image).stat().st_blocks * 512
        return VmReport(
            name=name, memory_bytes=size, memory_path="fast", memory_note=kept.describe()
        )

    async def up(self, group: str, vms: Sequence[VmSpec]) -> list[VmStatus]:
        """Start the VMs that are not running, each on a fresh layer over its base.

        Raises:
            LockstepError: a VM could not be started (the others that started stay up).
        """
        validate_name("group", group)
        async with self._lock:
            todo = [
                s for s in vms if s.name not in self._vms or not self._vms[s.name].machine.alive()
            ]

            async def one(spec: VmSpec) -> None:
                if spec.name in self._vms:
                    await self._discard(spec.name)
                runtime = VmRuntime(spec=spec, group=group, taps=self._taps(group, spec))
                if spec.disk is not None:
                    plan = disk.plan_fresh_overlay(self.store.layers_dir, spec.name, spec.disk)
                    await disk.create_overlay(plan)
                    runtime.layer = plan.layer_id
                    runtime.chain = [plan.layer_id]
                machine = await self._launch(runtime, incoming=False)
                self._vms[spec.name] = _Vm(runtime, machine)
                self._persist(runtime)

            await _gather_all([one(s) for s in todo])
        return self.status()

    async def _discard(self, name: str) -> None:
        """Quit a VM's QEMU, remove its taps and forget it."""
        vm = self._vms.get(name)
        if vm is None:
            return
        try:
            if vm.freeze is not None:
                await vm.freeze.lift()
        finally:
            try:
                await vm.machine.quit()
            finally:
                self._forget(name)
                for tap in vm.runtime.taps:
                    await delete_link(tap, netns=self.config.netns)

    async def down(self, vms: Sequence[str]) -> list[VmStatus]:
        """Stop the named VMs (all when empty), remove their taps and unused layers.

        Raises:
            LockstepError: a VM could not be stopped.
        """
        async with self._lock:
            names = list(vms) or list(self._vms)
            await _gather_all([self._discard(n) for n in names if n in self._vms])
            self._collect_garbage()
        return self.status()

    def _active_chains(self) -> dict[str, list[str]]:
        return {name: vm.runtime.chain for name, vm in self._vms.items() if vm.runtime.chain}

    def _collect_garbage(self) -> None:
        """Remove layers no state and no running VM needs any more."""
        keep = [rec.chain for m in self.store.list() for rec in m.vms.values()]
        keep += list(self._active_chains().values())
        existing = {p.stem for p in self.store.layers_dir.glob("*.qcow2")}
        for layer in disk.unreachable_layers(existing, keep):
            disk.remove_layer(disk.layer_path(self.store.layers_dir, layer))

    # -- operations -------------------------------------------------------------

    def _op(self, op: str) -> Operation:
        try:
            operation = self._ops[op]
        except KeyError:
            raise OperationError(
                f"host {self.config.host} has no operation {op} (it ended, or execd restarted)"
            ) from None
        if operation.orphan:
            raise OperationError(
                f"host {self.config.host}: execd restarted during operation {op}; it can only"
                " be aborted (its VMs resume at its deadline)"
            )
        return operation

    def _op_vms(self, op: Operation) -> list[_Vm]:
        return [self._vms[n] for n in op.vms if n in self._vms]

    def _freeze_for(self, vm: _Vm) -> NicFreeze:
        return self._freeze_for_taps(vm.runtime.spec, vm.runtime.taps)

    def _freeze_for_taps(self, spec: VmSpec, taps: Sequence[str]) -> NicFreeze:
        name = spec.name
        return NicFreeze(
            name,
            taps,
            hold_from=[nic.hold_from for nic in spec.nics],
            netns=self.config.netns,
            limits=FreezeLimits(
                in_memory=self.config.frames_in_memory, limit=self.config.frames_limit
            ),
            spill_dir=self.rundir / name,
        )

    @_step
    async def pause(
        self, op: str, state: str, at: float, vms: Sequence[str], deadline: float
    ) -> list[VmReport]:
        """Open save ``op`` of ``state``: freeze each VM's NICs just before ``at``, pause at ``at``.

        The NICs freeze ``frames_lead`` before the pause (see ExecdConfig): a
        frame that reached QEMU but not yet the guest when the VM stops would
        be dropped by QEMU; the lead lets the guest take it first.

        Raises:
            StateExists: the state is already on this host.
            OperationError: ``op`` exists already, or a VM is unknown or not running.
            VmError: a VM could not be paused (the caller aborts).
        """
        validate_name("state", state)
        if op in self._ops:
            raise OperationError(f"host {self.config.host}: operation {op} exists already")
        names = list(vms) or sorted(self._vms)
        if not names:
            raise OperationError(f"host {self.config.host} runs no VM to pause")
        for n in names:
            if n not in self._vms:
                raise OperationError(f"host {self.config.host} runs no VM {n!r}")
            rs = self._vms[n].machine.runstate
            if rs is not VmRunstate.RUNNING:
                raise OperationError(
                    f"VM {n} on host {self.config.host} is {rs.value}, not running"
                )
        await self._fault.at("pause:before")
        staging = self.store.begin(state)
        operation = Operation(op, OpKind.SAVE, state, names, deadline)
        self._open_op(operation)
        self._staging[op] = staging
        targets = self._op_vms(operation)
        for vm in targets:
            vm.freeze = self._freeze_for(vm)
            await vm.freeze.prepare()

        async def one(vm: _Vm) -> VmReport:
            wall = await vm.machine.pause()
            return VmReport(name=vm.runtime.spec.name, paused_at=self.clock.from_wall(wall))

        # The lead needs no precision: a plain sleep, no spin.
        await asyncio.sleep(max(0.0, at - self.config.frames_lead - self.clock.now()))
        await _gather_all([vm.freeze.engage() for vm in targets if vm.freeze is not None])
        qemu = [t for vm in targets for t in vm.machine.control_threads()]
        vcpus = [t for vm in targets for t in vm.machine.vcpu_threads()]
        async with self.clock.at_instant(at, qemu, vcpus):
            reports = await _gather_all([one(vm) for vm in targets])
        operation.advance(OpPhase.PAUSED)
        await self._fault.at("pause:after")
        return reports

    @_step
    async def save_memory(
        self, op: str, keep_running: bool, progress: Callable[[SaveProgress], None] | None
    ) -> list[VmReport]:
        """Write each paused VM's memory into the staging state; freeze its disk layer.

        With ``keep_running`` each VM moves to a fresh layer on top of the one
        the state keeps; otherwise the VM will be stopped and its layer is kept as is.

        Raises:
            OperationError: the operation is not paused.
            VmError: memory could not be written (disk full, QEMU died...).
        """
        operation = self._op(op)
        operation.require(OpPhase.PAUSED)
        operation.keep_running = keep_running
        staging = self._staging[op]

        async def one(vm: _Vm) -> VmReport:
            name = vm.runtime.spec.name
            rt = vm.runtime
            if keep_running and rt.layer is not None:
                plan = disk.plan_fresh_overlay(
                    self.store.layers_dir, name, disk.layer_path(self.store.layers_dir, rt.layer)
                )
                await vm.machine.snapshot_disk(plan.path)
                self._frozen[(op, name)] = (rt.layer, list(rt.chain))
                rt.layer = plan.layer_id
                rt.chain = [*rt.chain, plan.layer_id]
                self._persist(rt)
            else:
                self._frozen[(op, name)] = (rt.layer, list(rt.chain))

            def report(done: int, total: int) -> None:
                if progress is not None:
                    progress(SaveProgress(vm=name, done=done, total=total))

            saved = await self._save_vm_memory(op, vm, staging, keep_running, report)
            report(saved.memory_bytes, saved.memory_bytes)
            return saved

        await self._fault.at("save_memory:before", self._killer(operation))
        reports = await _gather_all([one(vm) for vm in self._op_vms(operation)])
        operation.advance(OpPhase.SAVED)
        await self._fault.at("save_memory:after")
        return reports

    @_step
    async def drain(self, op: str, quiet: float, limit: float) -> list[VmReport]:
        """Capture until quiet, then write each VM's held frames into the state (pcap).

        Quiet means no frame for ``quiet`` s; the wait is bounded by ``limit`` s.

        Raises:
            OperationError: the operation's memory is not saved yet.
        """
        operation = self._op(op)
        operation.require(OpPhase.SAVED)
        staging = self._staging[op]
        targets = self._op_vms(operation)
        await _gather_all([vm.freeze.drain(quiet, limit) for vm in targets if vm.freeze])
        reports = []
        for vm in targets:
            assert vm.freeze is not None
            name = vm.runtime.spec.name
            self._frames[(op, name)] = vm.freeze.write_pcaps(staging.path, name)
            reports.append(
                VmReport(
                    name=name,
                    frames_held=vm.freeze.held,
                    frames_dropped=vm.freeze.dropped,
                    frames_ignored=vm.freeze.ignored,
                )
            )
        operation.advance(OpPhase.DRAINED)
        await self._fault.at("drain:after")
        return reports

    async def _resume_all(
        self, targets: Sequence[_Vm], at: float | None, *, restoring: bool = False
    ) -> list[VmReport]:
        """Queue each paused VM's held frames on its taps, lift its freeze, then resume at ``at``.

        The frames go first, while the VMs are paused (no VM of the group runs
        then, so nothing can overtake them: :meth:`NicFreeze.deliver`); the
        caller leaves time for that before ``at``.

        ``restoring``: live frames captured well before the common resume
        instant come from the timeline the restore replaces (its VMs were
        destroyed while preparing); they are discarded, not delivered. The
        boundary is the instant minus a margin, because a restored peer on
        another host may resume (and send) a little before this host's instant.
        """
        stale_before = None
        if restoring and at is not None:
            stale_before = at - self.clock.offset - _STALE_MARGIN
        walls: dict[str, float] = {}
        frames: dict[str, tuple[int, int, int, int]] = {}

        async def deliver(vm: _Vm) -> None:
            name = vm.runtime.spec.name
            if vm.freeze is None:
                return
            await vm.freeze.deliver(discard_before=stale_before)
            if vm.freeze.stale:
                log.info(
                    "VM %s: %d frames from before the restore discarded", name, vm.freeze.stale
                )
            f = vm.freeze
            frames[name] = (f.held, f.delivered, f.dropped, f.ignored)
            await f.lift()
            vm.freeze = None

        async def wake(vm: _Vm) -> None:
            if vm.machine.runstate in (VmRunstate.PAUSED, VmRunstate.SAVED):
                walls[vm.runtime.spec.name] = await vm.machine.resume()

        await _gather_all([deliver(vm) for vm in targets])
        qemu = [t for vm in targets for t in vm.machine.control_threads()]
        async with self.clock.at_instant(at if at is not None else self.clock.now(), qemu):
            await _gather_all([wake(vm) for vm in targets])

        def report(vm: _Vm) -> VmReport:
            name = vm.runtime.spec.name
            wall = walls.get(name)
            held, delivered, dropped, ignored = frames.get(name, (0, 0, 0, 0))
            return VmReport(
                name=name,
                resumed_at=None if wall is None else self.clock.from_wall(wall),
                frames_held=held,
                frames_delivered=delivered,
                frames_dropped=dropped,
                frames_ignored=ignored,
            )

        return [report(vm) for vm in targets]

    @_step
    async def resume(self, op: str, at: float) -> list[VmReport]:
        """Deliver the operation's held frames to its paused VMs, then resume them at ``at``.

        Raises:
            OperationError: the operation is not ready to resume.
            VmError: a VM could not be resumed.
        """
        operation = self._op(op)
        operation.require(OpPhase.DRAINED, OpPhase.PREPARED)
        await self._fault.at("resume:before")
        if operation.kind is OpKind.SAVE and not operation.keep_running:
            raise OperationError(f"operation {op} saves with --stop; its VMs are not resumed")
        reports = await self._resume_all(
            self._op_vms(operation), at, restoring=operation.kind is OpKind.RESTORE
        )
        operation.advance(OpPhase.RESUMED)
        await self._fault.at("resume:after")
        return reports

    @_step
    async def stop(self, op: str) -> list[VmReport]:
        """Destroy the operation's VMs after a committed ``save --stop``.

        Raises:
            OperationError: the save is not committed, or keeps its VMs running.
        """
        operation = self._op(op)
        operation.require(OpPhase.COMMITTED)
        targets = self._op_vms(operation)
        reports = [
            VmReport(name=vm.runtime.spec.name, frames_held=vm.freeze.held if vm.freeze else 0)
            for vm in targets
        ]
        await _gather_all([self._discard(vm.runtime.spec.name) for vm in targets])
        operation.advance(OpPhase.STOPPED)
        self._close_op(op)
        return reports

    @_step
    async def commit(self, op: str) -> StateInfo | None:
        """Make the operation permanent: a save's staging state becomes visible.

        Raises:
            OperationError: the operation is not ready to commit.
            StoreError: the state could not be committed (the caller aborts).
        """
        operation = self._op(op)
        if operation.kind is OpKind.RESTORE:
            operation.require(OpPhase.RESUMED)
            operation.advance(OpPhase.COMMITTED)
            self._close_op(op)
            self._collect_garbage()
            return None
        if operation.keep_running:
            operation.require(OpPhase.RESUMED)
        else:
            operation.require(OpPhase.DRAINED)
        staging = self._staging[op]
        manifest = self._manifest(operation)
        await self._fault.at("commit:before")
        committed = await asyncio.to_thread(_in_background, staging.commit, manifest)
        operation.advance(OpPhase.COMMITTED)
        self._staging.pop(op, None)
        for vm in self._op_vms(operation):
            vm.runtime.state = operation.state
            self._persist(vm.runtime)
        self._committed[op] = operation.state
        while len(self._committed) > 32:
            del self._committed[next(iter(self._committed))]
        if operation.keep_running:
            self._close_op(op)
        return self._info(committed)

    def _manifest(self, operation: Operation) -> Manifest:
        records = {}
        parents = set()
        for vm in self._op_vms(operation):
            name = vm.runtime.spec.name
            layer, chain = self._frozen[(operation.id, name)]
            parents.add(vm.runtime.state)
            records[name] = VmRecord(
                layer=layer,
                chain=chain,
                base=str(vm.runtime.spec.disk) if vm.runtime.spec.disk else None,
                spec=vm.runtime.spec.model_dump(mode="json"),
                memory=_MEMORY_FILE.format(vm=name),
                ram=self._ram_images.get((operation.id, name)),
                frames=self._frames.get((operation.id, name), []),
            )
        groups = {vm.runtime.group for vm in self._op_vms(operation)}
        if len(groups) != 1:
            raise OperationError(
                f"host {self.config.host}: operation {operation.id} spans groups"
                f" {', '.join(sorted(groups))}; a state holds one group"
            )
        group = groups.pop()
        parent = parents.pop() if len(parents) == 1 else None
        return Manifest(
            name=operation.state,
            group=group,
            host=self.config.host,
            created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            parent=parent,
            vms=records,
            files={},
            complete=True,
        )

    def _forget_op_data(self, op: str) -> None:
        for key in [k for k in self._frozen if k[0] == op]:
            del self._frozen[key]
        for key in [k for k in self._frames if k[0] == op]:
            del self._frames[key]
        for key in [k for k in self._ram_images if k[0] == op]:
            del self._ram_images[key]

    @_step
    async def abort(self, op: str, resume_at: float | None) -> list[VmReport]:
        """Undo ``op``: drop its staging state; resume its paused VMs at ``resume_at``.

        A restore that is aborted cannot give back the VMs it replaced: its
        half-restored VMs are stopped cleanly instead.

        An operation this host does not know (it never started here, or
        already ended) has nothing to undo: that is not an error. A save this
        host already committed is undone: its state is removed (its disk
        layers stay, the VMs run on them), because another host failed.

        Raises:
            OperationError: the operation is committed and cannot be undone.
        """
        if op in self._committed and (op not in self._ops or self._ops[op].kind is OpKind.SAVE):
            state = self._committed.pop(op)
            with contextlib.suppress(StateNotFound):
                self.store.forget(state)
            log.info("operation %s: commit of state %r undone", op, state)
            reports: list[VmReport] = []
            if op in self._ops:  # a `save --stop`: its VMs are still paused
                reports = await self._resume_all(self._op_vms(self._ops[op]), resume_at)
                self._close_op(op)
            return reports
        if op not in self._ops:
            return []
        operation = self._ops[op]
        if operation.phase in (OpPhase.COMMITTED, OpPhase.STOPPED):
            raise OperationError(f"operation {op} is committed; it cannot be aborted")
        staging = self._staging.pop(op, None)
        if staging is not None:
            staging.abort()
        targets = self._op_vms(operation)
        if operation.kind is OpKind.RESTORE:
            await _gather_all([self._discard(vm.runtime.spec.name) for vm in targets])
            reports = [VmReport(name=n) for n in operation.vms]
        else:
            reports = await self._resume_all(targets, resume_at)
        if operation.phase is not OpPhase.ABORTED:
            operation.advance(OpPhase.ABORTED)
        self._close_op(op)
        return reports

    def extend(self, op: str, deadline: float) -> None:
        """Push back ``op``'s dead-man deadline (kept on disk, for a restart).

        Raises:
            OperationError: no such operation.
        """
        if op not in self._ops:
            self._op(op)
        operation = self._ops[op]
        operation.deadline = deadline
        path = self._opsdir / f"{op}.json"
        if path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(operation.to_json()))
            os.replace(tmp, path)

    @_step
    async def prepare_restore(self, op: str, state: str, deadline: float) -> list[VmReport]:
        """Replace this host's VMs of ``state`` by paused VMs loaded from it.

        Each VM gets a fresh layer over the state's layer (the state stays
        pristine), its NICs frozen and the state's held frames loaded, ready to
        be resumed at a common instant.

        Raises:
            StateNotFound: the state is not (completely) on this host.
            OperationError: ``op`` exists already.
            VmError: a VM could not be started or its memory not loaded.
        """
        validate_name("state", state)
        if op in self._ops:
            raise OperationError(f"host {self.config.host}: operation {op} exists already")
        await self._fault.at("prepare_restore:before")
        manifest = self.store.show(state)
        operation = Operation(op, OpKind.RESTORE, state, sorted(manifest.vms), deadline)
        self._open_op(operation)
        state_dir = self.store.states_dir / state

        async def one(name: str, rec: VmRecord) -> VmReport:
            spec = VmSpec.model_validate(rec.spec)
            runtime = VmRuntime(
                spec=spec, group=manifest.group, taps=self._taps(manifest.group, spec), state=state
            )
            plan = None
            if rec.layer is not None:
                plan = disk.plan_fresh_overlay(
                    self.store.layers_dir, name, disk.layer_path(self.store.layers_dir, rec.layer)
                )
            # The VM it replaces quits while the new layer is made (other files).
            await _gather_all(
                ([self._discard(name)] if name in self._vms else [])
                + ([disk.create_overlay(plan)] if plan is not None else [])
            )
            if plan is not None:
                runtime.layer = plan.layer_id
                runtime.chain = [*rec.chain, plan.layer_id]
            ram = await asyncio.to_thread(
                memory.restore_ram,
                spec,
                None if rec.ram is None else state_dir / rec.ram,
                VmPaths(self.rundir / name).ram,
                state=state,
            )
            runtime.ram = None if ram.ram is None else str(ram.ram.path)
            runtime.ram_shared = ram.ram is not None and ram.ram.shared
            runtime.memory_note = ram.later
            # Frozen before QEMU opens the taps: a frame of the timeline being
            # replaced (a peer elsewhere not yet stopped) must not wait in a
            # tap's queue for the restored VM; the freeze catches it as stale.
            await self._make_taps(runtime)
            freeze = self._freeze_for_taps(spec, runtime.taps)
            try:
                await freeze.prepare()
                await freeze.engage()
                machine = await self._launch(runtime, incoming=True)
            except BaseException:
                await freeze.lift()
                raise
            vm = _Vm(runtime, machine, freeze=freeze)
            self._vms[name] = vm
            self._persist(runtime)
            assert rec.memory is not None
            await machine.load_memory(state_dir / rec.memory, ignore_shared=ram.fast)
            # The state's frames; live ones (stale until the resume says) are
            # reported with the resume.
            loaded = freeze.load_pcaps([state_dir / f for f in rec.frames])
            return VmReport(
                name=name,
                frames_held=loaded,
                memory_path="fast" if ram.fast else "standard",
                memory_note=ram.note,
            )

        try:
            reports = await _gather_all([one(n, r) for n, r in sorted(manifest.vms.items())])
        except BaseException:
            operation.advance(OpPhase.ABORTED)
            self._close_op(op)
            raise
        operation.advance(OpPhase.PREPARED)
        await self._fault.at("prepare_restore:after")
        return reports

    # -- states -------------------------------------------------------------------

    def _info(self, m: Manifest) -> StateInfo:
        return StateInfo(
            name=m.name,
            host=m.host,
            created_at=m.created_at,
            parent=m.parent,
            vms=sorted(m.vms),
            size_bytes=sum(f.size for f in m.files.values()),
        )

    def states(self) -> list[StateInfo]:
        """The committed states on this host, oldest first."""
        return [self._info(m) for m in self.store.list()]

    def state_show(self, name: str) -> dict[str, Any]:
        """One state's manifest as JSON-ready data.

        Raises:
            StateNotFound: no such state here.
        """
        data: dict[str, Any] = json.loads(self.store.show(name).to_json())
        return data

    def state_frames(self, name: str, vm: str) -> Iterator[tuple[str, bytes]]:
        """The frames held for ``vm`` in state ``name``: its NICs' pcap files, in chunks.

        Yields (file name, chunk) pairs, file after file in NIC order; a file
        with no frame still yields its pcap header.

        Raises:
            StateNotFound: no such state here, or the state holds no VM ``vm`` here.
        """
        validate_name("state", name)
        manifest = self.store.show(name)
        rec = manifest.vms.get(vm)
        if rec is None:
            raise StateNotFound(
                f"state {name!r} on host {self.config.host} has no VM {vm!r}"
                f" (it has {', '.join(sorted(manifest.vms)) or 'none'})"
            )
        paths = [self.store.states_dir / name / f for f in rec.frames]
        return _file_chunks(paths)

    async def state_delete(self, name: str) -> list[str]:
        """Delete a state nothing depends on; return the layer ids removed.

        Raises:
            StateNotFound: no such state here.
            StateInUse: another state or a running VM depends on its layers.
        """
        async with self._lock:
            garbage = self.store.delete(name, self._active_chains())
            for layer in garbage:
                disk.remove_layer(disk.layer_path(self.store.layers_dir, layer))
            return sorted(garbage)


def _file_chunks(paths: Sequence[Path]) -> Iterator[tuple[str, bytes]]:
    """(file name, chunk) pairs of ``paths``, read ``_CHUNK`` bytes at a time.

    Raises:
        StoreError: a file cannot be read (the state is damaged).
    """
    for path in paths:
        try:
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    yield path.name, chunk
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from exc


def _in_background(fn: Callable[[A], R], arg: A) -> R:
    """``fn(arg)`` at the lowest CPU priority (it runs while the VMs do)."""
    with background():
        return fn(arg)
