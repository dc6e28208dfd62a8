"""Operation lifecycles: only the allowed transitions, in the documented order."""

from __future__ import annotations

import pytest

from lockstep.execd.ops import Operation, OperationError, OpKind, OpPhase


def test_save_path_then_commit() -> None:
    """A keep-running save walks OPEN, PAUSED, SAVED, DRAINED, RESUMED, COMMITTED."""
    op = Operation("o1", OpKind.SAVE, "s", ["p1"], deadline=0.0)
    for phase in (
        OpPhase.PAUSED,
        OpPhase.SAVED,
        OpPhase.DRAINED,
        OpPhase.RESUMED,
        OpPhase.COMMITTED,
    ):
        op.advance(phase)
    assert op.history == [
        OpPhase.OPEN,
        OpPhase.PAUSED,
        OpPhase.SAVED,
        OpPhase.DRAINED,
        OpPhase.RESUMED,
        OpPhase.COMMITTED,
    ]


def test_out_of_order_refused() -> None:
    """Resuming before memory is saved, or aborting after commit, is refused with the phase named."""
    op = Operation("o1", OpKind.SAVE, "s", ["p1"], deadline=0.0)
    op.advance(OpPhase.PAUSED)
    with pytest.raises(OperationError, match="cannot go from paused to resumed"):
        op.advance(OpPhase.RESUMED)
    with pytest.raises(OperationError, match="is paused; this step needs it drained"):
        op.require(OpPhase.DRAINED)
    for phase in (OpPhase.SAVED, OpPhase.DRAINED, OpPhase.COMMITTED):
        op.advance(phase)
    with pytest.raises(OperationError):
        op.advance(OpPhase.ABORTED)


def test_abort_from_every_open_phase() -> None:
    """Every phase before commit can abort."""
    for path in ([], [OpPhase.PAUSED], [OpPhase.PAUSED, OpPhase.SAVED], [OpPhase.PREPARED]):
        op = Operation("o", OpKind.SAVE, "s", [], deadline=0.0)
        for p in path:
            op.advance(p)
        op.advance(OpPhase.ABORTED)
        assert op.phase is OpPhase.ABORTED
