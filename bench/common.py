"""Shared pieces of the benchmarks: a lab to run on, a caller on it, percentiles."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import random
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from lockstep.caller.connect import clients_for
from lockstep.caller.orchestrator import SKEW_BUDGET, GroupCaller
from lockstep.group import load_group
from lockstep.lab.lab import LabOptions, bring_up, take_down
from lockstep.proc import run


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ranked = sorted(values)
    k = max(0, min(len(ranked) - 1, math.ceil(p / 100 * len(ranked)) - 1))
    return ranked[k]


def free_subnets(first: int, last: int) -> tuple[str, str]:
    """Two free /24s ``10.b.0.0/24``, ``10.b+1.0.0/24``, b in [first, last): no route overlaps them.

    Raises:
        RuntimeError: every pair in the range overlaps a route of this machine.
    """
    routes = [ipaddress.ip_network(r) for r in route_prefixes()]
    candidates = list(range(first, last - 1, 2))
    random.shuffle(candidates)
    for b in candidates:
        nets = [ipaddress.ip_network(f"10.{b}.0.0/24"), ipaddress.ip_network(f"10.{b + 1}.0.0/24")]
        if not any(n.overlaps(r) for n in nets for r in routes):
            return str(nets[0]), str(nets[1])
    raise RuntimeError(f"no free subnets in 10.{first}-10.{last - 1} for a lab")


def route_prefixes() -> list[str]:
    """Destinations of every IPv4 route of this machine, all tables (``ip route``)."""
    out = run(["ip", "-4", "route", "show", "table", "all"]).text
    prefixes = []
    for line in out.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("broadcast", "local", "unreachable", "blackhole"):
            first = line.split()[1]
        if first and first != "default" and first[0].isdigit():
            prefixes.append(first if "/" in first else first + "/32")
    return prefixes


def lab_options(name: str, subnets: tuple[int, int], **options: Any) -> LabOptions:
    """A benchmark lab's options: free subnets in 10.first-10.last, a group file in a new folder."""
    work = Path(tempfile.mkdtemp(prefix="lockstep-bench-"))
    lan, vms = free_subnets(*subnets)
    return LabOptions(
        name=name, group_file=work / "lockstep.toml", lan_subnet=lan, vm_subnet=vms, **options
    )


def machine() -> dict[str, Any]:
    """What figures depend on: the CPU (as lscpu names it), its cores and the load now."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    return {
        "cpu": info.get("model name", "unknown CPU"),
        "family": info.get("cpu family", "?"),
        "model": info.get("model", "?"),
        "mhz": round(float(info.get("cpu MHz", "0") or 0)),
        "cores": os.cpu_count(),
        "load": os.getloadavg(),
    }


def machine_line() -> str:
    """:func:`machine` in one line, for the top of a benchmark's table."""
    m = machine()
    load = ", ".join(f"{x:.1f}" for x in m["load"])
    return (
        f"{m['cpu']} (family {m['family']} model {m['model']}, {m['cores']} cores,"
        f" {m['mhz']} MHz); load {load}"
    )


def say(line: str) -> None:
    """Progress on stderr, so stdout keeps the figures."""
    import sys

    print(line, file=sys.stderr, flush=True)


@asynccontextmanager
async def lab_caller(
    opts: LabOptions,
    *,
    keep: bool = False,
    skew_budget: float = SKEW_BUDGET,
    guest_time: str | None = None,
) -> AsyncIterator[GroupCaller]:
    """Bring a lab up, yield a caller on its group, take the lab down after.

    ``guest_time`` ("true" or "saved"): every VM's guest_time for this caller
    (default: the group file's).
    """
    await bring_up(opts, say)
    group = load_group(opts.group_file)
    if guest_time is not None:
        vms = {n: v.model_copy(update={"guest_time": guest_time}) for n, v in group.vms.items()}
        group = group.model_copy(update={"guest_time": guest_time, "vms": vms})
    clients = clients_for(group)
    try:
        yield GroupCaller(group, clients, skew_budget=skew_budget)
    finally:
        for c in clients.values():
            await c.close()
        if not keep:
            await take_down(opts.name)
            with contextlib.suppress(OSError):  # lab_options' folder, empty once the lab is down
                opts.group_file.parent.rmdir()


async def put_back(caller: GroupCaller, wrong: Sequence[str], state: str, wait: float) -> int:
    """1, and the group restored to ``state`` (then ``wait`` s), if ``wrong`` names a difference.

    A benchmark's cycle that left the cluster otherwise than at ``state`` has
    failed: putting it back keeps one failure from carrying into every later cycle.
    """
    if not wrong:
        return 0
    say(f"  the cycle failed ({'; '.join(wrong)}): restoring {state}")
    await caller.restore(state)
    await asyncio.sleep(wait)
    return 1
