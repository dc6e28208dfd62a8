"""The caller's plans, its runner and its operation's lifecycle, with phases made up here."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from lockstep.caller.clock import ClockEstimate, SyncPolicy
from lockstep.caller.links import HostResult, HostsFailed, Results
from lockstep.caller.operation import Operation, Runstate
from lockstep.caller.plan import Phase, restore_plan, save_plan
from lockstep.caller.report import OperationReport
from lockstep.caller.runner import run
from lockstep.errors import ClockError, OperationFailed, RemoteError
from lockstep.execd.model import VmReport


def _op() -> Operation:
    return Operation(
        "save",
        "snap",
        hosts={},
        vms={},
        clock=lambda: 100.0,
        sync_policy=SyncPolicy(),
        deadman=30.0,
        skew_budget=0.002,
    )


@dataclass
class Undone:
    """An undo that records that it ran, and with which results."""

    name: str = "put back"
    got: list[Results] = field(default_factory=list)

    async def run(self, op: Operation, results: Results) -> str:
        self.got.append(results)
        return "; it was put back"


async def _fine(op: Operation) -> None:
    op.report.duration_s += 1


async def _h2_fails(op: Operation) -> None:
    raise HostsFailed(
        {
            "h1": HostResult("h1", value=1),
            "h2": HostResult("h2", error=RemoteError("h2: disk full", host="h2")),
        }
    )


async def _refused(op: Operation) -> None:
    raise ClockError("too noisy")


def test_phase_plans() -> None:
    """Save resumes at a common instant before commit; --stop commits then destroys.

    A restore verifies the state first, syncs clocks again after loading, then
    switches over; the steps at a common instant are the pause, the resume
    and the switch-over.
    """
    assert [p.name for p in save_plan(stop=False)] == [
        "clock sync", "freeze NICs and pause", "save memory and freeze disk layers",
        "drain and save held frames", "resume and deliver frames", "commit",
    ]  # fmt: skip
    assert [p.name for p in save_plan(stop=True)] == [
        "clock sync", "freeze NICs and pause", "save memory and freeze disk layers",
        "drain and save held frames", "commit", "destroy VMs",
    ]  # fmt: skip
    assert [p.name for p in restore_plan()] == [
        "verify the state", "clock sync", "load VMs paused, frames held", "clock sync",
        "switch over", "commit",
    ]  # fmt: skip
    common = [p.name for p in save_plan(stop=False) if p.at_common_instant]
    assert common == ["freeze NICs and pause", "resume and deliver frames"]
    assert [p.name for p in restore_plan() if p.at_common_instant] == ["switch over"]


def test_what_each_failure_undoes() -> None:
    """What opens nothing undoes nothing: the state's check, the first clock sync, the destroy.

    The destroy comes after the state is committed; a restore's failed commit
    only says what it means (the switch-over already took effect).
    """
    for plan in (save_plan(stop=False), save_plan(stop=True)):
        bare = [i for i, p in enumerate(plan) if p.undo is None]
        assert bare == [0] + ([5] if plan[-1].name == "destroy VMs" else [])
    restore = restore_plan()
    assert [i for i, p in enumerate(restore) if p.undo is None] == [0, 1]
    assert [p.undo.name for p in restore if p.undo is not None] == [
        "abort", "abort", "abort", "report",
    ]  # fmt: skip


def test_runner_walks_every_phase_in_order() -> None:
    """A plan that succeeds: every phase once, in order, and the operation is DONE."""
    op = _op()
    asyncio.run(run(op, [Phase("one", _fine), Phase("two", _fine), Phase("three", _fine)]))
    assert op.history == ["one", "two", "three"]
    assert op.runstate is Runstate.DONE
    assert op.report.duration_s == 3


def test_runner_undoes_the_failed_phase_and_stops() -> None:
    """A phase failing on h2 runs its own undo with every host's result and ends the run.

    The sentence names the step (its ``what``), the host and the cause, then
    what the undo did; later phases never start.
    """
    op, undo = _op(), Undone()
    plan = [
        Phase("one", _fine),
        Phase("two", _h2_fails, undo, what="doing two"),
        Phase("three", _fine, Undone()),
    ]
    with pytest.raises(OperationFailed) as info:
        asyncio.run(run(op, plan))
    assert str(info.value) == "doing two failed on host h2: h2: disk full; it was put back"
    assert isinstance(info.value.__cause__, RemoteError)
    assert op.history == ["one", "two", "undo: put back"]
    assert op.runstate is Runstate.FAILED
    assert [sorted(r) for r in undo.got] == [["h1", "h2"]]


def test_failure_with_nothing_to_undo() -> None:
    """A phase without an undo fails the run at once; a refusal keeps its own error."""
    op = _op()
    with pytest.raises(OperationFailed, match=r"^two failed on host h2: h2: disk full$"):
        asyncio.run(run(op, [Phase("one", _fine), Phase("two", _h2_fails)]))
    assert op.history == ["one", "two"]
    assert op.runstate is Runstate.FAILED
    refused = _op()
    with pytest.raises(ClockError, match=r"^too noisy$"):
        asyncio.run(run(refused, [Phase("sync", _refused), Phase("two", _fine)]))
    assert refused.history == ["sync"]


def test_an_operation_runs_once() -> None:
    """Running a finished operation again is refused: its runstate allows no way back."""
    op = _op()
    asyncio.run(run(op, [Phase("one", _fine)]))
    with pytest.raises(RuntimeError, match="cannot go from done to running"):
        asyncio.run(run(op, [Phase("one", _fine)]))


def test_instants_leave_room_for_delays_and_frames() -> None:
    """A common instant is margin plus 4 worst delays ahead; a resume adds 20 us per held frame.

    The frames counted are those of the host holding the most.
    """
    op = _op()
    op.est = {"h1": ClockEstimate(0.0, 0.001, 8), "h2": ClockEstimate(2.5, 0.003, 8)}
    assert op.common_instant(0.35) == pytest.approx(100.0 + 0.35 + 0.012)
    op.merge({"h1": [VmReport("p1", frames_held=300)], "h2": [VmReport("s1", frames_held=100)]})
    op.merge({"h2": [VmReport("s2", frames_held=150)]})
    assert op.resume_instant() == pytest.approx(100.0 + 0.05 + 0.012 + 300 * 20e-6)


def test_report_merge_converts_instants_and_keeps_largest_counts() -> None:
    """Instants come back on the caller's clock; a later step's smaller count does not shrink one."""
    report = OperationReport("snap", "save")
    est = {"h2": ClockEstimate(2.5, 0.0, 8), "h1": ClockEstimate(0.0, 0.0, 8)}
    report.merge({"h2": [VmReport("s1", paused_at=12.5, frames_held=4)]}, est)
    report.merge({"h2": [VmReport("s1", resumed_at=13.0, frames_held=2)]}, est)
    report.merge({"h1": [VmReport("p1", paused_at=10.0)]}, est)
    assert [(v.name, v.paused_at, v.resumed_at, v.frames_held) for v in report.vms] == [
        ("p1", 10.0, None, 0),
        ("s1", 10.0, 10.5, 4),
    ]
