"""Operation lifecycles: only the allowed transitions of each kind, in the documented order."""

from __future__ import annotations

import pytest

from lockstep.execd.ops import Lifecycle, OperationError, OpKind, OpPhase


def _save() -> Lifecycle:
    return Lifecycle("o1", OpKind.SAVE, "save 's'")


def _restore() -> Lifecycle:
    return Lifecycle("o2", OpKind.RESTORE, "restore 's'")


def test_save_path_then_commit() -> None:
    """A keep-running save walks OPEN, PAUSED, SAVED, DRAINED, RESUMED, COMMITTED."""
    op = _save()
    path = [OpPhase.PAUSED, OpPhase.SAVED, OpPhase.DRAINED, OpPhase.RESUMED, OpPhase.COMMITTED]
    for phase in path:
        op.advance(phase)
    assert op.history == [OpPhase.OPEN, *path]


def test_save_stop_path_and_an_undone_commit() -> None:
    """--stop commits then stops; a commit another host failed can still be undone (ABORTED)."""
    op = _save()
    for phase in (OpPhase.PAUSED, OpPhase.SAVED, OpPhase.DRAINED, OpPhase.COMMITTED):
        op.advance(phase)
    op.advance(OpPhase.STOPPED)
    with pytest.raises(OperationError, match="cannot go from stopped to aborted"):
        op.advance(OpPhase.ABORTED)
    undone = _save()
    for phase in (OpPhase.PAUSED, OpPhase.SAVED, OpPhase.DRAINED, OpPhase.RESUMED):
        undone.advance(phase)
    undone.advance(OpPhase.COMMITTED)
    undone.advance(OpPhase.ABORTED)
    assert undone.history[-2:] == [OpPhase.COMMITTED, OpPhase.ABORTED]


def test_restore_path_switch_back_and_no_save_phases() -> None:
    """A restore walks OPEN, PREPARED, SWITCHED, RESUMED, COMMITTED; SWITCHED and RESUMED can abort.

    A save's phases are not a restore's: a restore never pauses or drains, it
    never resumes before it switched, and a committed restore cannot be aborted.
    """
    op = _restore()
    for phase in (OpPhase.PREPARED, OpPhase.SWITCHED, OpPhase.RESUMED, OpPhase.COMMITTED):
        op.advance(phase)
    assert op.history == [
        OpPhase.OPEN, OpPhase.PREPARED, OpPhase.SWITCHED, OpPhase.RESUMED, OpPhase.COMMITTED,
    ]  # fmt: skip
    with pytest.raises(OperationError, match="cannot go from committed to aborted"):
        op.advance(OpPhase.ABORTED)
    for last in (OpPhase.SWITCHED, OpPhase.RESUMED):
        back = _restore()
        back.advance(OpPhase.PREPARED)
        back.advance(OpPhase.SWITCHED)
        if last is OpPhase.RESUMED:
            back.advance(OpPhase.RESUMED)
        back.advance(OpPhase.ABORTED)
    skip = _restore()
    skip.advance(OpPhase.PREPARED)
    with pytest.raises(OperationError, match="cannot go from prepared to resumed"):
        skip.advance(OpPhase.RESUMED)
    with pytest.raises(OperationError, match="cannot go from open to paused"):
        _restore().advance(OpPhase.PAUSED)
    with pytest.raises(OperationError, match="cannot go from open to prepared"):
        _save().advance(OpPhase.PREPARED)


def test_out_of_order_refused() -> None:
    """Resuming before memory is saved, or stopping before commit, is refused with the phase named."""
    op = _save()
    op.advance(OpPhase.PAUSED)
    with pytest.raises(OperationError, match="cannot go from paused to resumed"):
        op.advance(OpPhase.RESUMED)
    with pytest.raises(OperationError, match=r"\(save 's'\) is paused; this step needs it drained"):
        op.require(OpPhase.DRAINED)
    with pytest.raises(OperationError, match="cannot go from paused to stopped"):
        op.advance(OpPhase.STOPPED)


def test_abort_from_every_open_phase() -> None:
    """Every phase before commit can abort, for both kinds."""
    for make, path in (
        (_save, []),
        (_save, [OpPhase.PAUSED]),
        (_save, [OpPhase.PAUSED, OpPhase.SAVED]),
        (_save, [OpPhase.PAUSED, OpPhase.SAVED, OpPhase.DRAINED]),
        (_restore, []),
        (_restore, [OpPhase.PREPARED]),
    ):
        op = make()
        for p in path:
            op.advance(p)
        op.advance(OpPhase.ABORTED)
        assert op.phase is OpPhase.ABORTED


def test_found_after_a_restart_starts_over_in_its_phase() -> None:
    """An operation read back from the journal starts in its recorded phase, history fresh."""
    op = _restore()
    op.found_in(OpPhase.RESUMED)
    assert (op.phase, op.history) == (OpPhase.RESUMED, [OpPhase.RESUMED])
    op.advance(OpPhase.COMMITTED)
