"""Operations in progress on one execd, with explicit lifecycles.

A save or restore is an :class:`Operation` that moves through :class:`OpPhase`
along the allowed transitions only; a call out of order fails with a clear
error instead of half-doing something.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from lockstep.errors import LockstepError

__all__ = ["OpKind", "OpPhase", "Operation", "OperationError"]


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
    restore: OPEN -> PREPARED -> RESUMED -> COMMITTED
    and any phase before COMMITTED may go to ABORTED.
    """

    OPEN = "open"
    PAUSED = "paused"
    SAVED = "saved"
    DRAINED = "drained"
    PREPARED = "prepared"
    RESUMED = "resumed"
    COMMITTED = "committed"
    STOPPED = "stopped"
    ABORTED = "aborted"


_ALLOWED: dict[OpPhase, frozenset[OpPhase]] = {
    OpPhase.OPEN: frozenset({OpPhase.PAUSED, OpPhase.PREPARED, OpPhase.ABORTED}),
    OpPhase.PAUSED: frozenset({OpPhase.SAVED, OpPhase.ABORTED}),
    OpPhase.SAVED: frozenset({OpPhase.DRAINED, OpPhase.ABORTED}),
    OpPhase.DRAINED: frozenset({OpPhase.RESUMED, OpPhase.COMMITTED, OpPhase.ABORTED}),
    OpPhase.PREPARED: frozenset({OpPhase.RESUMED, OpPhase.ABORTED}),
    OpPhase.RESUMED: frozenset({OpPhase.COMMITTED, OpPhase.ABORTED}),
    OpPhase.COMMITTED: frozenset({OpPhase.STOPPED}),
    OpPhase.STOPPED: frozenset(),
    OpPhase.ABORTED: frozenset(),
}


@dataclass
class Operation:
    """One save or restore as this host sees it."""

    id: str
    kind: OpKind
    state: str
    vms: list[str]
    deadline: float
    keep_running: bool = True
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
                f"operation {self.id} ({self.kind.value} {self.state!r}) is {self.phase.value};"
                f" this step needs it {wanted}"
            )

    def advance(self, new: OpPhase) -> None:
        """Move to ``new`` if the lifecycle allows it.

        Raises:
            OperationError: the transition is not allowed.
        """
        if new not in _ALLOWED[self.phase]:
            raise OperationError(
                f"operation {self.id}: cannot go from {self.phase.value} to {new.value}"
            )
        self.phase = new
        self.history.append(new)

    @property
    def finished(self) -> bool:
        """Whether nothing more can happen to it."""
        return not _ALLOWED[self.phase] or (
            self.phase is OpPhase.COMMITTED
            and not (self.kind is OpKind.SAVE and not self.keep_running)
        )
