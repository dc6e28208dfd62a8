"""Clock sync on the default lab: the skew clock error alone could cause, UDP path against gRPC.

Runs ``lockstep check`` (the caller's sync, as every save and restore starts
with) ``--runs`` times over the light UDP path, then as many times over gRPC
probes only (what sync falls back to when the UDP path is blocked), on a lab
as ``lockstep lab up`` makes it (h2's execd clock 2.5 s wrong, so the offset
must be found). Prints p50 and max of the predicted skew, the least and median
delay, the samples taken and the time spent. Goal for the UDP path: predicted
skew p50 <= 0.1 ms and max <= 0.25 ms.

    python -m bench.clock [--runs 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.common import lab_caller, lab_options, machine, machine_line, percentile, say
from lockstep.caller.clock import ClockEstimate, predicted_skew
from lockstep.caller.orchestrator import GroupCaller, HostLink

GOAL_P50_MS = 0.1
GOAL_MAX_MS = 0.25


class GrpcOnly:
    """A host link whose execd seems to offer no UDP probe path: sync probes over gRPC."""

    def __init__(self, link: HostLink) -> None:
        self._link = link

    def __getattr__(self, name: str) -> Any:
        return getattr(self._link, name)

    async def probe_path(self) -> None:
        return None


async def _checks(caller: GroupCaller, runs: int, path: str) -> list[Mapping[str, ClockEstimate]]:
    out: list[Mapping[str, ClockEstimate]] = []
    for i in range(runs):
        est, _ = await caller.check()
        out.append(est)
        skew = predicted_skew(est) * 1000
        say(f"{path} check {i + 1}/{runs}: predicted skew {skew:.3f} ms")
    return out


def _summary(runs: list[Mapping[str, ClockEstimate]]) -> dict[str, Any]:
    skews = [predicted_skew(est) * 1000 for est in runs]
    delays = [e.delay * 1000 for est in runs for e in est.values()]
    return {
        "predicted_skew_ms": {"p50": percentile(skews, 50), "max": max(skews), "values": skews},
        "delay_ms": {"min": min(delays), "p50": percentile(delays, 50)},
        "samples": {"p50": percentile([e.samples for est in runs for e in est.values()], 50)},
        "sync_s": {"p50": percentile([e.elapsed for est in runs for e in est.values()], 50)},
        "paths": sorted({e.path for est in runs for e in est.values()}),
    }


async def run(runs: int) -> dict[str, Any]:
    """Both paths on one lab, ``runs`` checks each."""
    opts = lab_options("lsclock", (170, 190), clock_offsets={"h2": 2.5})
    async with lab_caller(opts) as caller:
        await asyncio.sleep(5)  # the guests settle after boot
        udp = await _checks(caller, runs, "udp")
        grpc_only = GroupCaller(
            caller.group, {h: GrpcOnly(link) for h, link in caller.links.items()}
        )
        grpc = await _checks(grpc_only, runs, "grpc")
    return {
        "machine": machine(),
        "runs": runs,
        "stream_rate": opts.stream_rate,
        "udp": _summary(udp),
        "grpc": _summary(grpc),
    }


def table(result: dict[str, Any]) -> str:
    """The figures of :func:`run` as a text table, with the goal's verdict."""
    lines = [
        f"clock sync, {result['runs']} checks per path on the default lab: {machine_line()}",
        f"{'path':6} {'skew p50':>9} {'skew max':>9} {'delay min':>10} {'delay p50':>10}"
        f" {'samples':>8} {'sync s':>7}",
    ]
    for path in ("udp", "grpc"):
        r = result[path]
        lines.append(
            f"{path:6} {r['predicted_skew_ms']['p50']:9.3f} {r['predicted_skew_ms']['max']:9.3f}"
            f" {r['delay_ms']['min']:10.3f} {r['delay_ms']['p50']:10.3f}"
            f" {r['samples']['p50']:8.0f} {r['sync_s']['p50']:7.3f}"
        )
    skews = ", ".join(f"{v:.3f}" for v in result["udp"]["predicted_skew_ms"]["values"])
    lines.append(f"udp predicted skews (ms): {skews}")
    udp = result["udp"]["predicted_skew_ms"]
    met = udp["p50"] <= GOAL_P50_MS and udp["max"] <= GOAL_MAX_MS
    lines.append(
        f"goal: predicted skew p50 <= {GOAL_P50_MS} ms and max <= {GOAL_MAX_MS} ms over UDP:"
        f" {'met' if met else 'NOT met'}"
    )
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    result = asyncio.run(run(args.runs))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
