"""One save or restore in progress: the context its phases act on, and its runstate.

An :class:`Operation` holds all a phase needs: the op id the hosts know it by,
the state's name, the hosts' links and the VMs on each, the clock estimates,
the report being built, the progress callback, the dead-man deadline the hosts
were given, and the options. Its runstate moves along these transitions only
(:mod:`lockstep.caller.runner` moves it)::

    READY -> RUNNING -> DONE
                     -> UNDOING -> FAILED    (a phase failed; its undo ran)
                     -> FAILED               (a phase failed with nothing to undo)

:attr:`Operation.history` is what the runner did, in order: each phase's
name as it began, then ``undo: NAME`` if a failure's undo ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lockstep.caller.clock import ClockEstimate, SyncPolicy, to_host
from lockstep.caller.links import HostLink, everywhere, fanout
from lockstep.caller.report import OperationReport
from lockstep.execd.model import VmReport

__all__ = [
    "DELIVER_SECONDS_PER_FRAME",
    "PAUSE_MARGIN",
    "RESUME_MARGIN",
    "Operation",
    "Options",
    "Progress",
    "Runstate",
]

T = TypeVar("T")

# How far ahead of "now" a common instant is set (plus 4 times the worst
# measured delay): the call must reach every host, and for a pause the host
# must prepare its freeze, before it. A resume's margin is the VMs' downtime.
PAUSE_MARGIN = 0.35
RESUME_MARGIN = 0.05
# Held frames are queued on the taps before the VMs resume (lockstep.net.freeze):
# the resume instant leaves this long per frame a host holds (a slow machine's
# Python injects one in about 10 us).
DELIVER_SECONDS_PER_FRAME = 20e-6

Progress = Callable[[str, Mapping[str, Any]], None]
"""Called with (event, details): "phase" {name}, "memory" {vm, done, total}."""


@dataclass(frozen=True)
class Options:
    """How the user asked for the operation.

    ``stop``: destroy the VMs after a save; ``quiet`` and ``drain_limit``: the
    drain's quiet time and bound (s); ``force``: go on despite noisy clocks;
    ``verify``: a restore checks the hash of the guests' RAM too;
    ``set_guest_time``: the VMs whose guest wall clock a restore sets to true
    time (the others keep the saved time).
    """

    stop: bool = False
    quiet: float = 0.05
    drain_limit: float = 1.0
    force: bool = False
    verify: bool = False
    set_guest_time: frozenset[str] = frozenset()


class Runstate(enum.Enum):
    """Where an operation is, as the caller runs it (see the module docstring)."""

    READY = "ready"
    RUNNING = "running"
    UNDOING = "undoing"
    DONE = "done"
    FAILED = "failed"


_ALLOWED: Mapping[Runstate, frozenset[Runstate]] = {
    Runstate.READY: frozenset({Runstate.RUNNING}),
    Runstate.RUNNING: frozenset({Runstate.DONE, Runstate.UNDOING, Runstate.FAILED}),
    Runstate.UNDOING: frozenset({Runstate.FAILED}),
    Runstate.DONE: frozenset(),
    Runstate.FAILED: frozenset(),
}


@dataclass
class Operation:
    """One save or restore of the group, as the caller runs it (``kind``: "save" or "restore")."""

    kind: str
    state: str
    hosts: Mapping[str, HostLink]
    vms: Mapping[str, Sequence[str]]  # host -> the group's VMs there
    clock: Callable[[], float]
    sync_policy: SyncPolicy
    deadman: float  # hosts resume the VMs by themselves this long after the last extension
    skew_budget: float
    options: Options = field(default_factory=Options)
    progress: Progress | None = None
    id: str = ""
    est: dict[str, ClockEstimate] = field(default_factory=dict)
    deadline: float | None = None  # caller clock; None until a phase opened the op on hosts
    runstate: Runstate = Runstate.READY
    history: list[str] = field(default_factory=list)
    report: OperationReport = field(init=False)

    def __post_init__(self) -> None:
        self.id = self.id or f"{self.kind}-{secrets.token_hex(6)}"
        self.report = OperationReport(self.state, self.kind, stop=self.options.stop)

    def advance(self, new: Runstate) -> None:
        """Move to runstate ``new``.

        Raises:
            RuntimeError: the lifecycle does not allow it (a bug in the runner).
        """
        if new not in _ALLOWED[self.runstate]:
            raise RuntimeError(
                f"operation {self.id} cannot go from {self.runstate.value} to {new.value}"
            )
        self.runstate = new

    def enter(self, name: str) -> None:
        """Record that phase ``name`` begins, and say so."""
        self.history.append(name)
        self.say("phase", {"name": name})

    def say(self, event: str, details: Mapping[str, Any]) -> None:
        """Tell the progress callback, if any."""
        if self.progress is not None:
            self.progress(event, details)

    async def each(self, call: Callable[[str, HostLink], Awaitable[T]]) -> dict[str, T]:
        """Ask every host at once; every host's answer.

        Raises:
            HostsFailed: some host failed (with every host's result).
        """
        return await everywhere(self.hosts, call)

    def on_host(self, host: str, instant: float) -> float:
        """A caller-clock instant on ``host``'s clock."""
        return to_host(instant, self.est[host])

    def common_instant(self, margin: float) -> float:
        """An instant every host can be told of in time: ``margin`` plus 4 worst delays ahead."""
        worst = max((e.delay for e in self.est.values()), default=0.0)
        return self.clock() + margin + 4 * worst

    def resume_instant(self) -> float:
        """The common resume instant: time for the call, and for the busiest host's held frames."""
        most = max(self.report.frames_held_by_host().values(), default=0)
        return self.common_instant(RESUME_MARGIN + DELIVER_SECONDS_PER_FRAME * most)

    def merge(self, results: Mapping[str, Sequence[VmReport]]) -> None:
        """Add what a step did to each host's VMs to the report."""
        self.report.merge(results, self.est)

    @contextlib.asynccontextmanager
    async def keepalive(self) -> AsyncIterator[None]:
        """While the body runs, push back the hosts' dead-man deadline every third of it.

        Only once a phase opened the operation on the hosts (:attr:`deadline`
        is set); a host that cannot be reached is left to its deadline.
        """

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.deadman / 3)
                if self.deadline is not None:
                    await self._extend()

        task = asyncio.create_task(loop(), name=f"keepalive {self.id}")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _extend(self) -> None:
        """Push the hosts' deadline back to a dead-man time from now."""
        deadline = self.deadline = self.clock() + self.deadman
        await fanout(self.hosts, lambda h, link: link.extend(self.id, self.on_host(h, deadline)))
