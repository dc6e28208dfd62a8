"""The runner: walks a plan's phases over one operation; on a failure, runs the phase's undo.

It knows no phase by name. Each phase's action asks every host and gets one
result per host; when some host failed, the runner runs the undo that phase
calls for and raises one sentence: the step, each host that failed and why,
and what the undo did. The operation's runstate and history record the run.
While it runs, the hosts' dead-man deadline is kept pushed back.

Cancellation is not caught: the run stops where it is (runstate RUNNING) and
sends nothing more; each host's dead-man timer resumes what it paused.
"""

from __future__ import annotations

from collections.abc import Sequence

from lockstep.caller.links import HostsFailed, Results
from lockstep.caller.operation import Operation, Runstate
from lockstep.caller.plan import Phase
from lockstep.errors import LockstepError, OperationFailed

__all__ = ["run"]


async def run(op: Operation, plan: Sequence[Phase]) -> None:
    """Run ``plan``'s phases over ``op`` in order.

    Raises:
        OperationFailed: a phase failed on some host; its undo ran (the
            sentence names the step, the hosts and what was undone).
        ClockError: the first clock sync predicts more skew than the budget.
        RuntimeError: ``op`` ran already.
    """
    op.advance(Runstate.RUNNING)
    async with op.keepalive():
        for phase in plan:
            op.enter(phase.name)
            try:
                await phase.act(op)
            except HostsFailed as exc:
                said = exc.say(phase.what or phase.name) + await _undo(op, phase, exc.results)
                raise OperationFailed(said) from exc.cause
            except LockstepError:
                await _undo(op, phase, {})  # a refusal (clock budget): its sentence stands
                raise
    op.advance(Runstate.DONE)


async def _undo(op: Operation, phase: Phase, results: Results) -> str:
    """Run ``phase``'s undo, if it has one; what it did, to end the error's sentence."""
    if phase.undo is None:
        op.advance(Runstate.FAILED)
        return ""
    op.advance(Runstate.UNDOING)
    op.history.append(f"undo: {phase.undo.name}")
    said = await phase.undo.run(op, results)
    op.advance(Runstate.FAILED)
    return said
