"""The naive baseline: save and restore a group one VM after another (bench only).

What a person does with per-VM snapshots (``virsh save`` / ``virsh restore``
in a loop): each VM is paused, its memory saved (standard path) and the VM
destroyed, then the next VM; later each VM is restored and resumed, then the
next. It drives the same execd RPCs lockstep uses, one VM per operation and
per state, with no common instant: the spread of the resume instants is what
the cluster sees (the paper's problem).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from lockstep.caller.clock import ClockEstimate, to_caller, to_host
from lockstep.caller.links import HostLink
from lockstep.group import GroupSpec

__all__ = ["NaiveRun", "naive_restore", "naive_save"]

_SOON = 0.02  # s: act this long after the call arrives (the execd spins to it)
_DEADLINE = 900.0  # s: the dead-man's timer must not fire during a slow save


@dataclass(frozen=True)
class NaiveRun:
    """One sequential pass over the group: total time and each VM's instants (caller clock)."""

    started: float
    seconds: float
    paused_at: dict[str, float]
    resumed_at: dict[str, float]
    memory_bytes: int


def _state(prefix: str, vm: str) -> str:
    return f"{prefix}-{vm}"


async def naive_save(
    group: GroupSpec,
    clients: Mapping[str, HostLink],
    est: Mapping[str, ClockEstimate],
    prefix: str,
    gap: float = 0.0,
) -> NaiveRun:
    """Pause, save and destroy every VM of ``group``, one after another.

    Each VM becomes state ``<prefix>-<vm>`` on its host. ``gap`` seconds are
    slept between two VMs (a slower hand; 0 for the benchmark's own figures).
    """
    started = time.time()
    paused: dict[str, float] = {}
    size = 0
    for i, (name, spec) in enumerate(sorted(group.vms.items())):
        if i and gap > 0:
            await asyncio.sleep(gap)
        host, link = spec.host, clients[spec.host]
        op = f"naive-{secrets.token_hex(6)}"
        now = time.time()
        reports = await link.pause(
            op,
            _state(prefix, name),
            to_host(now + _SOON, est[host]),
            [name],
            to_host(now + _DEADLINE, est[host]),
        )
        at = reports[0].paused_at
        if at is not None:
            paused[name] = to_caller(at, est[host])
        saved = await link.save_memory(op, keep_running=False, progress=None)
        size += sum(r.memory_bytes for r in saved)
        await link.drain(op, 0.05, 1.0)
        await link.commit(op)
        await link.stop(op)
    return NaiveRun(started, time.time() - started, paused, {}, size)


async def naive_restore(
    group: GroupSpec,
    clients: Mapping[str, HostLink],
    est: Mapping[str, ClockEstimate],
    prefix: str,
    gap: float = 0.0,
) -> NaiveRun:
    """Restore and resume every VM of ``group`` from its naive state, one after another.

    ``gap`` seconds are slept between two VMs (0 for the benchmark's own figures).
    """
    started = time.time()
    resumed: dict[str, float] = {}
    for i, (name, spec) in enumerate(sorted(group.vms.items())):
        if i and gap > 0:
            await asyncio.sleep(gap)
        host, link = spec.host, clients[spec.host]
        op = f"naive-{secrets.token_hex(6)}"
        await link.prepare_restore(
            op, _state(prefix, name), to_host(time.time() + _DEADLINE, est[host])
        )
        reports = await link.resume(op, to_host(time.time() + _SOON, est[host]))
        at = reports[0].resumed_at
        if at is not None:
            resumed[name] = to_caller(at, est[host])
        await link.commit(op)
    return NaiveRun(started, time.time() - started, {}, resumed, 0)
