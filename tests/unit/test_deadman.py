"""The execd's dead-man's timer: operations whose caller went quiet end by themselves."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from lockstep.execd.deadman import DeadMan
from lockstep.execd.model import ExecdConfig
from lockstep.execd.ops import OperationError, OpPhase
from lockstep.execd.save import SaveOperation
from lockstep.execd.service import HostService

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the service reads netlink as root")


@dataclass
class FakeOp:
    """What the timer sees of an operation."""

    id: str
    deadline: float
    due: bool = True


def test_timer_expires_at_the_deadline_only_what_is_due() -> None:
    """Due operations past their deadline expire; a busy one and a later one wait."""
    now = [100.0]
    ops = [FakeOp("late", 99.0), FakeOp("busy", 99.0, due=False), FakeOp("later", 101.0)]
    expired: list[str] = []

    async def expire(op: object) -> None:
        assert isinstance(op, FakeOp)
        expired.append(op.id)
        ops.remove(op)

    timer = DeadMan(lambda: now[0], lambda: list(ops), expire, lambda _op: None)
    asyncio.run(timer.tick())
    assert expired == ["late"]
    now[0] = 101.0
    asyncio.run(timer.tick())
    assert expired == ["late", "later"]


def test_timer_survives_an_expiry_that_fails_with_any_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An expiry raising something unexpected is logged and the operation closed; the timer runs on.

    It used to catch only LockstepError: anything else ended the safety net
    silently, and every later operation's paused VMs stayed paused.
    """
    now = [100.0]
    ops = [FakeOp("broken", 99.0), FakeOp("next", 100.2)]
    closed: list[str] = []
    expired: list[str] = []

    async def expire(op: object) -> None:
        assert isinstance(op, FakeOp)
        if op.id == "broken":
            raise RuntimeError("boom")
        expired.append(op.id)
        ops.remove(op)

    def close(op: object) -> None:
        assert isinstance(op, FakeOp)
        closed.append(op.id)
        ops.remove(op)

    async def run() -> None:
        timer = DeadMan(lambda: now[0], lambda: list(ops), expire, close)
        timer.start()
        await asyncio.sleep(0.1)
        now[0] = 100.3
        await asyncio.sleep(0.15)
        await timer.stop()

    with caplog.at_level(logging.ERROR):
        asyncio.run(run())
    assert closed == ["broken"]
    assert expired == ["next"]
    assert "operation broken could not expire cleanly" in caplog.text


def _service(root: Path) -> HostService:
    return HostService(ExecdConfig(host="h1", root=root))


async def _open(service: HostService, op: str, deadline_in: float) -> SaveOperation:
    """A save with no VM and a staging state, on record, as pause would open it."""
    await service.start()
    state = f"state-{op}"
    operation = SaveOperation(
        service.host,
        op,
        state,
        [],
        service.clock.now() + deadline_in,
        staging=service.store.begin(state),
    )
    operation.save_record()
    service.ops[op] = operation
    return operation


@root_only
def test_operation_expires_at_its_deadline_not_before(tmp_path: Path) -> None:
    """An unattended save lives until its deadline, then its staging state is dropped."""

    async def run() -> None:
        service = _service(tmp_path)
        op = await _open(service, "op1", 0.4)
        await asyncio.sleep(0.2)
        assert "op1" in service.ops
        assert list(service.store.staging_dir.iterdir())
        await asyncio.sleep(0.4)
        assert "op1" not in service.ops
        assert op.history == [OpPhase.OPEN, OpPhase.ABORTED]
        assert not list(service.store.staging_dir.iterdir())
        assert not list((tmp_path / "run" / "ops").iterdir())
        await service.close()

    asyncio.run(run())


@root_only
def test_extend_pushes_the_deadline_and_persists_it(tmp_path: Path) -> None:
    """A caller that extends keeps its operation alive; the new deadline is on disk."""

    async def run() -> None:
        service = _service(tmp_path)
        await _open(service, "op2", 0.3)
        later = service.clock.now() + 5.0
        service.extend("op2", later)
        record = json.loads((tmp_path / "run" / "ops" / "op2.json").read_text())
        assert record["deadline"] == later
        await asyncio.sleep(0.5)
        assert "op2" in service.ops
        await service.abort("op2", None)
        assert "op2" not in service.ops
        await service.close()

    asyncio.run(run())


@root_only
def test_busy_step_holds_off_expiry(tmp_path: Path) -> None:
    """While a step of the operation runs, the timer waits for it to finish."""

    async def run() -> None:
        service = _service(tmp_path)
        op = await _open(service, "op3", 0.1)
        async with op.step():
            await asyncio.sleep(0.4)
            assert "op3" in service.ops
        await asyncio.sleep(0.2)
        assert "op3" not in service.ops
        await service.close()

    asyncio.run(run())


@root_only
def test_an_abort_waits_for_the_running_step_and_a_waiting_step_finds_it_ended(
    tmp_path: Path,
) -> None:
    """Never two things at once on an operation: step, abort and expiry take turns.

    A caller whose step timed out sends an abort while the execd still runs
    the step: the abort waits for it (both resuming the same VMs once made
    QEMU answer a second ``cont`` with no RESUME event, a 20 s hang). A step
    that arrives while the dead-man's timer ends the operation waits, then
    is refused in one sentence.
    """

    async def run() -> None:
        service = _service(tmp_path)
        op = await _open(service, "op5", 30.0)
        seen: list[str] = []

        async def step() -> None:
            async with op.step():
                seen.append("step")
                await asyncio.sleep(0.3)
                seen.append("step done")

        running = asyncio.create_task(step())
        await asyncio.sleep(0.05)
        assert not op.due
        await service.abort("op5", None)
        seen.append("aborted")
        await running
        assert seen == ["step", "step done", "aborted"]
        assert op.history == [OpPhase.OPEN, OpPhase.ABORTED]

        late = await _open(service, "op6", 0.2)
        async with late.ending():  # as the timer holds it while it expires
            waiting = asyncio.create_task(service.drain("op6", 0.01, 0.1))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            await late.abort(None)
        with pytest.raises(OperationError, match=r"^host h1: operation op6 has ended \(aborted"):
            await waiting
        await service.close()

    asyncio.run(run())


@root_only
def test_restarted_execd_finds_the_operation_and_expires_it(tmp_path: Path) -> None:
    """An operation on disk when execd restarts is an orphan: only abort or expiry end it."""

    async def run() -> None:
        first = _service(tmp_path)
        await _open(first, "op4", 1.0)
        await first.close()
        second = _service(tmp_path)
        await second.start()
        assert second.ops["op4"].orphan
        with pytest.raises(OperationError, match="execd restarted during operation op4"):
            await second.drain("op4", 0.01, 0.1)
        await asyncio.sleep(1.2)
        assert "op4" not in second.ops
        assert not list(second.store.staging_dir.iterdir()), "staging is dropped at start"
        await second.close()

    asyncio.run(run())


@root_only
def test_a_save_found_resumed_ends_at_start_and_a_held_vm_is_refused_to_another_save(
    tmp_path: Path,
) -> None:
    """An operation on VMs another live operation holds is refused, naming the holder.

    A killed execd's save that had resumed its VMs ends as the next execd
    starts: kept until its deadline, its expiry once resumed the VMs of the
    next save mid-way (that save's drain then failed on an assertion). A save
    still pausing its VMs holds them until it ends.
    """

    async def run() -> None:
        first = _service(tmp_path)
        resumed = await _open(first, "op7", 30.0)
        resumed.vms = ["p1"]
        for phase in (OpPhase.PAUSED, OpPhase.SAVED, OpPhase.DRAINED, OpPhase.RESUMED):
            resumed.advance(phase)
        held = await _open(first, "op8", 30.0)
        held.vms = ["p2"]
        held.advance(OpPhase.PAUSED)
        await first.close()

        second = _service(tmp_path)
        await second.start()
        assert "op7" not in second.ops
        assert second.ops["op8"].orphan
        assert sorted(p.name for p in (tmp_path / "run" / "ops").iterdir()) == ["op8.json"]
        at = second.clock.now() + 1.0
        with pytest.raises(
            OperationError,
            match=r"^host h1: VM p2 is held by operation op8 \(save 'state-op8', paused\);"
            r" it ends .* at its deadline in \d+\.\d s$",
        ):
            await second.pause("op9", "s9", at, ["p2"], at + 30.0)
        assert "op9" not in second.ops
        await second.abort("op8", None)
        with pytest.raises(OperationError, match="runs no VM 'p2'"):
            await second.pause("op9", "s9", at, ["p2"], at + 30.0)
        await second.close()

    asyncio.run(run())


@root_only
def test_committed_save_stop_whose_caller_died_stops_its_vms_at_the_deadline(
    tmp_path: Path,
) -> None:
    """A `save --stop` committed, then no word from its caller: at the deadline it stops.

    The timer used to skip committed operations, so a caller that died
    between the commit and the stop left the VMs paused for good.
    """

    async def run() -> None:
        service = _service(tmp_path)
        op = await _open(service, "op5", 0.3)
        op.keep_running = False
        for phase in (OpPhase.PAUSED, OpPhase.SAVED, OpPhase.DRAINED, OpPhase.COMMITTED):
            op.advance(phase)
        assert not op.ended
        await asyncio.sleep(0.6)
        assert "op5" not in service.ops
        assert op.history[-2:] == [OpPhase.COMMITTED, OpPhase.STOPPED]
        assert not list((tmp_path / "run" / "ops").iterdir())
        await service.close()

    asyncio.run(run())


@root_only
def test_unknown_operation_abort_is_a_no_op(tmp_path: Path) -> None:
    """Aborting an operation this host never saw (or already ended) undoes nothing, fails nothing."""

    async def run() -> None:
        service = _service(tmp_path)
        await service.start()
        assert await service.abort("never-was", None) == []
        await service.close()

    asyncio.run(run())
