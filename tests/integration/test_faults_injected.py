"""Faults injected on purpose (``lockstep fault``) into the real lab, and their undoing.

Real execds on the lab's hosts: real nftables rules in the hosts' namespaces,
real QEMU killed and paused. What the guests see is read from the guests:
pings over the VM network through their control channel, and what their
cluster agents logged (``lockstep lab verify``). The group is saved once for
the module; each test ends by restoring it, which is also what undoes a fault
(the state stays until the lab goes: running VMs sit on its layers).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner

from lockstep.caller.faults import partition
from lockstep.caller.orchestrator import GroupCaller
from lockstep.cli.main import main
from lockstep.errors import OperationFailed
from lockstep.execd.model import FaultReply, Freeze, Heal, Kill, ListFaults
from lockstep.lab.lab import wait_guests
from lockstep.lab.verify import VmTotals, log_marks, verify_lab
from tests.integration.conftest import Lab

T = TypeVar("T")


@pytest.fixture(scope="module")
def base(lab: Lab) -> str:
    """The lab's group, every VM up, saved once as a state the tests restore."""
    name = f"faults-{secrets.token_hex(3)}"

    async def up_and_save() -> None:
        async with lab.caller() as caller:
            await caller.up()
        await wait_guests(lab.group, lab.data)
        async with lab.caller() as caller:
            await caller.save(name)

    asyncio.run(up_and_save())
    return name


def _figure(text: str) -> None:
    """A figure measured on the way, for the record (``pytest -s`` shows it)."""
    print(f"faults: {text}", flush=True)


async def _timed(what: str, aw: Awaitable[T]) -> T:
    """``aw``'s result; how long it took is a figure."""
    start = time.monotonic()
    result = await aw
    _figure(f"{what} took {(time.monotonic() - start) * 1000:.0f} ms")
    return result


async def _restore(caller: GroupCaller, state: str, why: str) -> None:
    """Restore ``state``; its switch-over and duration are figures."""
    report = await caller.restore(state)
    _figure(
        f"restore {why}: switch-over {report.switch_over_ms} ms,"
        f" resume skew {report.resume_skew_ms} ms, {report.duration_s:.2f} s"
    )


async def _reaches(lab: Lab, src: str, dst: str) -> bool:
    """Whether guest ``src`` gets an answer from ``dst`` to one of two pings (about 2 s)."""
    async with lab.guest(src) as ctl:
        rc, _ = await ctl.run(f"ping -c 2 -W 1 {lab.ip(dst)}", timeout=20)
    return rc == 0


async def _held(caller: GroupCaller) -> dict[str, list[str]]:
    """The ids of the faults each host holds (`lockstep fault list`)."""
    _, results = await caller.fault(ListFaults())
    out = {}
    for host, r in results.items():
        assert r.value is not None, r.error
        out[host] = [f.id for f in r.value.held]
    return out


async def _runstates(caller: GroupCaller) -> dict[str, str]:
    found: dict[str, str] = {}
    for r in (await caller.status()).values():
        assert r.value is not None, r.error
        found |= {s.name: s.runstate for s in r.value}
    return found


def _guest(lab: Lab, marks: dict[str, int], vm: str) -> VmTotals:
    """What guest ``vm``'s agent logged since ``marks``."""
    report = verify_lab(lab.name, marks=marks)
    return next(v for v in report.vms if v.info.name == vm)


def _silence(totals: VmTotals) -> float:
    """The longest a guest went without its peer's heartbeat, takeovers included (s)."""
    took = [t["silent_s"] or 0.0 for t in totals.transitions]
    return max([totals.heartbeat_gap_max_s, *took])


def test_partition_cuts_p1_and_s1_apart_until_healed(lab: Lab, base: str) -> None:
    """p1 | s1 (two hosts): no frame either way, both agents go deaf; the rest still talk; heal.

    p1 still reaches s2 on s1's host and p2 still reaches s2: only the pair is
    cut. After `heal` they ping each other again and no host holds the fault;
    the restore puts the roles back.
    """

    async def body() -> None:
        async with lab.caller() as caller:
            marks = log_marks(lab.name)
            cut = partition(caller.group, "p1", "s1")
            fid, results = await _timed("fault partition p1 s1", caller.fault(cut))
            assert sorted(results) == ["h1", "h2"]
            assert all(r.ok for r in results.values()), results
            assert await _held(caller) == {"h1": [fid], "h2": [fid]}
            assert not await _reaches(lab, "p1", "s1")
            assert not await _reaches(lab, "s1", "p1")
            assert await _reaches(lab, "p1", "s2")
            assert await _reaches(lab, "p2", "s2")
            for vm in ("p1", "s1"):  # silent > 2 s: halfway from a heartbeat (1 s) to failed (3 s)
                assert _guest(lab, marks, vm).heartbeat_misses >= 1, vm
            _, healed = await _timed("fault heal", caller.fault(Heal()))
            assert all(r.value and r.value.did for r in healed.values()), healed
            assert await _reaches(lab, "p1", "s1")
            assert await _reaches(lab, "s1", "p1")
            assert await _held(caller) == {"h1": [], "h2": []}
            await _restore(caller, base, "after a healed partition")

    asyncio.run(body())


def test_kill_crashes_the_vm_and_a_restore_brings_it_back(lab: Lab, base: str) -> None:
    """After `fault kill p1` p1 shows as crashed; the restore runs it again, its guest answers."""

    async def body() -> None:
        async with lab.caller() as caller:
            _, results = await _timed("fault kill p1", caller.fault(Kill("p1")))
            reply = results["h1"].value
            assert isinstance(reply, FaultReply) and "killed p1's QEMU" in reply.did[0]
            assert (await _runstates(caller))["p1"] == "crashed"
            assert await _held(caller) == {"h1": [], "h2": []}  # nothing to hold
            await _restore(caller, base, "of a killed VM")
            assert set((await _runstates(caller)).values()) == {"running"}
        await lab.sh("p1", "true")

    asyncio.run(body())


def test_freeze_pauses_one_vm_for_that_long_then_it_runs(lab: Lab, base: str) -> None:
    """`fault freeze p2 4`: p2 alone is paused about 4 s (QEMU's runstate), s2 hears nothing.

    While p2 is frozen a save is refused with a sentence that says so (its
    timer would resume p2 in the middle). After the freeze p2 runs and its
    guest answers. A second, long freeze is ended by a restore: p2 runs
    again (the restored one) and no host holds the freeze.
    """
    seconds = 4.0

    async def body() -> float:
        async with lab.caller() as caller:
            marks = log_marks(lab.name)
            start = time.monotonic()
            await _timed("fault freeze p2", caller.fault(Freeze("p2", seconds)))
            states = await _runstates(caller)
            assert states["p2"] == "paused"
            assert {states[vm] for vm in ("p1", "s1", "s2")} == {"running"}
            with pytest.raises(OperationFailed, match="VM p2 is frozen by fault freeze-"):
                await caller.save(f"refused-{secrets.token_hex(3)}")
            while (await _runstates(caller))["p2"] != "running":
                assert time.monotonic() - start < seconds + 10, "p2 was never resumed"
                await asyncio.sleep(0.1)
            paused_for = time.monotonic() - start
            assert await _held(caller) == {"h1": [], "h2": []}
            await lab.sh("p2", "true")
            await asyncio.sleep(1.5)  # s2's next heartbeat line says how long it heard nothing
            silence = _silence(_guest(lab, marks, "s2"))
            _figure(
                f"freeze p2 {seconds:g} s: paused {paused_for:.2f} s, s2 heard nothing {silence:.2f} s"
            )
            assert silence >= seconds - 1.0, silence
            # A restore in between ends a freeze: p2 is replaced, its timer cancelled.
            await caller.fault(Freeze("p2", 600))
            await _restore(caller, base, "of a frozen VM")
            assert set((await _runstates(caller)).values()) == {"running"}
            assert await _held(caller) == {"h1": [], "h2": []}
            return paused_for

    paused_for = asyncio.run(body())
    assert seconds <= paused_for < seconds + 1.5, paused_for


def _cli(lab: Lab, *args: str) -> dict[str, Any]:
    """``lockstep -g GROUP fault ARGS --json`` (the real command, in this process): its document."""
    result = CliRunner().invoke(main, ["-g", str(lab.group_file), "fault", *args, "--json"])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_loss_100_cuts_a_vm_off_and_a_restore_undoes_it(lab: Lab, base: str) -> None:
    """`lockstep fault loss s1 100`: nothing reaches s1, from another host or its own; restored, it does.

    Injected and listed through the CLI: its JSON names the fault and what h2 did.
    """
    injected = _cli(lab, "loss", "s1", "100")
    fid = injected["fault"]
    assert injected["kind"] == "loss" and list(injected["hosts"]) == ["h2"]
    assert injected["hosts"]["h2"]["did"] == [
        "dropping 100 % of the frames to and from s1 at random"
    ]
    assert [f["id"] for f in _cli(lab, "list")["hosts"]["h2"]["held"]] == [fid]

    async def body() -> None:
        assert not await _reaches(lab, "p1", "s1")
        assert not await _reaches(lab, "s2", "s1")
        assert await _reaches(lab, "p2", "s2")
        async with lab.caller() as caller:
            await _restore(caller, base, "with a loss held")
        assert await _reaches(lab, "p1", "s1")
        assert await _reaches(lab, "s2", "s1")

    asyncio.run(body())
    listed = _cli(lab, "list")
    assert listed["errors"] == {} and all(h["held"] == [] for h in listed["hosts"].values())
