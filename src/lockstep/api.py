"""lockstep for scripts: :class:`Group`, with plain synchronous calls.

::

    from lockstep import Group

    group = Group.load("lockstep.toml")      # or Group.load(): $LOCKSTEP_GROUP, ./lockstep.toml
    group.save("origin")
    ...                                      # break the cluster
    report = group.restore("origin")         # back, in step
    print(report.resume_skew_ms, group.verify()["transitions"])
    group.partition("p1", "s1")              # faults, as `lockstep fault`; the next restore
    group.freeze("p2", 5)                    # undoes them (also: kill, loss, heal, faults)

Each call connects to every host's execd (mutual TLS, from the group file),
does what the same ``lockstep`` command does, and returns its result; errors
are :class:`~lockstep.errors.LockstepError` subclasses with one sentence each.
Calls run their own event loop, so a script (or a pytest test) needs none; from
inside a running event loop, use :class:`lockstep.caller.orchestrator.GroupCaller`
through :func:`lockstep.caller.connect.connected` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lockstep.caller import faults
from lockstep.caller.connect import connected
from lockstep.caller.links import HostsFailed, Results, failures
from lockstep.caller.orchestrator import GroupCaller
from lockstep.caller.report import OperationReport
from lockstep.errors import LabError, LockstepError, OperationFailed
from lockstep.execd.model import (
    FaultAction,
    Freeze,
    Heal,
    HeldFault,
    Kill,
    ListFaults,
    Loss,
    StateInfo,
    VmStatus,
)
from lockstep.group import GroupSpec, group_file_path, load_group
from lockstep.lab.lab import lab_data_dir
from lockstep.lab.verify import (
    EVERYTHING,
    LAST_RESTORE,
    Since,
    console_since,
    log_marks,
    parse_since,
    verify_lab,
)

__all__ = ["Group"]

T = TypeVar("T")
Connect = Callable[[GroupSpec], AbstractAsyncContextManager[GroupCaller]]


@dataclass
class Group:
    """A group of VMs, as its group file describes it; every method talks to its hosts."""

    spec: GroupSpec
    path: Path
    connect: Connect = field(default=connected, repr=False, compare=False)
    """How a call reaches the hosts: mutual-TLS gRPC to each execd (tests hand stubs)."""

    @classmethod
    def load(cls, path: str | Path | None = None) -> Group:
        """The group of ``path`` (default: ``$LOCKSTEP_GROUP``, else ./lockstep.toml).

        Raises:
            ConfigError: the file is missing or not a valid group file.
        """
        file = group_file_path(None if path is None else str(path))
        return cls(load_group(file, check_files=False), file)

    @property
    def name(self) -> str:
        """The group's name."""
        return self.spec.name

    @property
    def lab(self) -> str | None:
        """The embedded lab's name, when this group is one."""
        return self.spec.name if lab_data_dir(self.spec.name).exists() else None

    def _call(self, body: Callable[[GroupCaller], Awaitable[T]]) -> T:
        async def run() -> T:
            async with self.connect(self.spec) as caller:
                return await body(caller)

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(run())
        raise LockstepError(
            "lockstep.Group's calls run an event loop of their own: from async code, use"
            " lockstep.caller.connect.connected(group.spec) and await the GroupCaller"
        )

    def up(self) -> dict[str, list[VmStatus]]:
        """Start every VM of the group that is not running; each host's VMs after."""
        return self._call(lambda c: c.up())

    def down(self) -> dict[str, list[VmStatus]]:
        """Stop every VM of the group (states are kept)."""
        return self._call(lambda c: c.down())

    def status(self) -> dict[str, list[VmStatus]]:
        """Every host's VMs as they are.

        Raises:
            OperationFailed: a host could not say.
        """

        async def body(caller: GroupCaller) -> dict[str, list[VmStatus]]:
            results = await caller.status()
            _raise_failed(results, "status")
            return {h: r.value or [] for h, r in results.items()}

        return self._call(body)

    def save(self, name: str, *, stop: bool = False, force: bool = False) -> OperationReport:
        """Save the group as state ``name`` (see ``lockstep save``)."""
        return self._call(lambda c: c.save(name, stop=stop, force=force))

    def restore(self, name: str, *, verify: bool = False, force: bool = False) -> OperationReport:
        """Restore the group to state ``name`` (see ``lockstep restore``)."""
        return self._call(lambda c: c.restore(name, verify=verify, force=force))

    def states(self) -> list[StateInfo]:
        """The group's states, each as the first host listing it has it, oldest first."""

        async def body(caller: GroupCaller) -> list[StateInfo]:
            seen: dict[str, StateInfo] = {}
            for _host, result in sorted((await caller.states()).items()):
                for info in result.value or []:
                    seen.setdefault(info.name, info)
            return sorted(seen.values(), key=lambda s: (s.created_at, s.name))

        return self._call(body)

    def delete_state(self, name: str) -> None:
        """Delete state ``name`` on every host that has it."""
        self._call(lambda c: c.state_delete(name))

    # -- faults (lockstep fault ...): each undone by the next restore ------------

    def kill(self, vm: str) -> str:
        """Kill ``vm``'s QEMU (SIGKILL), as a crashed node; the fault's id."""
        return self._fault(Kill(vm))

    def freeze(self, vm: str, seconds: float) -> str:
        """Pause ``vm`` alone for ``seconds``, then let it run on; the fault's id."""
        return self._fault(Freeze(vm, seconds))

    def partition(self, a: str, b: str) -> str:
        """Cut the network between the VMs ``a`` and ``b`` name (VMs or hosts, comma-separated)."""
        return self._fault(faults.partition(self.spec, a, b))

    def loss(self, vm: str, percent: int) -> str:
        """Drop ``percent`` of the frames to and from ``vm``, at random; the fault's id."""
        return self._fault(Loss(vm, percent))

    def heal(self, *ids: str) -> None:
        """Undo the faults ``ids`` (none: every fault of the group).

        Raises:
            OperationFailed: some host could not heal (the sentence says which and why).
        """
        self._fault(Heal(ids))

    def faults(self) -> dict[str, list[HeldFault]]:
        """The faults each host holds now.

        Raises:
            OperationFailed: some host could not say.
        """
        held: dict[str, list[HeldFault]] = {}

        async def body(caller: GroupCaller) -> None:
            _fid, results = await caller.fault(ListFaults())
            _raise_failed(results, "list faults")
            held.update({h: r.value.held for h, r in results.items() if r.value is not None})

        self._call(body)
        return held

    def _fault(self, action: FaultAction) -> str:
        async def body(caller: GroupCaller) -> str:
            fid, results = await caller.fault(action)
            _raise_failed(results, f"{faults.kind_of(action)} fault")
            return fid

        return self._call(body)

    def marks(self) -> Mapping[str, int]:
        """A mark in the lab guests' logs now, for :meth:`verify` (the embedded lab only).

        Raises:
            LabError: this group is not the embedded lab.
        """
        return log_marks(self._lab_name())

    def verify(
        self, since: str | Since | None = None, marks: Mapping[str, int] | None = None
    ) -> dict[str, Any]:
        """What the lab's guests noticed (``lockstep lab verify --json``).

        Over what they logged since ``marks`` (from :meth:`marks`), or since
        ``since`` (``last-restore``, the default without marks, or a time).

        Raises:
            LabError: this group is not the embedded lab, or its logs cannot be read.
        """
        if since is None:
            window = EVERYTHING if marks is not None else parse_since(LAST_RESTORE)
        else:
            window = parse_since(since) if isinstance(since, str) else since
        return verify_lab(self._lab_name(), window, marks).to_json()

    def console(self, marks: Mapping[str, int], keep: int = 200) -> dict[str, list[str]]:
        """Each lab guest's console lines since ``marks`` (the last ``keep``; embedded lab only).

        Raises:
            LabError: this group is not the embedded lab.
        """
        return console_since(self._lab_name(), marks, keep)

    def _lab_name(self) -> str:
        lab = self.lab
        if lab is None:
            raise LabError(
                f"group {self.name} is not the embedded lab: what its guests noticed is"
                " yours to check (lockstep run takes a check command)"
            )
        return lab


def _raise_failed(results: Results, what: str) -> None:
    """Raise OperationFailed naming the hosts among ``results`` that failed ``what``."""
    if failures(results):
        raise OperationFailed(HostsFailed(results).say(what))
