"""Shared pieces of the benchmarks: a lab to run on, a caller on it, percentiles."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from lockstep.caller.orchestrator import GroupCaller
from lockstep.group import load_group
from lockstep.lab.lab import LabOptions, bring_up, clients_for, take_down


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ranked = sorted(values)
    k = max(0, min(len(ranked) - 1, math.ceil(p / 100 * len(ranked)) - 1))
    return ranked[k]


def say(line: str) -> None:
    """Progress on stderr, so stdout keeps the figures."""
    import sys

    print(line, file=sys.stderr, flush=True)


@asynccontextmanager
async def lab_caller(opts: LabOptions, *, keep: bool = False) -> AsyncIterator[GroupCaller]:
    """Bring a lab up, yield a caller on its group, take the lab down after."""
    await bring_up(opts, say)
    group = load_group(opts.group_file)
    clients = clients_for(group)
    try:
        yield GroupCaller(group, clients)
    finally:
        for c in clients.values():
            await c.close()
        if not keep:
            await take_down(opts.name)
