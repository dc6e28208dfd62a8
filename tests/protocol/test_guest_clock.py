"""Setting restored guests' wall clocks, against a stub QEMU and a stub guest agent (no VM).

The guest agent client keeps its stream in step past stale bytes and says in
one sentence when the agent refuses or stays silent; the execd's clock setting
compensates the agent's latency, skips guests without an agent and never
fails for a guest.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from lockstep.errors import GuestAgentError
from lockstep.execd import guest_clock
from lockstep.execd.guest_clock import NO_AGENT, set_guest_clocks
from lockstep.execd.vms import HostVm, VmRuntime
from lockstep.vm.agent import GuestAgent
from lockstep.vm.machine import Machine
from tests.helpers.execd import execd_host
from tests.helpers.qga_stub import QgaStub
from tests.helpers.qmp_stub import Script, Step
from tests.helpers.rpc import run
from tests.helpers.stub_qemu import StubQemu, attached, status

AGE = 3600.0  # s the restored guest's clock is behind
LEG = 0.02  # s each way through a busy guest's serial port


def chardevs(agent_open: bool) -> tuple[Step, ...]:
    """query-chardev as QEMU answers it: the agent's port open in the guest or not."""
    return (
        Step(
            returns=[
                {"label": "qmp", "filename": "unix:qmp.sock,server=on", "frontend-open": True},
                {
                    "label": "agent",
                    "filename": "unix:agent.sock,server=on",
                    "frontend-open": agent_open,
                },
            ]
        ),
    )


def restored(qemu: StubQemu, agent_open: bool = True) -> tuple[Machine, HostVm]:
    """A running VM (a stub QEMU) whose guest agent's port is open or not."""
    machine, _ = qemu(
        Script({"query-status": status("running"), "query-chardev": chardevs(agent_open)})
    )
    driver = execd_host(machine.paths.rundir.parent / "execd").drivers["qemu"]
    return machine, HostVm(
        VmRuntime(machine.spec, "lab", []), machine, machine.paths.rundir, driver
    )


def test_agent_skips_stale_replies_and_reads_the_guests_clock(tmp_path: Path) -> None:
    """Stale replies an earlier client left (and half a line) are skipped up to the sync's reply."""
    stub = QgaStub(behind=AGE, stale=b'{"return": 12}\n{"return": 1700000000\xff{"ret')

    async def scenario() -> float:
        async with (
            stub.serving(tmp_path / "agent.sock"),
            GuestAgent("p1", tmp_path / "agent.sock") as agent,
        ):
            await agent.sync(timeout=5)
            return int(await agent.execute("guest-get-time", timeout=5)) / 1e9

    guest = run(scenario())
    assert guest == pytest.approx(time.time() - AGE, abs=1.0)
    assert stub.received == ["guest-sync-delimited", "guest-get-time"]


def test_agent_refusal_and_silence_are_one_sentence_each(tmp_path: Path) -> None:
    """A refused command names the VM, the command and the agent's reason; silence, the wait."""
    unsupported = "this feature or command is not currently supported"
    stub = QgaStub(refuse={"guest-set-time": unsupported}, hang=frozenset({"guest-get-time"}))

    async def scenario() -> tuple[str, str]:
        async with (
            stub.serving(tmp_path / "agent.sock"),
            GuestAgent("p1", tmp_path / "agent.sock") as agent,
        ):
            await agent.sync(timeout=5)
            with pytest.raises(GuestAgentError) as refused:
                await agent.execute("guest-set-time", {"time": 1}, timeout=5)
            with pytest.raises(GuestAgentError) as silent:
                await agent.execute("guest-get-time", timeout=0.2)
            return str(refused.value), str(silent.value)

    refused, silent = run(scenario())
    assert refused == f"VM p1: the guest agent refused guest-set-time: {unsupported}"
    assert silent == "VM p1: the guest agent did not answer guest-get-time within 0.2 s"


def test_clock_is_set_to_true_time_with_the_agents_latency_compensated(qemu: StubQemu) -> None:
    """A guest an hour behind ends within a few ms of true time, though each way takes 20 ms.

    True time is this host's clock plus the shift the caller's clock gives
    (here 0.25 s); the correction reported is how far behind the guest was.
    Sent uncompensated, the time would arrive 20 ms late.
    """
    machine, vm = restored(qemu)
    stub = QgaStub(behind=AGE, leg=LEG)
    shift = 0.25

    async def scenario() -> guest_clock.ClockSet:
        async with stub.serving(machine.paths.agent):
            sets = await set_guest_clocks([vm], time.time, shift)
        return sets["p1"]

    result = attached(machine, scenario)
    probes = ["guest-get-time"] * 3
    assert stub.received == ["guest-sync-delimited", *probes, "guest-set-time", *probes]
    assert stub.offset == pytest.approx(shift, abs=0.008)
    assert result.correction_ms == pytest.approx((AGE + shift) * 1000, abs=8)
    assert result.note == ""


def test_a_set_that_lands_late_is_checked_and_set_again(qemu: StubQemu) -> None:
    """A first set that takes effect late (a busy guest) is found off by the check, and redone."""
    machine, vm = restored(qemu)
    stub = QgaStub(behind=AGE, late_sets=(0.05,))

    async def scenario() -> guest_clock.ClockSet:
        async with stub.serving(machine.paths.agent):
            return (await set_guest_clocks([vm], time.time, 0.0))["p1"]

    result = attached(machine, scenario)
    assert len(stub.set_to) == 2
    assert stub.offset == pytest.approx(0.0, abs=0.005)
    assert result.correction_ms == pytest.approx(AGE * 1000, abs=5)


def test_guest_without_agent_is_reported_and_not_waited_for(qemu: StubQemu) -> None:
    """A guest whose agent port is closed (no qemu-ga) is "no guest agent", at once."""
    machine, vm = restored(qemu, agent_open=False)

    async def scenario() -> tuple[guest_clock.ClockSet, float]:
        started = time.monotonic()
        sets = await set_guest_clocks([vm], time.time, 0.0)
        return sets["p1"], time.monotonic() - started

    result, took = attached(machine, scenario)
    assert (result.correction_ms, result.note) == (None, NO_AGENT)
    assert took < 1.0


def test_silent_agent_is_reported_not_raised(
    qemu: StubQemu, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent that never answers costs its bounded wait and a note; the restore goes on."""
    monkeypatch.setattr(guest_clock, "ANSWER_TIMEOUT", 0.3)
    machine, vm = restored(qemu)
    stub = QgaStub(hang=frozenset({"guest-sync-delimited"}))

    async def scenario() -> guest_clock.ClockSet:
        async with stub.serving(machine.paths.agent):
            return (await asyncio.wait_for(set_guest_clocks([vm], time.time, 0.0), 5))["p1"]

    result = attached(machine, scenario)
    assert result.correction_ms is None
    assert result.note == "not set: VM p1: the guest agent did not answer within 0.3 s"
