"""The execd's dead-man's timer, in-process: operations whose caller went quiet end by themselves."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from lockstep.execd.model import ExecdConfig
from lockstep.execd.ops import Operation, OperationError, OpKind
from lockstep.execd.service import HostService

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the service reads netlink as root")


def _service(root: Path) -> HostService:
    return HostService(ExecdConfig(host="h1", root=root))


async def _open(service: HostService, op: str, deadline_in: float) -> None:
    await service.start()
    staging = service.store.begin(f"state-{op}")
    service._staging[op] = staging
    service._open_op(
        Operation(op, OpKind.SAVE, f"state-{op}", [], service.clock.now() + deadline_in)
    )


def test_operation_expires_at_its_deadline_not_before(tmp_path: Path) -> None:
    """An unattended save lives until its deadline, then its staging state is dropped."""

    async def run() -> None:
        service = _service(tmp_path)
        await _open(service, "op1", 0.4)
        await asyncio.sleep(0.2)
        assert "op1" in service._ops
        assert list(service.store.staging_dir.iterdir())
        await asyncio.sleep(0.4)
        assert "op1" not in service._ops
        assert not list(service.store.staging_dir.iterdir())
        assert not list((tmp_path / "run" / "ops").iterdir())
        await service.close()

    asyncio.run(run())


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
        assert "op2" in service._ops
        await service.abort("op2", None)
        assert "op2" not in service._ops
        await service.close()

    asyncio.run(run())


def test_busy_step_holds_off_expiry(tmp_path: Path) -> None:
    """While a step of the operation runs, the timer waits for it to finish."""

    async def run() -> None:
        service = _service(tmp_path)
        await _open(service, "op3", 0.1)
        service._busy["op3"] = 1
        await asyncio.sleep(0.4)
        assert "op3" in service._ops
        del service._busy["op3"]
        await asyncio.sleep(0.2)
        assert "op3" not in service._ops
        await service.close()

    asyncio.run(run())


def test_restarted_execd_finds_the_operation_and_expires_it(tmp_path: Path) -> None:
    """An operation on disk when execd restarts is an orphan: only abort or expiry end it."""

    async def run() -> None:
        first = _service(tmp_path)
        await _open(first, "op4", 1.0)
        await first.close()
        second = _service(tmp_path)
        await second.start()
        assert second._ops["op4"].orphan
        with pytest.raises(OperationError, match="execd restarted during operation op4"):
            await second.drain("op4", 0.01, 0.1)
        await asyncio.sleep(1.2)
        assert "op4" not in second._ops
        assert not list(second.store.staging_dir.iterdir()), "staging is dropped at start"
        await second.close()

    asyncio.run(run())


def test_unknown_operation_abort_is_a_no_op(tmp_path: Path) -> None:
    """Aborting an operation this host never saw (or already ended) undoes nothing, fails nothing."""

    async def run() -> None:
        service = _service(tmp_path)
        await service.start()
        assert await service.abort("never-was", None) == []
        await service.close()

    asyncio.run(run())
