"""Restore time and switch-over time for groups of 2, 4 and 8 VMs (the atomic restore).

A restore prepares the new VMs beside the running ones, then switches over: the
running VMs pause at one instant and the new ones resume at another, a little
later. The switch-over's cost is that gap: from the first old VM's pause to
the last new VM's resume (QEMU's own STOP and RESUME stamps, in the caller's
timebase); the whole restore is the call's duration. Each ``--vms`` count is a
lab of its own (2 hosts, 256 MiB per VM), ``--cycles`` save+restore cycles.
Goal: switch-over <= 50 ms.

    python -m bench.restore [--vms 2,4,8] [--cycles 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from bench.common import lab_caller, lab_options, machine, machine_line, percentile, say

GOAL_MS = 50.0


async def run_group(vms: int, cycles: int) -> dict[str, Any]:
    """``cycles`` save+restore cycles on a lab of ``vms`` VMs."""
    opts = lab_options("lsrestore", (200, 230), vms=vms, clock_offsets={"h2": 2.5})
    switch: list[float] = []
    whole: list[float] = []
    resume_skew: list[float] = []
    async with lab_caller(opts) as caller:
        await asyncio.sleep(3)
        for i in range(cycles):
            await caller.save(f"r-{i}")
            report = await caller.restore(f"r-{i}")
            gap = report.switch_over_ms
            if gap is not None:
                switch.append(gap)
            whole.append(report.duration_s)
            if report.resume_skew_ms is not None:
                resume_skew.append(report.resume_skew_ms)
            say(
                f"{vms} VMs, cycle {i + 1}/{cycles}: restore {report.duration_s:.3f} s,"
                f" switch-over {'-' if gap is None else f'{gap:.1f} ms'}"
            )
    return {
        "vms": vms,
        "cycles": cycles,
        "switch_over_ms": {"p50": percentile(switch, 50), "max": max(switch, default=0.0)},
        "restore_s": {"p50": percentile(whole, 50), "max": max(whole)},
        "resume_skew_ms": {"p50": percentile(resume_skew, 50), "max": max(resume_skew)},
    }


async def run(counts: list[int], cycles: int) -> dict[str, Any]:
    """Every group size in turn."""
    rows = [await run_group(n, cycles) for n in counts]
    return {"machine": machine(), "rows": rows}


def table(result: dict[str, Any]) -> str:
    """The figures of :func:`run` as a text table, with the goal's verdict."""
    lines = [
        f"restore, 2 hosts, 256 MiB per VM: {machine_line()}",
        f"{'VMs':>4} {'switch-over p50':>16} {'max':>8} {'restore p50':>12} {'max':>8}"
        f" {'resume skew p50':>16} {'max':>8}",
    ]
    for r in result["rows"]:
        so = r["switch_over_ms"]
        lines.append(
            f"{r['vms']:>4} {so['p50']:13.1f} ms {so['max']:5.1f} ms"
            f" {r['restore_s']['p50']:10.3f} s {r['restore_s']['max']:6.3f} s"
            f" {r['resume_skew_ms']['p50']:13.3f} ms {r['resume_skew_ms']['max']:5.3f} ms"
        )
    met = all(r["switch_over_ms"]["max"] <= GOAL_MS for r in result["rows"])
    lines.append(f"goal: switch-over <= {GOAL_MS:g} ms: {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vms", default="2,4,8", help="group sizes, comma-separated (even)")
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    counts = [int(x) for x in args.vms.split(",") if x.strip()]
    if any(n < 2 or n % 2 for n in counts):
        ap.error("--vms takes even counts, at least 2")
    result = asyncio.run(run(counts, args.cycles))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
