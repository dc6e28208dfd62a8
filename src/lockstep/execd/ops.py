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
    # Found on disk after an execd restart: it can only expire or be aborted.
    orphan: bool = False
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

    def to_json(self) -> dict[str, object]:
        """What survives an execd restart: enough to resume its VMs at the deadline."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "state": self.state,
            "vms": self.vms,
            "deadline": self.deadline,
        }

    @classmethod
    def orphan_from_json(cls, data: dict[str, object]) -> Operation:
        """An operation read back after a restart, waiting for its deadline.

        Raises:
            ValueError: the record is malformed.
        """
        vms = data.get("vms")
        deadline = data.get("deadline")
        if not isinstance(vms, list) or not isinstance(deadline, int | float):
            raise ValueError("operation record lacks vms or deadline")
        kind = OpKind(str(data["kind"]))
        op = cls(
            id=str(data["id"]),
            kind=kind,
            state=str(data["state"]),
            vms=[str(v) for v in vms],
            deadline=float(deadline),
            orphan=True,
        )
        op.advance(OpPhase.PAUSED if kind is OpKind.SAVE else OpPhase.PREPARED)
        return op
