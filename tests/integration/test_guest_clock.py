"""Restored guests' wall clocks: set to true time through the guest agent, or kept as saved.

Each guest's clock is read through the lab's control channel (the agent answers
a clock request at once, so the request's round trip bounds the reading),
several times, the quickest reading counting: its offset from this machine's
clock, and half its round trip as the bound of that offset.
"""

from __future__ import annotations

import asyncio
import secrets

from lockstep.caller.connect import connected
from lockstep.caller.plan import SAVED_TIME_KEPT
from lockstep.caller.report import OperationReport
from lockstep.group import GroupSpec
from tests.integration.conftest import Lab

AGE = 5.0  # s between the save and the restores
READINGS = 8
Offsets = dict[str, tuple[float, float]]  # VM -> (offset, bound), ms


async def offset_ms(lab: Lab, vm: str) -> tuple[float, float]:
    """Guest ``vm``'s wall clock minus this machine's (ms), and how far that may be off (ms)."""
    async with lab.guest(vm) as ctl:
        readings = [await ctl.clock() for _ in range(READINGS)]
    sent, guest, received = min(readings, key=lambda r: r[2] - r[0])
    return (guest - (sent + received) / 2) * 1000, (received - sent) / 2 * 1000


async def offsets(lab: Lab) -> Offsets:
    """Every guest's clock offset and its bound (ms)."""
    return {vm: await offset_ms(lab, vm) for vm in lab.group.vms}


def keeping_saved_time(group: GroupSpec) -> GroupSpec:
    """``group`` with every VM's guest_time "saved"."""
    vms = {n: vm.model_copy(update={"guest_time": "saved"}) for n, vm in group.vms.items()}
    return group.model_copy(update={"vms": vms})


def age_ms(saved: OperationReport, restored: OperationReport, vm: str) -> float:
    """From VM ``vm``'s pause in the save to its resume in the restore, ms."""
    paused, resumed = saved.vm(vm).paused_at, restored.vm(vm).resumed_at
    assert paused is not None and resumed is not None
    return (resumed - paused) * 1000


def test_restored_guests_clocks_are_true_time_within_10ms_or_kept(fresh: Lab) -> None:
    """After a restore every guest's wall clock is within 10 ms of true time; kept, it is behind.

    A state is saved and restored AGE s later twice. Restored with
    ``guest_time = "saved"``, every guest's clock is as far behind as the
    state is old (plus what it was off before), and the report says the saved
    time was kept. Restored with true time, every guest, those on h2 too
    (whose execd's clock is 2.5 s wrong), reads within 10 ms of this machine's
    clock, and the correction reported is the age of the state (less what the
    guest's clock was ahead before the save).
    """
    state = f"clock-{secrets.token_hex(3)}"

    async def scenario() -> tuple[list[Offsets], list[OperationReport]]:
        before = await offsets(fresh)
        kept_group = keeping_saved_time(fresh.group)
        async with fresh.caller() as caller, connected(kept_group, skew_budget=0.05) as keeper:
            saved = await caller.save(state)
            await asyncio.sleep(AGE)
            kept = await keeper.restore(state)
            behind = await offsets(fresh)
            restored = await caller.restore(state)
            after = await offsets(fresh)
        return [before, behind, after], [saved, kept, restored]

    (before, behind, after), (saved, kept, restored) = asyncio.run(scenario())
    print(f"\nguest clock offsets after the restore, ms (± bound): {after}")
    for vm in fresh.group.vms:
        assert kept.vm(vm).clock_correction_ms is None
        assert kept.vm(vm).clock_note == SAVED_TIME_KEPT
        stale = before[vm][0] - age_ms(saved, kept, vm)
        assert behind[vm][0] < -(AGE - 0.5) * 1000
        assert abs(behind[vm][0] - stale) < 100, (vm, behind[vm], stale)

        offset, bound = after[vm]
        assert abs(offset) <= 10.0, f"{vm}'s clock is {offset:+.3f} ms off (± {bound:.3f})"
        assert bound <= 10.0, f"{vm}'s clock could not be read closely (± {bound:.3f} ms)"
        correction = restored.vm(vm).clock_correction_ms
        assert correction is not None, restored.vm(vm).clock_note
        assert abs(correction - (age_ms(saved, restored, vm) - before[vm][0])) < 50
