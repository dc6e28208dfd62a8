"""Pause/resume skew of lockstep: save/restore cycles of 4 VMs on 2 hosts.

One host's execd runs with its clock 2.5 s wrong (``--clock-offset``), so the
figures include clock sync. Prints p50 and max of ``pause_skew_ms`` (save) and
``resume_skew_ms`` (save and restore), taken from QEMU's own STOP/RESUME event
timestamps. Goal: max <= 1 ms. ``--vms 2`` runs one VM per host: what the
instants cost when the VMs do not share this machine's cores with each other.

``--driver libvirt`` runs the same cycles on the lab in libvirt mode (the VMs
libvirt domains, acted on through libvirt's API); ``--driver both`` runs the
QEMU driver's lab, then the libvirt one, and prints both tables. A restore of
libvirt domains pauses the group while each host swaps its domains: its
``switch-over`` row is that pause (the QEMU driver's is ``SWITCH_LEAD``).

    python -m bench.skew [--cycles 20] [--vms 4] [--driver qemu|libvirt|both]
                         [--name LAB] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from bench.common import lab_caller, lab_options, machine, machine_line, percentile, say


async def run(
    cycles: int, offset: float, vms: int = 4, driver: str = "qemu", name: str = "lsbench"
) -> dict[str, Any]:
    """Run the cycles on a fresh lab of ``vms`` VMs (``driver``'s) and return the figures."""
    opts = lab_options(
        name,
        (110, 130),
        clock_offsets={"h2": offset},
        vms=vms,
        driver="libvirt" if driver == "libvirt" else "qemu",
    )
    pause: list[float] = []
    switch_over: list[float] = []
    resume_save: list[float] = []
    resume_restore: list[float] = []
    restore_s: list[float] = []
    predicted: list[float] = []
    async with lab_caller(opts) as caller:
        for i in range(cycles):
            name = f"bench-{i}"
            saved = await caller.save(name)
            restored = await caller.restore(name)
            assert saved.pause_skew_ms is not None
            assert saved.resume_skew_ms is not None
            assert restored.resume_skew_ms is not None
            pause.append(saved.pause_skew_ms)
            resume_save.append(saved.resume_skew_ms)
            resume_restore.append(restored.resume_skew_ms)
            restore_s.append(restored.duration_s)
            if restored.switch_over_ms is not None:
                switch_over.append(restored.switch_over_ms)
            predicted += [saved.predicted_skew_ms, restored.predicted_skew_ms]
            say(
                f"cycle {i + 1}/{cycles}: pause {saved.pause_skew_ms:.3f} ms,"
                f" resume {saved.resume_skew_ms:.3f} ms (save),"
                f" {restored.resume_skew_ms:.3f} ms (restore)"
            )
    rows = {
        "pause_skew_ms (save)": pause,
        "resume_skew_ms (save)": resume_save,
        "resume_skew_ms (restore)": resume_restore,
    }
    return {
        "machine": machine(),
        "driver": opts.driver,
        "cycles": cycles,
        "vms": vms,
        "hosts": 2,
        "stream_rate": opts.stream_rate,
        "cores": os.cpu_count(),
        "clock_offset_s": offset,
        "figures": {
            k: {"p50": percentile(v, 50), "max": max(v), "values": v} for k, v in rows.items()
        },
        "restore_duration_s": {"p50": percentile(restore_s, 50), "max": max(restore_s)},
        "switch_over_ms": {
            "p50": percentile(switch_over, 50) if switch_over else None,
            "max": max(switch_over, default=None),
        },
        "predicted_skew_ms": {"p50": percentile(predicted, 50), "max": max(predicted)},
    }


def table(result: dict[str, Any]) -> str:
    """The figures of :func:`run` as a small text table, with the goal's verdict."""
    lines = [
        f"{result.get('driver', 'qemu')} driver:"
        f" skew over {result['cycles']} save/restore cycles, {result['vms']} VMs on 2 hosts,"
        f" streams {result['stream_rate']} pkt/s, h2 clock +{result['clock_offset_s']} s:"
        f" {machine_line()}",
        f"{'':28} {'p50':>9} {'max':>9}",
    ]
    for k, v in result["figures"].items():
        lines.append(f"{k:28} {v['p50']:9.3f} {v['max']:9.3f}")
    r = result["restore_duration_s"]
    lines.append(f"{'restore duration (s)':28} {r['p50']:9.3f} {r['max']:9.3f}")
    s = result.get("switch_over_ms") or {}
    if s.get("max") is not None:
        lines.append(f"{'switch-over (ms)':28} {s['p50']:9.3f} {s['max']:9.3f}")
    c = result["predicted_skew_ms"]
    lines.append(f"{'clock error alone (ms)':28} {c['p50']:9.3f} {c['max']:9.3f}")
    goal = all(v["max"] <= 1.0 for v in result["figures"].values())
    lines.append(f"goal max <= 1 ms: {'met' if goal else 'NOT met'}")
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and print its table (also: ``python -m bench skew``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--offset", type=float, default=2.5, help="clock offset of h2's execd (s)")
    ap.add_argument("--vms", type=int, default=4, help="VMs in primary/standby pairs (even)")
    ap.add_argument("--driver", choices=["qemu", "libvirt", "both"], default="qemu")
    ap.add_argument("--name", default="lsbench", help="lab name (libvirt's: NAME + 'lv')")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.vms < 2 or args.vms % 2:
        ap.error("--vms must be an even number, at least 2")
    drivers = ["qemu", "libvirt"] if args.driver == "both" else [args.driver]
    results = []
    for driver in drivers:
        name = args.name + ("lv" if driver == "libvirt" else "")
        results.append(asyncio.run(run(args.cycles, args.offset, args.vms, driver, name)))
        print(table(results[-1]))
    if args.json:
        args.json.write_text(json.dumps(results if len(results) > 1 else results[0], indent=1))


if __name__ == "__main__":
    main()
