"""Failovers caused by a group save/restore: lockstep against the naive baseline.

For each heartbeat/timeout setting of the lab's cluster agent, a lab of 4 VMs
(2 primary/standby pairs) on 2 hosts is brought up and left to settle; a
lockstep state ``origin`` is saved. Then N cycles of lockstep save+restore run,
the lab goes back to ``origin`` (the original roles), and N cycles of the naive
baseline (bench/naive.py: every VM saved, then every VM restored, one after
another) run. What each method caused is read from the guests' own console
logs (``lockstep lab verify``), counted before and after that method's cycles:
role changes (transitions), split brains, stream packets lost and duplicated.
A cycle after which a guest is not in the role ``lab up`` gave it has failed:
the lab is restored to ``origin`` (with lockstep) before the next cycle, so
each cycle starts from the original roles and one failure cannot carry over
into every later state; those restores count in the method's window too.
Lockstep's max resume skew and the naive restore's resume spread are shown too,
and, per method, the longest heartbeat silence a guest logged after its saves
and after its restores (each operation is followed by a short wait, so what it
caused is logged before the next one starts). Goal: lockstep causes zero
transitions and zero split brains at every setting.

    python -m bench.heartbeat [--cycles 20] [--settings 1s/3s,100ms/300ms,30ms/100ms]
                              [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from bench.common import lab_options, percentile, say
from bench.naive import naive_restore, naive_save
from lockstep.caller.connect import clients_for
from lockstep.caller.orchestrator import GroupCaller
from lockstep.errors import LabError, LockstepError
from lockstep.lab.lab import bring_up, take_down
from lockstep.lab.verify import EVERYTHING, LAST_RESTORE, Since, log_marks, verify_lab

LAB = "lshb"
DEFAULT_SETTINGS = "1s/3s,100ms/300ms,30ms/100ms"
COUNTS = ("transitions", "split_brain", "lost", "duplicated")
SKEW_BUDGET = 0.05  # s: this small shared machine's clock delays are a few ms (as in the tests)


def parse_duration(text: str) -> float:
    """``1s``, ``300ms`` or a bare number of seconds, in seconds.

    Raises:
        ValueError: the text is none of these.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration such as 1s or 300ms")
    value = float(m.group(1))
    return value / 1000 if m.group(2) == "ms" else value


def parse_settings(text: str) -> list[tuple[float, float]]:
    """``1s/3s,100ms/300ms`` as [(heartbeat, timeout), ...] in seconds.

    Raises:
        ValueError: an item is not HEARTBEAT/TIMEOUT or the heartbeat is not shorter.
    """
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        parts = item.split("/")
        if len(parts) != 2:
            raise ValueError(f"setting {item!r} is not HEARTBEAT/TIMEOUT, e.g. 1s/3s")
        hb, to = parse_duration(parts[0]), parse_duration(parts[1])
        if not 0 < hb < to:
            raise ValueError(f"setting {item!r}: the heartbeat must be shorter than the timeout")
        out.append((hb, to))
    return out


def label(heartbeat: float, timeout: float) -> str:
    """A setting as ``1s/3s`` or ``100ms/300ms``."""

    def one(s: float) -> str:
        return f"{s:g}s" if s >= 1 else f"{s * 1000:g}ms"

    return f"{one(heartbeat)}/{one(timeout)}"


def counts(lab: str) -> dict[str, int]:
    """What the lab's guests have noticed so far (whole console logs)."""
    r = verify_lab(lab)
    return {
        "transitions": r.transitions,
        "split_brain": r.split_brain,
        "lost": r.total("lost"),
        "duplicated": r.total("duplicated"),
    }


def takeovers(lab: str) -> list[dict[str, Any]]:
    """Every takeover the lab's guests logged so far: who, when, why, after how long a silence."""
    return [t | {"vm": v.info.name} for v in verify_lab(lab).vms for t in v.transitions]


def wrong_roles(lab: str) -> list[str]:
    """The guests whose role is not the one ``lab up`` gave them (empty: the cluster is as set up).

    A takeover before the first save (the lab failing over while it boots)
    would put every later state, and every count after it, in that failover.
    """
    return [
        f"{v.info.name} is {v.role_now}, not {v.info.role}"
        for v in verify_lab(lab).vms
        if v.role_now != v.info.role
    ]


T = TypeVar("T")
CycleFigures = tuple[float | None, float, float]
"""One cycle's resume skew or spread (ms), longest silences after its save and its restore (s)."""
Cycle = Callable[[int], Awaitable[CycleFigures]]


async def observed(
    lab: str, action: Awaitable[T], wait: float, *, restores: bool
) -> tuple[T, float]:
    """Run one operation, wait ``wait`` s; its result and the longest heartbeat silence since.

    For a restore, only what the guests logged after it counts (what their
    discarded timeline logged while the restore prepared does not).
    """
    marks = log_marks(lab)
    result = await action
    await asyncio.sleep(wait)
    since = Since(LAST_RESTORE) if restores else EVERYTHING
    try:
        return result, verify_lab(lab, since, marks).longest_silence()
    except LabError as exc:  # a guest that logged nothing in the window: no figure
        say(f"  (no silence figure: {exc})")
        return result, float("nan")


def silence_figures(saves: list[float], restores: list[float]) -> dict[str, Any]:
    """p50 and max of the longest silences after each save and each restore (s)."""

    def two(values: list[float]) -> dict[str, float | None]:
        ok = [v for v in values if v == v]  # NaN: no figure
        return {"p50": percentile(ok, 50), "max": max(ok)} if ok else {"p50": None, "max": None}

    return {"silence_after_save_s": two(saves), "silence_after_restore_s": two(restores)}


async def caused(
    lab: str, tail: float, cycles: Callable[[], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """Run ``cycles`` and return what the guests noticed meanwhile, plus its own figures.

    ``tail`` seconds are waited after the cycles, so a takeover that was
    already due and the agents' periodic lines land in the window.
    """
    before, seen = counts(lab), takeovers(lab)
    started = time.monotonic()
    figures = await cycles()
    await asyncio.sleep(tail)
    after = counts(lab)
    new = [t for t in takeovers(lab) if t not in seen]
    window = {"window_s": round(time.monotonic() - started, 1), "takeovers": new}
    return {k: after[k] - before[k] for k in COUNTS} | figures | window


async def one_setting(heartbeat: float, timeout: float, cycles: int) -> dict[str, Any]:
    """Bring a lab up at this setting, run both methods' cycles, take the lab down."""
    opts = lab_options(LAB, (170, 200), heartbeat=heartbeat, timeout=timeout)
    lan, vms = opts.lan_subnet, opts.vm_subnet
    settle = max(3.0, 2 * timeout)
    tail = timeout + 2 * heartbeat + 1.5  # stats lines come every second
    wait = 2 * heartbeat + 1.2  # after each operation: its silences end and are logged
    say(f"{label(heartbeat, timeout)}: lab {LAB} on {lan} and {vms}")
    group = None
    try:
        group = await bring_up(opts, say)
        clients = clients_for(group)
        caller = GroupCaller(group, clients, skew_budget=SKEW_BUDGET)
        try:
            await asyncio.sleep(settle)
            if wrong := wrong_roles(LAB):
                raise RuntimeError(
                    "the lab failed over before the first save (" + "; ".join(wrong) + ")"
                )
            await caller.save("origin")
            await asyncio.sleep(settle)

            async def back_to_origin() -> int:
                """1 (and the lab restored to origin) if the cycle left a guest in another role."""
                wrong = wrong_roles(LAB)
                if not wrong:
                    return 0
                say(f"  the cycle failed ({'; '.join(wrong)}): restoring origin")
                await caller.restore("origin")
                await asyncio.sleep(wait)
                return 1

            async def run_cycles(method: str, key: str, one: Cycle) -> dict[str, Any]:
                """``one`` cycle after another: the max of its ms figure, silences, failures."""
                figures: list[float] = []
                quiet: tuple[list[float], list[float]] = ([], [])
                failed = 0
                for i in range(cycles):
                    figure, s, r = await one(i)
                    if figure is not None:
                        figures.append(figure)
                    quiet[0].append(s)
                    quiet[1].append(r)
                    say(
                        f"  {method} cycle {i + 1}/{cycles}: resume {key}"
                        f" {'-' if figure is None else f'{figure:.3f}'} ms;"
                        f" longest silence {s:.3f} s after the save, {r:.3f} s after the restore"
                    )
                    failed += await back_to_origin()
                most = max(figures) if figures else None
                return {f"max_resume_{key}_ms": most, "failed_cycles": failed} | silence_figures(
                    *quiet
                )

            async def lockstep_cycle(i: int) -> CycleFigures:
                saved, s = await observed(LAB, caller.save(f"hb-{i}"), wait, restores=False)
                restored, r = await observed(LAB, caller.restore(f"hb-{i}"), wait, restores=True)
                skews = [
                    k for k in (saved.resume_skew_ms, restored.resume_skew_ms) if k is not None
                ]
                return (max(skews) if skews else None), s, r

            async def naive_cycle(i: int) -> CycleFigures:
                est = await caller.sync()
                _, s = await observed(
                    LAB, naive_save(group, clients, est, f"nv{i}"), wait, restores=False
                )
                est = await caller.sync()
                # The naive save destroyed the VMs: each log just goes on from its save.
                run, r = await observed(
                    LAB, naive_restore(group, clients, est, f"nv{i}"), wait, restores=False
                )
                at = run.resumed_at.values()
                return ((max(at) - min(at)) * 1000 if at else None), s, r

            async def lockstep() -> dict[str, Any]:
                return await run_cycles("lockstep", "skew", lockstep_cycle)

            async def naive() -> dict[str, Any]:
                return await run_cycles("naive", "spread", naive_cycle)

            result: dict[str, Any] = {"heartbeat_s": heartbeat, "timeout_s": timeout}
            result["lockstep"] = await caused(LAB, tail, lockstep)
            idle_s = result["lockstep"]["window_s"] - tail

            async def idle() -> dict[str, Any]:
                await asyncio.sleep(idle_s)
                return {}

            result["idle"] = await caused(LAB, tail, idle)  # the control: as long, nothing done
            await caller.restore("origin")  # back to the original roles
            await asyncio.sleep(settle)
            result["naive"] = await caused(LAB, tail, naive)
            result["whole_log"] = counts(LAB)
            return result
        finally:
            for c in clients.values():
                await c.close()
    finally:
        if group is not None:  # bring_up takes down what it made when it fails
            await take_down(LAB, say)
        shutil.rmtree(opts.group_file.parent, ignore_errors=True)


async def run(settings: list[tuple[float, float]], cycles: int) -> dict[str, Any]:
    """Every setting in turn; the machine's load before and after."""
    load_before = os.getloadavg()
    results = []
    for hb, to in settings:
        try:
            results.append(await one_setting(hb, to, cycles))
        except (LockstepError, RuntimeError) as exc:
            say(f"{label(hb, to)} failed: {exc}")
            results.append({"heartbeat_s": hb, "timeout_s": to, "error": str(exc)})
    return {
        "cycles": cycles,
        "vms": 4,
        "hosts": 2,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "settings": results,
    }


def table(result: dict[str, Any]) -> str:
    """The figures of :func:`run` as a text table, with the goal's verdict."""
    lines = [
        f"caused by {result['cycles']} save+restore cycles, 4 VMs (2 pairs) on 2 hosts"
        " (idle: as long as lockstep's window, nothing done)",
        f"{'setting':14} {'method':9} {'failed':>7} {'transitions':>11} {'split brain':>11}"
        f" {'lost':>7} {'dup':>5}  {'skew/spread':>11}  longest heartbeat silence (s),",
        f"{'':24} {'cycles':>7} {'':37}  {'max (ms)':>11}  after saves / restores: p50 max",
    ]
    goal = True
    for s in result["settings"]:
        name = label(s["heartbeat_s"], s["timeout_s"])
        if "error" in s:
            lines.append(f"{name:14} failed: {s['error']}")
            goal = False
            continue
        for method, key in (
            ("idle", ""),
            ("lockstep", "max_resume_skew_ms"),
            ("naive", "max_resume_spread_ms"),
        ):
            m = s[method]
            v = m.get(key)
            silences = " / ".join(
                _p50_max(m.get(k)) for k in ("silence_after_save_s", "silence_after_restore_s")
            )
            failed = m.get("failed_cycles")
            lines.append(
                f"{name:14} {method:9} {'-' if failed is None else failed:>7}"
                f" {m['transitions']:11d} {m['split_brain']:11d} {m['lost']:7d}"
                f" {m['duplicated']:5d}  {'-' if v is None else f'{v:11.3f}':>11}"
                f"  {silences if key else '-'}"
            )
        goal = goal and s["lockstep"]["transitions"] == s["lockstep"]["split_brain"] == 0
    lines.append(
        "goal: lockstep causes 0 transitions and 0 split brains at every setting:"
        f" {'met' if goal else 'NOT met'}"
    )
    lb, la = result["loadavg_before"], result["loadavg_after"]
    lines.append(f"load average before {lb[0]:.2f} {lb[1]:.2f}, after {la[0]:.2f} {la[1]:.2f}")
    return "\n".join(lines)


def _p50_max(figures: dict[str, float | None] | None) -> str:
    if not figures or figures.get("max") is None:
        return "-"
    return f"{figures['p50']:.3f} {figures['max']:.3f}"


def main() -> None:
    """Run the benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help="HEARTBEAT/TIMEOUT,...")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    try:
        settings = parse_settings(args.settings)
    except ValueError as exc:
        ap.error(str(exc))
    if args.cycles < 1:
        ap.error("--cycles must be at least 1")
    result = asyncio.run(run(settings, args.cycles))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
