"""In-memory execds for the caller's tests: one :class:`StubHost` per host, each a HostLink.

A stub keeps what the caller's commit/abort logic depends on, the way an execd
keeps it (``lockstep.execd.service``): each save or restore has the execd's own
:class:`~lockstep.execd.ops.Lifecycle`, opened by ``pause`` or
``prepare_restore`` and moved on by each call along the allowed transitions
only (a call out of order fails as it would there); ``commit`` lists a save's
state; ``abort`` drops what is not committed, undoes a save this host already
committed, resumes a save's VMs at ``resume_at``. A restore is atomic, as an
execd's: it prepares new VMs beside the running ones, switches over at
``resume`` (each VM's :attr:`StubHost.generation` goes up) and, aborted,
discards what it prepared or switches back.

Its clock is the shared :class:`FakeClock` plus the host's ``offset``: probe
replies carry that clock (``probe_path`` gives None, so sync probes over
``probe``), and a ``delay`` makes each probe's round trip take that long.

A restore's switch-over reports each guest whose wall clock it was asked to
set as :data:`GUEST_BEHIND_MS` behind true time.

Faults injected through it are held by id (``held_faults``) until healed.

It records every call with its arguments (:attr:`StubHost.calls`) and can be
told to fail a call (:meth:`StubHost.fail`: raise an RpcError) or to hang in
it until cancelled (:meth:`StubHost.hang`), after letting some calls through.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lockstep.api import Group
from lockstep.caller.clock import SyncPolicy
from lockstep.caller.orchestrator import GroupCaller
from lockstep.errors import RemoteError, RpcError
from lockstep.execd.model import (
    FaultAction,
    FaultReply,
    GuestTime,
    Heal,
    HeldFault,
    ListFaults,
    ProbeReply,
    SaveProgress,
    StateInfo,
    VmReport,
    VmStatus,
)
from lockstep.execd.ops import Lifecycle, OperationError, OpKind, OpPhase
from lockstep.execd.restore import SWITCH_LEAD
from lockstep.group import GroupSpec, VmSpec, parse_group
from lockstep.store import Verified

__all__ = [
    "GUEST_BEHIND_MS",
    "Call",
    "FakeClock",
    "StubHost",
    "stub_api",
    "stub_group",
    "stub_hosts",
]

MEMORY_BYTES = 1 << 20  # what each VM's memory takes, as a save reports it
GUEST_BEHIND_MS = 61_000.25  # how far a restored guest's wall clock was behind
RUNNING, PAUSED = "running", "paused"


@dataclass
class FakeClock:
    """The caller's clock in these tests: it moves only when told (a stub's probe delay)."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass."""
        self.now += seconds


@dataclass(frozen=True)
class Call:
    """One call a stub host got: its name (the HostLink method) and arguments."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class StubOp:
    """One operation on a stub host: what it is about, and its lifecycle."""

    id: str
    kind: OpKind
    state: str
    vms: list[str]
    deadline: float
    keep_running: bool = True
    life: Lifecycle = field(init=False)

    def __post_init__(self) -> None:
        self.life = Lifecycle(self.id, self.kind, f"{self.kind.value} {self.state!r}")


@dataclass
class _Fault:
    error: RpcError | None  # None: hang until cancelled
    after: int  # calls of that name to let through first


class StubHost:
    """One host's execd, in memory; a :class:`~lockstep.caller.orchestrator.HostLink`.

    ``vms`` run on it; ``states`` are committed here already (holding those
    VMs). Times it takes and gives are on its own clock: ``clock() + offset``.
    """

    def __init__(
        self,
        name: str,
        vms: Sequence[str],
        clock: FakeClock,
        *,
        offset: float = 0.0,
        delay: float = 0.0,
        frames: int = 0,
        states: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.clock = clock
        self.offset = offset
        self.delay = delay
        self.frames = frames  # frames a save holds (and a restore loads) per VM
        self.vms: dict[str, str] = dict.fromkeys(vms, RUNNING)  # name -> runstate
        self.saved: dict[str, StateInfo] = {s: self._info(s, vms) for s in states}  # committed
        self.operations: dict[str, StubOp] = {}  # every one opened here, by id
        self.generation: dict[str, int] = dict.fromkeys(vms, 0)  # VM -> restores it went through
        self.open: set[str] = set()
        self.committed: dict[str, str] = {}  # save op -> its state, once committed here
        self.calls: list[Call] = []
        self._faults: dict[str, _Fault] = {}
        self.held_faults: dict[str, FaultAction] = {}  # injected by ``inject_fault``, by id
        self._new_call: asyncio.Event | None = None  # made in the loop, by reached()

    def __repr__(self) -> str:
        return f"StubHost({self.name!r})"

    # -- what tests arrange and read ------------------------------------------------

    def fail(self, call: str, error: RpcError | None = None, *, after: int = 0) -> None:
        """Make ``call`` raise ``error`` (default: a RemoteError), after ``after`` good calls."""
        default = RemoteError(
            f"{self.name}: {call} failed (injected)",
            host=self.name,
            kind="VmError",
            code="INTERNAL",
        )
        self._faults[call] = _Fault(error or default, after)

    def hang(self, call: str, *, after: int = 0) -> None:
        """Make ``call`` wait until cancelled, after ``after`` good calls."""
        self._faults[call] = _Fault(None, after)

    def now(self) -> float:
        """This host's clock."""
        return self.clock() + self.offset

    def called(self, *, probes: bool = False) -> list[str]:
        """The names of the calls this host got, in order (clock probes only if asked)."""
        skip = () if probes else ("probe", "probe_path")
        return [c.name for c in self.calls if c.name not in skip]

    def args(self, call: str) -> list[Mapping[str, Any]]:
        """The arguments of each ``call`` this host got, in order."""
        return [c.args for c in self.calls if c.name == call]

    async def reached(self, call: str, count: int = 1) -> None:
        """Wait until this host got ``count`` calls of ``call`` (one waiter at a time)."""
        while len(self.args(call)) < count:
            self._new_call = asyncio.Event()
            await self._new_call.wait()

    def history(self, op: str) -> list[OpPhase]:
        """The phases operation ``op`` went through on this host."""
        return list(self.operations[op].life.history)

    # -- internals ----------------------------------------------------------------

    async def _enter(self, call: str, **args: Any) -> None:
        """Record the call; raise or hang if a fault is armed for it."""
        self.calls.append(Call(call, args))
        if self._new_call is not None:
            self._new_call.set()
        fault = self._faults.get(call)
        if fault is None:
            return
        if fault.after > 0:
            fault.after -= 1
            return
        if fault.error is not None:
            raise fault.error
        await asyncio.get_running_loop().create_future()  # never set: waits until cancelled

    def _refuse(self, exc: OperationError | str) -> RemoteError:
        return RemoteError(
            f"{self.name}: {exc}", host=self.name, kind="OperationError", code="FAILED_PRECONDITION"
        )

    def _info(self, state: str, vms: Iterable[str]) -> StateInfo:
        return StateInfo(state, self.name, created_at="2026-12-01T00:00:00.000+00:00", vms=[*vms])

    def _op(self, op: str) -> StubOp:
        if op not in self.open:
            raise self._refuse(f"no operation {op}")
        return self.operations[op]

    def _advance(self, operation: StubOp, phase: OpPhase, *required: OpPhase) -> None:
        try:
            if required:
                operation.life.require(*required)
            operation.life.advance(phase)
        except OperationError as exc:
            raise self._refuse(exc) from exc

    def _open(self, op: str, kind: OpKind, state: str, vms: list[str], deadline: float) -> StubOp:
        if op in self.operations:
            raise self._refuse(f"operation {op} exists already")
        operation = StubOp(op, kind, state, vms, deadline)
        self.operations[op] = operation
        self.open.add(op)
        return operation

    def _resume(self, operation: StubOp, at: float | None) -> list[VmReport]:
        reports = []
        for vm in operation.vms:
            if self.vms.get(vm) == PAUSED:
                self.vms[vm] = RUNNING
                reports.append(
                    VmReport(
                        vm, resumed_at=at, frames_held=self.frames, frames_delivered=self.frames
                    )
                )
            else:
                reports.append(VmReport(vm))
        return reports

    # -- the HostLink ------------------------------------------------------------------

    async def probe(self, sent: float) -> ProbeReply:
        """A clock probe: the reply leaves halfway through ``delay``, stamped on this clock."""
        await self._enter("probe", sent=sent)
        self.clock.advance(self.delay / 2)
        stamp = self.now()
        self.clock.advance(self.delay / 2)
        return ProbeReply(received=stamp, sent=stamp)

    async def probe_path(self) -> None:
        """No light probe path: sync probes over :meth:`probe`."""
        await self._enter("probe_path")

    async def up(self, group: str, vms: Sequence[VmSpec]) -> list[VmStatus]:
        """Start the VMs that do not run."""
        await self._enter("up", group=group, vms=[v.name for v in vms])
        for v in vms:
            self.vms.setdefault(v.name, RUNNING)
        return self._listing()

    async def down(self, vms: Sequence[str]) -> list[VmStatus]:
        """Stop the named VMs (all when empty)."""
        await self._enter("down", vms=list(vms))
        for v in list(vms) or list(self.vms):
            self.vms.pop(v, None)
        return self._listing()

    async def status(self) -> list[VmStatus]:
        """The VMs as they are."""
        await self._enter("status")
        return self._listing()

    def _listing(self) -> list[VmStatus]:
        return [VmStatus(n, runstate) for n, runstate in sorted(self.vms.items())]

    async def pause(
        self, op: str, state: str, at: float, vms: Sequence[str], deadline: float
    ) -> list[VmReport]:
        """Open save ``op`` of ``state``; its VMs pause at ``at``."""
        await self._enter("pause", op=op, state=state, at=at, vms=list(vms), deadline=deadline)
        if state in self.saved:
            raise RemoteError(f"{self.name}: state {state!r} exists", host=self.name)
        operation = self._open(op, OpKind.SAVE, state, list(vms), deadline)
        for vm in operation.vms:
            self.vms[vm] = PAUSED
        self._advance(operation, OpPhase.PAUSED)
        return [VmReport(vm, paused_at=at) for vm in operation.vms]

    async def save_memory(
        self, op: str, keep_running: bool, progress: Callable[[SaveProgress], None] | None
    ) -> list[VmReport]:
        """Write the VMs' memory (reported as done at once)."""
        await self._enter("save_memory", op=op, keep_running=keep_running)
        operation = self._op(op)
        self._advance(operation, OpPhase.SAVED, OpPhase.PAUSED)
        operation.keep_running = keep_running
        for vm in operation.vms:
            if progress is not None:
                progress(SaveProgress(vm, MEMORY_BYTES, MEMORY_BYTES))
        return [VmReport(vm, memory_bytes=MEMORY_BYTES, memory_path="fast") for vm in operation.vms]

    async def drain(self, op: str, quiet: float, limit: float) -> list[VmReport]:
        """Hold ``frames`` frames per VM."""
        await self._enter("drain", op=op, quiet=quiet, limit=limit)
        operation = self._op(op)
        self._advance(operation, OpPhase.DRAINED, OpPhase.SAVED)
        return [VmReport(vm, frames_held=self.frames) for vm in operation.vms]

    async def resume(
        self, op: str, at: float, guest_time: GuestTime | None = None
    ) -> list[VmReport]:
        """A save: resume its paused VMs at ``at``. A restore: switch over to its new VMs."""
        await self._enter("resume", op=op, at=at, guest_time=guest_time)
        operation = self._op(op)
        if operation.kind is OpKind.RESTORE:
            in_one_call = operation.life.phase is OpPhase.PREPARED
            if in_one_call:  # the old VMs pause in this call, SWITCH_LEAD before
                self._advance(operation, OpPhase.SWITCHED, OpPhase.PREPARED)
            self._advance(operation, OpPhase.RESUMED, OpPhase.SWITCHED)
            reports = self._switch(operation, at, +1)
            if not in_one_call:  # they paused in the switch
                reports = [replace(r, paused_at=None) for r in reports]
            named = guest_time.vms if guest_time is not None else ()
            return [
                replace(r, clock_correction_ms=GUEST_BEHIND_MS) if r.name in named else r
                for r in reports
            ]
        if not operation.keep_running:
            raise self._refuse(f"operation {op} saves with --stop; its VMs are not resumed")
        self._advance(operation, OpPhase.RESUMED, OpPhase.DRAINED)
        return self._resume(operation, at)

    async def switch(self, op: str, at: float) -> list[VmReport]:
        """A restore's old VMs pause at ``at``; the new ones take their place, paused."""
        await self._enter("switch", op=op, at=at)
        operation = self._op(op)
        self._advance(operation, OpPhase.SWITCHED, OpPhase.PREPARED)
        for vm in operation.vms:
            self.vms[vm] = PAUSED
        return [VmReport(vm, paused_at=at) for vm in operation.vms]

    def _switch(self, operation: StubOp, at: float | None, step: int) -> list[VmReport]:
        """Swap each VM of a restore for the next (or back to the previous) generation."""
        for vm in operation.vms:
            self.vms[vm] = RUNNING
            self.generation[vm] = self.generation.get(vm, 0) + step
        pause = None if at is None else at - SWITCH_LEAD
        return [
            VmReport(vm, paused_at=pause, resumed_at=at, frames_delivered=self.frames)
            for vm in operation.vms
        ]

    async def stop(self, op: str) -> list[VmReport]:
        """Destroy a committed ``save --stop``'s VMs."""
        await self._enter("stop", op=op)
        operation = self._op(op)
        self._advance(operation, OpPhase.STOPPED, OpPhase.COMMITTED)
        for vm in operation.vms:
            self.vms.pop(vm, None)
        self.open.discard(op)
        return [VmReport(vm, frames_held=self.frames) for vm in operation.vms]

    async def commit(self, op: str) -> StateInfo | None:
        """End a restore; list a save's state (a --stop save stays open for ``stop``)."""
        await self._enter("commit", op=op)
        operation = self._op(op)
        if operation.kind is OpKind.RESTORE:
            self._advance(operation, OpPhase.COMMITTED, OpPhase.RESUMED)
            self.open.discard(op)
            return None
        ready = OpPhase.RESUMED if operation.keep_running else OpPhase.DRAINED
        self._advance(operation, OpPhase.COMMITTED, ready)
        info = self._info(operation.state, operation.vms)
        self.saved[operation.state] = info
        self.committed[op] = operation.state
        if operation.keep_running:
            self.open.discard(op)
        return info

    async def abort(self, op: str, resume_at: float | None) -> list[VmReport]:
        """Undo ``op`` as an execd does: see the module docstring."""
        await self._enter("abort", op=op, resume_at=resume_at)
        if op in self.committed and self.operations[op].kind is OpKind.SAVE:
            self.saved.pop(self.committed.pop(op), None)
            reports: list[VmReport] = []
            if op in self.open:  # a `save --stop`: its VMs are still paused
                reports = self._resume(self.operations[op], resume_at)
                self.open.discard(op)
            return reports
        if op not in self.open:
            return []
        operation = self.operations[op]
        if operation.kind is OpKind.RESTORE:
            switched = operation.life.phase in (OpPhase.SWITCHED, OpPhase.RESUMED)
            reports = self._switch(operation, resume_at, -1) if switched else []
        else:
            reports = self._resume(operation, resume_at)
        self._advance(operation, OpPhase.ABORTED)
        self.open.discard(op)
        return reports

    async def extend(self, op: str, deadline: float) -> None:
        """Push ``op``'s dead-man deadline back."""
        await self._enter("extend", op=op, deadline=deadline)
        self._op(op).deadline = deadline

    async def prepare_restore(self, op: str, state: str, deadline: float) -> list[VmReport]:
        """Prepare the state's VMs beside the running ones (which run on untouched)."""
        await self._enter("prepare_restore", op=op, state=state, deadline=deadline)
        info = self.saved.get(state)
        if info is None:
            raise RemoteError(
                f"{self.name}: no state {state!r}", host=self.name, kind="StateNotFound"
            )
        operation = self._open(op, OpKind.RESTORE, state, list(info.vms), deadline)
        self._advance(operation, OpPhase.PREPARED)
        return [VmReport(vm, frames_held=self.frames) for vm in operation.vms]

    async def states(self) -> list[StateInfo]:
        """The committed states."""
        await self._enter("states")
        return list(self.saved.values())

    async def state_show(self, name: str) -> dict[str, Any]:
        """A state's listing, as a manifest would have it."""
        await self._enter("state_show", name=name)
        info = self.saved.get(name)
        if info is None:
            raise RemoteError(
                f"{self.name}: no state {name!r}", host=self.name, kind="StateNotFound"
            )
        return {"name": info.name, "host": info.host, "vms": {vm: {} for vm in info.vms}}

    async def verify_state(self, name: str, deep: bool) -> Verified:
        """A state's files, all as committed (a fault makes one damaged)."""
        await self._enter("verify_state", name=name, deep=deep)
        if name not in self.saved:
            raise RemoteError(
                f"{self.name}: no state {name!r}", host=self.name, kind="StateNotFound"
            )
        return Verified(files=2, hashed_bytes=4096 if deep else 512, seconds=0.01)

    async def state_delete(self, name: str) -> list[str]:
        """Forget a state."""
        await self._enter("state_delete", name=name)
        if self.saved.pop(name, None) is None:
            raise RemoteError(
                f"{self.name}: no state {name!r}", host=self.name, kind="StateNotFound"
            )
        return []

    async def state_frames(self, name: str, vm: str) -> list[tuple[str, bytes]]:
        """No frames: the stubs hold none in files."""
        await self._enter("state_frames", name=name, vm=vm)
        return []

    async def inject_fault(self, group: str, fault_id: str, action: FaultAction) -> FaultReply:
        """Hold a new fault by id; a heal drops the faults it names (all if none); list lists."""
        await self._enter("inject_fault", group=group, fault_id=fault_id, action=action)
        did: list[str] = []
        if isinstance(action, Heal):
            for fid in [f for f in self.held_faults if not action.ids or f in action.ids]:
                del self.held_faults[fid]
                did.append(f"{fid}: healed")
        elif not isinstance(action, ListFaults):
            self.held_faults[fault_id] = action
            did.append(f"{fault_id}: injected")
        held = [HeldFault(fid, type(f).__name__.lower()) for fid, f in self.held_faults.items()]
        return FaultReply(did=did, held=held)


def stub_hosts(
    placement: Mapping[str, Sequence[str]], clock: FakeClock, **per_host: Mapping[str, Any]
) -> dict[str, StubHost]:
    """One stub per host of ``placement`` (host -> its VMs); ``per_host`` gives StubHost options."""
    return {h: StubHost(h, vms, clock, **per_host.get(h, {})) for h, vms in placement.items()}


def stub_group(
    placement: Mapping[str, Sequence[str]], name: str = "g", *, network: str | None = None
) -> GroupSpec:
    """The group of ``placement`` (host -> its VMs) as a group file would give it.

    Hosts are 10.0.0.N:7443; with ``network``, each VM has one NIC on it (bridge br0).
    """
    vms: dict[str, dict[str, Any]] = {}
    for h, names in placement.items():
        for vm in names:
            vms[vm] = {"host": h, "kernel": "/k"}
            if network is not None:
                vms[vm]["nics"] = [{"network": network, "mac": f"52:54:00:00:00:{len(vms):02x}"}]
    hosts = {h: {"address": f"10.0.0.{i}:7443"} for i, h in enumerate(placement, 1)}
    data: dict[str, Any] = {"name": name, "hosts": hosts, "vms": vms}
    if network is not None:
        data["networks"] = {network: {"bridge": "br0"}}
    return parse_group(data, f"{name}.toml", check_files=False)


def stub_api(
    states: Sequence[str] = ("origin",),
    placement: Mapping[str, Sequence[str]] | None = None,
) -> tuple[Group, dict[str, StubHost]]:
    """A :class:`lockstep.Group` over stub hosts holding ``states``, and the hosts.

    Default placement: p1 on h1, s1 on h2. Each of the Group's calls makes a
    caller of its own over the same stubs, as a script's calls reach one execd.
    """
    placement = placement or {"h1": ["p1"], "h2": ["s1"]}
    clock = FakeClock()
    hosts = stub_hosts(placement, clock, **{h: {"states": states} for h in placement})

    @asynccontextmanager
    async def connect(spec: GroupSpec) -> AsyncIterator[GroupCaller]:
        yield GroupCaller(spec, hosts, clock=clock, sync_policy=SyncPolicy(limit=0.1))

    return Group(stub_group(placement, "lsapi"), Path("lsapi.toml"), connect), hosts
