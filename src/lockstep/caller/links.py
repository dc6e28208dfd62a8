"""The caller's links to the hosts, and calls to all of them at once (Ganeti style).

:func:`fanout` never raises a host's error: it gives one :class:`HostResult`
per host, and whoever called decides to go on, warn, or undo.
:func:`everywhere` is the common decision: every host's value, or
:class:`HostsFailed` carrying all the results.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from lockstep.caller.sync import ProbePath
from lockstep.errors import LockstepError
from lockstep.execd.model import (
    FaultAction,
    FaultReply,
    GuestTime,
    ProbeReply,
    SaveProgress,
    StateInfo,
    VmReport,
    VmStatus,
)
from lockstep.group import VmSpec
from lockstep.store import Verified

__all__ = ["HostLink", "HostResult", "HostsFailed", "Results", "everywhere", "fanout"]

T = TypeVar("T")


class HostLink(Protocol):
    """What the caller needs of one execd (``lockstep.rpc.HostClient`` provides it)."""

    async def probe(self, sent: float) -> ProbeReply: ...
    async def probe_path(self) -> ProbePath | None: ...
    async def up(self, group: str, vms: Sequence[VmSpec]) -> list[VmStatus]: ...
    async def down(self, vms: Sequence[str]) -> list[VmStatus]: ...
    async def status(self) -> list[VmStatus]: ...
    async def pause(
        self, op: str, state: str, at: float, vms: Sequence[str], deadline: float
    ) -> list[VmReport]: ...
    async def save_memory(
        self, op: str, keep_running: bool, progress: Callable[[SaveProgress], None] | None
    ) -> list[VmReport]: ...
    async def drain(self, op: str, quiet: float, limit: float) -> list[VmReport]: ...
    async def resume(
        self, op: str, at: float, guest_time: GuestTime | None = None
    ) -> list[VmReport]: ...
    async def stop(self, op: str) -> list[VmReport]: ...
    async def commit(self, op: str) -> StateInfo | None: ...
    async def abort(self, op: str, resume_at: float | None) -> list[VmReport]: ...
    async def extend(self, op: str, deadline: float) -> None: ...
    async def prepare_restore(self, op: str, state: str, deadline: float) -> list[VmReport]: ...
    async def switch(self, op: str, at: float) -> list[VmReport]: ...
    async def states(self) -> list[StateInfo]: ...
    async def state_show(self, name: str) -> dict[str, Any]: ...
    async def verify_state(self, name: str, deep: bool) -> Verified: ...
    async def state_delete(self, name: str) -> list[str]: ...
    async def state_frames(self, name: str, vm: str) -> list[tuple[str, bytes]]: ...
    async def inject_fault(self, group: str, fault_id: str, action: FaultAction) -> FaultReply: ...


@dataclass(frozen=True)
class HostResult(Generic[T]):
    """One host's answer to a fanned-out call: a value or the error it raised."""

    host: str
    value: T | None = None
    error: LockstepError | None = None

    @property
    def ok(self) -> bool:
        """Whether the call succeeded on this host."""
        return self.error is None


Results = Mapping[str, HostResult[Any]]
"""One result per host, by host name."""


async def fanout(
    hosts: Mapping[str, HostLink],
    call: Callable[[str, HostLink], Awaitable[T]],
) -> dict[str, HostResult[T]]:
    """Run ``call`` on every host at once; one result per host, never raises LockstepError."""

    async def one(name: str, link: HostLink) -> HostResult[T]:
        try:
            return HostResult(name, value=await call(name, link))
        except LockstepError as exc:
            return HostResult(name, error=exc)

    results = await asyncio.gather(*(one(n, link) for n, link in hosts.items()))
    return {r.host: r for r in results}


def failures(results: Results) -> list[HostResult[Any]]:
    """The results of the hosts that failed, in host order as given."""
    return [r for r in results.values() if not r.ok]


class HostsFailed(Exception):
    """Some hosts failed a call :func:`everywhere` made; :attr:`results` has every host's.

    Not a LockstepError: the one who asked words the failure (:meth:`say`) as
    an OperationFailed, with what it undid.
    """

    def __init__(self, results: Results) -> None:
        self.results = dict(results)
        self.failed = failures(self.results)
        super().__init__(self.say("a call"))

    @property
    def cause(self) -> LockstepError | None:
        """The first failed host's error (kept as the cause of the sentence)."""
        return self.failed[0].error if self.failed else None

    def say(self, what: str) -> str:
        """``what`` failed, and where and why: one sentence for all the hosts that failed."""
        parts = [f"on host {r.host}: {r.error}" for r in self.failed]
        return f"{what} failed " + "; ".join(parts)


async def everywhere(
    hosts: Mapping[str, HostLink], call: Callable[[str, HostLink], Awaitable[T]]
) -> dict[str, T]:
    """Run ``call`` on every host at once; every host's value.

    Raises:
        HostsFailed: some host failed (it carries every host's result).
    """
    results = await fanout(hosts, call)
    if failures(results):
        raise HostsFailed(results)
    return {h: cast(T, r.value) for h, r in results.items()}
