"""CPU use of the embedded lab at rest: how much of the machine it leaves to everything else.

Brings up the lab as ``lockstep lab up`` makes it (4 VMs on 2 hosts), lets it
settle, then samples for ``--seconds``: the whole machine's busy share (from
/proc/stat), the QEMU processes' and the execds' share (their CPU time over the
window, over all cores) and the CPU pressure stall share (/proc/pressure/cpu,
"some"). Each ``--rates`` value (stream packets per second from every guest to
every other) is a lab of its own; the default compares the lab's default with
the 200 pkt/s the lab used to default to. Goal: the default lab at <= 35 % of
the machine.

``--cluster`` runs each rate once per middleware (``lab up --cluster``): agent
(the lab's own), pacemaker (Corosync + Pacemaker, 512 MiB per VM, its least)
or keepalived, each at the middleware's default timings unless
``--token``/``--advert`` say otherwise; the time the middleware took to form
is shown too.

    python -m bench.idle [--rates default,200] [--cluster agent,pacemaker,keepalived]
                         [--vms 4] [--token MS] [--advert MS] [--seconds 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import lab_caller, lab_options, machine, machine_line, say
from lockstep.lab.clusterconf import PACEMAKER_MIN_MEMORY, ClusterKind, ClusterSpec
from lockstep.lab.lab import LabOptions, lab_data_dir
from lockstep.units import format_size

GOAL = 35.0  # % of the machine, for the default lab


def _process_ticks(marker: bytes) -> int:
    """CPU ticks (user + system) of every process whose command line contains ``marker``."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker not in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total


def _machine_ticks() -> tuple[int, int]:
    """(all ticks, idle + iowait ticks) of the machine so far."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


def _pressure() -> float:
    """CPU pressure "some" total so far (microseconds)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return float("nan")
    return float(line.rsplit("total=", 1)[1])


async def measure(seconds: float) -> dict[str, float]:
    """Shares (%) of the machine over the next ``seconds``."""
    hz = os.sysconf("SC_CLK_TCK")
    cores = os.cpu_count() or 1
    qemu0, execd0 = _process_ticks(b"qemu-system"), _process_ticks(b"lockstep.cli.execd")
    all0, idle0 = _machine_ticks()
    psi0, t0 = _pressure(), time.monotonic()
    await asyncio.sleep(seconds)
    qemu1, execd1 = _process_ticks(b"qemu-system"), _process_ticks(b"lockstep.cli.execd")
    all1, idle1 = _machine_ticks()
    psi1, elapsed = _pressure(), time.monotonic() - t0
    share = 100 / (hz * elapsed * cores)
    return {
        "machine_busy_pct": 100 * (1 - (idle1 - idle0) / max(all1 - all0, 1)),
        "qemu_pct": (qemu1 - qemu0) * share,
        "execd_pct": (execd1 - execd0) * share,
        "cpu_pressure_pct": (psi1 - psi0) / 1e4 / elapsed,
    }


async def run(
    rates: list[int | None],
    seconds: float,
    settle: float,
    clusters: Sequence[ClusterSpec] = (ClusterSpec(),),
    vms: int = LabOptions.vms,
) -> dict[str, Any]:
    """One lab per rate (None: the lab's default) and cluster, measured at rest."""
    rows = []
    for spec in clusters:
        for rate in rates:
            options: dict[str, Any] = {} if rate is None else {"stream_rate": rate}
            if spec.kind == ClusterKind.PACEMAKER:
                options["memory"] = format_size(PACEMAKER_MIN_MEMORY)
            opts = lab_options("lsidle", (140, 160), vms=vms, cluster=spec, **options)
            async with lab_caller(opts):
                say(
                    f"{spec.kind}, stream rate {opts.stream_rate}: settling {settle:g} s,"
                    f" measuring {seconds:g} s"
                )
                formed = _formed_s(opts.name)
                await asyncio.sleep(settle)
                figures = await measure(seconds)
            rows.append(
                {
                    "cluster": spec.kind,
                    "formed_s": formed,
                    "memory": opts.memory,
                    "stream_rate": opts.stream_rate,
                    "default": rate is None,
                    **figures,
                }
            )
    return {"machine": machine(), "seconds": seconds, "vms": vms, "rows": rows}


def _formed_s(lab: str) -> float | None:
    """How long the lab's middleware took to form (lab.json), None for the agent."""
    info = json.loads((lab_data_dir(lab) / "lab.json").read_text())
    formed = info.get("cluster_formed_s")
    return None if formed is None else float(formed)


def table(result: dict[str, Any]) -> str:
    """The figures of :func:`run` as a text table, with the goal's verdict."""
    lines = [
        f"lab at rest, {result['vms']} VMs on 2 hosts, {result['seconds']:g} s each:"
        f" {machine_line()}",
        f"{'cluster':>11} {'formed':>7} {'stream rate':>20} {'machine busy':>13} {'QEMUs':>7}"
        f" {'execds':>7} {'CPU pressure':>13}",
    ]
    for r in result["rows"]:
        rate = f"{r['stream_rate']} pkt/s" + (" (default)" if r["default"] else "")
        formed = "-" if r.get("formed_s") is None else f"{r['formed_s']:.0f} s"
        lines.append(
            f"{r.get('cluster', 'agent'):>11} {formed:>7} {rate:>20}"
            f" {r['machine_busy_pct']:12.1f}% {r['qemu_pct']:6.1f}%"
            f" {r['execd_pct']:6.1f}% {r['cpu_pressure_pct']:12.1f}%"
        )
    default = [r for r in result["rows"] if r["default"] and r.get("cluster", "agent") == "agent"]
    if default:
        busy = default[0]["machine_busy_pct"]
        verdict = "met" if busy <= GOAL else "NOT met"
        lines.append(f"goal: the default lab at <= {GOAL:g} % of the machine: {verdict}")
    return "\n".join(lines)


def _rates(text: str) -> list[int | None]:
    out: list[int | None] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        out.append(None if item == "default" else int(item))
    return out


def main() -> None:
    """Run the benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", type=_rates, default=[None, 200], help="e.g. default,0,20,200")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after the lab is up")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument(
        "--cluster",
        type=lambda t: [k.strip() for k in t.split(",") if k.strip()],
        default=[ClusterKind.AGENT.value],
        help="e.g. agent,pacemaker,keepalived",
    )
    ap.add_argument("--vms", type=int, default=LabOptions.vms)
    ap.add_argument("--token", type=int, help="Corosync token (ms) for pacemaker")
    ap.add_argument("--advert", type=int, help="VRRP advert interval (ms) for keepalived")
    args = ap.parse_args()
    clusters = [
        ClusterSpec(
            kind,
            token_ms=args.token if kind == ClusterKind.PACEMAKER else None,
            advert_ms=args.advert if kind == ClusterKind.KEEPALIVED else None,
        )
        for kind in args.cluster
    ]
    result = asyncio.run(run(args.rates, args.seconds, args.settle, clusters, args.vms))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
