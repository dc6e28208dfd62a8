"""Operations in progress on one execd: each save or restore is one object with its lifecycle.

An :class:`Operation` owns what it works on (its VMs, its staging state, its
freezes, its frames and RAM images, a restore's new VMs) and knows how to
undo itself (:meth:`Operation.abort`) and how to end when its caller goes
quiet (:meth:`Operation.expire`). Its :class:`Lifecycle` moves through
:class:`OpPhase` along the transitions its kind allows; a step asked out of
order fails with a clear error instead of half-doing something. The concrete
operations are :class:`lockstep.execd.save.SaveOperation` and
:class:`lockstep.execd.restore.RestoreOperation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from lockstep.errors import LockstepError

if TYPE_CHECKING:
    from lockstep.execd.host import Host
    from lockstep.execd.model import VmReport
    from lockstep.execd.vms import HostVm

__all__ = ["Lifecycle", "OpKind", "OpPhase", "Operation", "OperationError"]


class OperationError(LockstepError):
    """An operation step was asked out of order, or for an unknown operation."""


class OpKind(enum.Enum):
    """What an operation does."""

    SAVE = "save"
    RESTORE = "restore"


class OpPhase(enum.Enum):
    """Where an operation is; the happy paths are

    save:    OPEN -> PAUSED -> SAVED -> DRAINED -> RESUMED -> COMMITTED
             OPEN -> PAUSED -> SAVED -> DRAINED -> COMMITTED -> STOPPED  (--stop)
    restore: OPEN -> PREPARED -> SWITCHED -> RESUMED -> COMMITTED
             (SWITCHED: the old VMs paused and the new ones in their place, paused;
              RESUMED: the new VMs run)

    Any phase before COMMITTED may go to ABORTED (a restore's SWITCHED and
    RESUMED too: it swaps back); a save's COMMITTED too, when another host
    failed to commit.
    """

    OPEN = "open"
    PAUSED = "paused"
    SAVED = "saved"
    DRAINED = "drained"
    PREPARED = "prepared"
    SWITCHED = "switched"
    RESUMED = "resumed"
    COMMITTED = "committed"
    STOPPED = "stopped"
    ABORTED = "aborted"


_P = OpPhase
_ALLOWED: Mapping[OpKind, Mapping[OpPhase, frozenset[OpPhase]]] = {
    OpKind.SAVE: {
        _P.OPEN: frozenset({_P.PAUSED, _P.ABORTED}),
        _P.PAUSED: frozenset({_P.SAVED, _P.ABORTED}),
        _P.SAVED: frozenset({_P.DRAINED, _P.ABORTED}),
        _P.DRAINED: frozenset({_P.RESUMED, _P.COMMITTED, _P.ABORTED}),
        _P.RESUMED: frozenset({_P.COMMITTED, _P.ABORTED}),
        _P.COMMITTED: frozenset({_P.STOPPED, _P.ABORTED}),
        _P.STOPPED: frozenset(),
        _P.ABORTED: frozenset(),
    },
    OpKind.RESTORE: {
        _P.OPEN: frozenset({_P.PREPARED, _P.ABORTED}),
        _P.PREPARED: frozenset({_P.SWITCHED, _P.ABORTED}),
        _P.SWITCHED: frozenset({_P.RESUMED, _P.ABORTED}),
        _P.RESUMED: frozenset({_P.COMMITTED, _P.ABORTED}),
        _P.COMMITTED: frozenset(),
        _P.ABORTED: frozenset(),
    },
}


@dataclass
class Lifecycle:
    """The phase of one operation of ``kind`` and every phase it went through."""

    op: str
    kind: OpKind
    what: str  # for messages: "save 'base'"
    phase: OpPhase = OpPhase.OPEN
    history: list[OpPhase] = field(default_factory=lambda: [OpPhase.OPEN])

    def require(self, *phases: OpPhase) -> None:
        """Fail unless the operation is in one of ``phases``.

        Raises:
            OperationError: it is not.
        """
        if self.phase not in phases:
            wanted = " or ".join(p.value for p in phases)
            raise OperationError(
                f"operation {self.op} ({self.what}) is {self.phase.value};"
                f" this step needs it {wanted}"
            )

    def found_in(self, phase: OpPhase) -> None:
        """Start over in ``phase``, as a restarted execd finds the operation on disk."""
        self.phase = phase
        self.history = [phase]

    def advance(self, new: OpPhase) -> None:
        """Move to ``new`` if this kind's lifecycle allows it.

        Raises:
            OperationError: the transition is not allowed.
        """
        if new not in _ALLOWED[self.kind][self.phase]:
            raise OperationError(
                f"operation {self.op}: cannot go from {self.phase.value} to {new.value}"
            )
        self.phase = new
        self.history.append(new)


class Operation:
    """One save or restore as this host sees it (subclasses do the steps)."""

    kind: ClassVar[OpKind]

    def __init__(
        self,
        host: Host,
        op: str,
        state: str,
        vms: list[str],
        deadline: float,
        *,
        orphan: bool = False,
    ) -> None:
        self.host = host
        self.id = op
        self.state = state
        self.vms = vms
        self.deadline = deadline
        # Found on disk after an execd restart: it can only be aborted or expire.
        self.orphan = orphan
        self.life = Lifecycle(op, self.kind, f"{self.kind.value} {state!r}")
        # One thing at a time: a step, an abort or the dead-man's expiry.
        self._turn = asyncio.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, {self.state!r}, {self.phase.value})"

    @property
    def phase(self) -> OpPhase:
        """Where the operation is."""
        return self.life.phase

    @property
    def history(self) -> list[OpPhase]:
        """Every phase it went through, in order."""
        return list(self.life.history)

    @property
    def ended(self) -> bool:
        """Whether nothing is left to do (no step, no expiry)."""
        return self.phase in (OpPhase.STOPPED, OpPhase.ABORTED) or (
            self.phase is OpPhase.COMMITTED and not self.awaits_after_commit
        )

    @property
    def awaits_after_commit(self) -> bool:
        """Whether a step still follows the commit (a ``save --stop``'s stop)."""
        return False

    @property
    def due(self) -> bool:
        """Whether the dead-man's timer may end it now: not ended, nothing of it running."""
        return not self.ended and not self._turn.locked()

    @contextlib.asynccontextmanager
    async def step(self) -> AsyncIterator[None]:
        """Run one step of it, once nothing else of it runs; the timer never expires it meanwhile.

        A step that waited while the operation was aborted or expired finds
        it ended and is refused.

        Raises:
            OperationError: it was found after an execd restart (only abort
                ends it), or it ended while the step waited its turn.
        """
        if self.orphan:
            raise OperationError(
                f"host {self.host.name}: execd restarted during operation {self.id}; it can"
                " only be aborted (its VMs resume at its deadline)"
            )
        async with self._turn:
            if self.ended:
                raise OperationError(
                    f"host {self.host.name}: operation {self.id} has ended"
                    f" ({self.phase.value}: aborted, or its deadline passed with no word"
                    " from the caller)"
                )
            yield

    @contextlib.asynccontextmanager
    async def ending(self) -> AsyncIterator[None]:
        """End it (abort, expiry) once no step of it runs: never two things at once on its VMs."""
        async with self._turn:
            yield

    def advance(self, new: OpPhase) -> None:
        """Move on to ``new`` and keep the journal's record in step.

        Raises:
            OperationError: the lifecycle does not allow it.
        """
        self.life.advance(new)
        if self.ended:
            self.host.journal.remove(self.id)
        else:
            self.save_record()

    def record(self) -> dict[str, Any]:
        """What survives an execd restart (see :meth:`Operation.extra_record`)."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "state": self.state,
            "vms": self.vms,
            "deadline": self.deadline,
            "phase": self.phase.value,
            **self.extra_record(),
        }

    def extra_record(self) -> dict[str, Any]:
        """What a kind of operation adds to its record."""
        return {}

    def save_record(self) -> None:
        """Write the record into the journal."""
        self.host.journal.write(self.id, self.record())

    def extend(self, deadline: float) -> None:
        """Push back the deadline (kept in the journal, for a restart)."""
        self.deadline = deadline
        if not self.ended:
            self.save_record()

    def targets(self) -> list[HostVm]:
        """The VMs of the operation this host runs now."""
        return [vm for n in self.vms if (vm := self.host.vms.get(n)) is not None]

    def held_chains(self) -> dict[str, list[str]]:
        """Layer chains of VMs the operation holds that the host does not run (yet)."""
        return {}

    async def abort(self, resume_at: float | None) -> list[VmReport]:
        """Undo the operation; VMs that must run again resume at ``resume_at``."""
        raise NotImplementedError

    async def expire(self) -> None:
        """End the operation at its deadline: its caller went quiet."""
        raise NotImplementedError
