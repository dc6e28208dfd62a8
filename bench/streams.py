"""Stream integrity across save/restore: lost, duplicated and reordered packets per operation.

Every guest of a 4-VM, 2-host lab sends a sequence-numbered UDP stream to every
other guest (``--rate``, 200 pkt/s each by default: ten times the lab's
default, so that many frames are in flight at every pause). The bench runs
save/restore cycles (or ``--stop``: ``save --stop``, a pause, restore) and,
after each operation, reads the guests' own accounting (``lockstep lab
verify``) and prints what changed, per stream, next to the frames the freeze
held, delivered and dropped. Goal: zero lost, duplicated, reordered and dropped.

    python -m bench.streams [--cycles 20] [--rate 200] [--stop] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from bench.common import lab_caller, lab_options, machine, machine_line, say
from lockstep.caller.report import OperationReport
from lockstep.lab.verify import verify_lab

LAB = "lsstream"
_SETTLE_S = 1.5  # guests log their stream counters every second


def _streams(lab: str) -> dict[str, dict[str, int]]:
    report = verify_lab(lab)
    return {
        f"{s.sender}->{s.receiver}": {
            "lost": s.lost,
            "duplicated": s.duplicated,
            "reordered": s.reordered,
            "received": s.received,
        }
        for s in report.streams
    }


def _delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {"lost": 0, "duplicated": 0, "reordered": 0, "streams": {}}
    for key, now in after.items():
        was = before.get(key, {})
        d = {k: now[k] - was.get(k, 0) for k in ("lost", "duplicated", "reordered")}
        for k, v in d.items():
            out[k] += v
        if any(d.values()):
            out["streams"][key] = d
    return out


def _frames(report: OperationReport) -> dict[str, int]:
    return {
        k: sum(getattr(v, f"frames_{k}") for v in report.vms)
        for k in ("held", "delivered", "dropped")
    }


async def run(cycles: int, *, stop: bool, rate: int = 200) -> dict[str, Any]:
    """Run the cycles on a fresh lab; return every operation's figures."""
    opts = lab_options(LAB, (130, 200), clock_offsets={"h2": 2.5}, stream_rate=rate)
    ops: list[dict[str, Any]] = []
    async with lab_caller(opts, keep=bool(os.environ.get("LOCKSTEP_KEEP_LAB"))) as caller:
        await asyncio.sleep(3)  # streams under way
        counts = _streams(LAB)
        for i in range(cycles):
            name = f"streams-{i}"
            for what in ("save", "restore"):
                if what == "save":
                    report = await caller.save(name, stop=stop)
                else:
                    if stop:
                        await asyncio.sleep(1)
                    report = await caller.restore(name)
                await asyncio.sleep(_SETTLE_S)
                now = _streams(LAB)
                row = {"cycle": i, "op": what, **_frames(report), **_delta(counts, now)}
                counts = now
                ops.append(row)
                say(
                    f"cycle {i + 1}/{cycles} {what:7}: held {row['held']:4}"
                    f" delivered {row['delivered']:4} dropped {row['dropped']}"
                    f" | lost {row['lost']} dup {row['duplicated']}"
                    f" reordered {row['reordered']} {row['streams'] or ''}"
                )
    totals = {k: sum(r[k] for r in ops) for k in ("lost", "duplicated", "reordered", "dropped")}
    return {
        "machine": machine(),
        "cycles": cycles,
        "stop": stop,
        "rate": rate,
        "totals": totals,
        "operations": ops,
    }


def table(result: dict[str, Any]) -> str:
    """The totals of :func:`run`, by operation kind, with the goal's verdict."""
    lines = [
        f"stream integrity over {result['cycles']} cycles"
        f" ({'save --stop' if result['stop'] else 'save'} + restore), 4 VMs on 2 hosts,"
        f" 12 streams at {result['rate']} pkt/s: {machine_line()}",
        f"{'':10} {'lost':>6} {'dup':>6} {'reord':>6} {'dropped':>8} {'held':>8}",
    ]
    for what in ("save", "restore"):
        rows = [r for r in result["operations"] if r["op"] == what]
        lines.append(
            f"{what:10} {sum(r['lost'] for r in rows):6} {sum(r['duplicated'] for r in rows):6}"
            f" {sum(r['reordered'] for r in rows):6} {sum(r['dropped'] for r in rows):8}"
            f" {sum(r['held'] for r in rows):8}"
        )
    t = result["totals"]
    ok = not any(t[k] for k in ("lost", "duplicated", "reordered", "dropped"))
    lines.append(f"goal zero lost, duplicated, reordered, dropped: {'met' if ok else 'NOT met'}")
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and print its table (also: ``python -m bench streams``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--stop", action="store_true", help="save --stop, then restore")
    ap.add_argument("--rate", type=int, default=200, help="stream packets/s to each peer")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    result = asyncio.run(run(args.cycles, stop=args.stop, rate=args.rate))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
