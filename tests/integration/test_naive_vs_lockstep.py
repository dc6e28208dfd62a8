"""The paper's problem on the real lab: a naive per-VM save/restore fails over, lockstep does not.

The naive baseline (bench/naive.py) saves and restores the VMs one after
another; spread over more than the cluster agent's failure timeout, a standby
still running sees its primary silent and takes over. A lockstep save+restore
of the same lab is never noticed. Both are judged by the guests' own console
logs (``lockstep lab verify``), counted before and after each method.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from bench.heartbeat import counts
from bench.naive import naive_restore, naive_save
from lockstep.caller.connect import clients_for
from lockstep.caller.orchestrator import GroupCaller
from lockstep.lab.lab import LabOptions
from lockstep.lab.verify import verify_lab
from tests.integration.conftest import Lab

HEARTBEAT = LabOptions().heartbeat  # the shared lab's agent settings (its defaults)
TIMEOUT = LabOptions().timeout
GAP = TIMEOUT + HEARTBEAT  # s between two VMs of the naive run: the standby must time out
SETTLE = 3.0  # s before counting: the lab's lines of the moment are written
TAIL = TIMEOUT + 2 * HEARTBEAT + 1.5  # s after an operation: due takeovers and stats lines land


def test_spread_naive_run_fails_over_while_lockstep_is_not_noticed(fresh: Lab) -> None:
    """A naive save+restore spread by GAP > timeout between VMs causes takeovers; lockstep none.

    Lockstep first: one save+restore, and the guests report no transition
    and no split brain in that window. Then the naive baseline with GAP
    seconds between VMs, on save and on restore (primaries sort first, so it
    is the save's spread that leaves a standby running with its primary
    gone): at least one standby takes over. Afterwards the lab is restored to
    a lockstep state saved at the start, so every guest is back in its
    original role for later tests, and no VM is left stopped.
    """
    tag = secrets.token_hex(3)
    origin = f"nvl-origin-{tag}"
    out: dict[str, Any] = {}

    at_origin: dict[str, str | None] = {}

    async def go() -> None:
        clients = clients_for(fresh.group)
        caller = GroupCaller(fresh.group, clients, skew_budget=0.05)
        try:
            await asyncio.sleep(SETTLE)
            # The shared lab may reach us with roles changed by earlier tests:
            # "restored" means back to the roles at the origin state.
            at_origin.update({v.info.name: v.role_now for v in verify_lab(fresh.name).vms})
            await caller.save(origin)
            await asyncio.sleep(SETTLE)
            before = counts(fresh.name)
            await caller.save(f"nvl-ls-{tag}")
            await caller.restore(f"nvl-ls-{tag}")
            await asyncio.sleep(TAIL)
            mid = counts(fresh.name)
            est = await caller.sync()
            out["naive_save"] = await naive_save(fresh.group, clients, est, f"nvl-{tag}", GAP)
            est = await caller.sync()
            out["naive_restore"] = await naive_restore(fresh.group, clients, est, f"nvl-{tag}", GAP)
            await asyncio.sleep(TAIL)
            after = counts(fresh.name)
            out["lockstep"] = {k: mid[k] - before[k] for k in before}
            out["naive"] = {k: after[k] - mid[k] for k in before}
        finally:
            try:
                await caller.restore(origin)  # the original roles again
            finally:
                await caller.up()  # no VM left stopped, whatever failed above
                for c in clients.values():
                    await c.close()
        await asyncio.sleep(SETTLE)

    asyncio.run(go())
    print(f"\nlockstep caused {out['lockstep']}, naive (gap {GAP:g} s) caused {out['naive']}")
    assert out["lockstep"]["transitions"] == 0, f"lockstep save+restore was noticed: {out}"
    assert out["lockstep"]["split_brain"] == 0, f"lockstep save+restore was noticed: {out}"
    assert out["naive"]["transitions"] >= 1, f"the spread naive run caused no takeover: {out}"
    roles = {
        v.info.name: (at_origin.get(v.info.name), v.role_now) for v in verify_lab(fresh.name).vms
    }
    assert all(then == now for then, now in roles.values()), f"roles not restored: {roles}"
