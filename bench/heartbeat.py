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

With ``--cluster pacemaker`` or ``keepalived`` the rows are the real
middleware's instead (``lab up --cluster``; the lab's agent runs beside it
with no streams, and is not counted): one lab per setting (``--token`` in ms
for Corosync, ``--advert`` in ms for VRRP; ``MS:CYCLES`` gives one setting its
own cycle count), 2 VMs by default (one Pacemaker cluster of both, or one VRRP
pair). What each method caused is what the middleware itself logged in its
window (``lab verify`` from a mark): Corosync token losses, new memberships,
Pacemaker transitions and resources placed anew, VRRP state changes. After
each operation the bench waits just long enough for the middleware to notice
(token + consensus, or VRRP's master-down interval, plus 1 s); a cycle after
which the middleware's own view (crm_mon on every node, or who holds each
virtual address) differs from the one saved as ``origin`` has failed and is
put back to ``origin`` with lockstep. An idle window (``--idle`` s, nothing
done) is the control. Goal (issue 13): lockstep causes 0 token losses,
membership changes, transitions and VRRP state changes at token 1000 ms and at
advert 100 ms.

    python -m bench.heartbeat --cluster pacemaker --token 3000:10,1000,300 --cycles 20
    python -m bench.heartbeat --cluster keepalived --advert 1000:10,100 --cycles 20 [--vms 4]
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

from bench.common import lab_caller, lab_options, machine, machine_line, percentile, put_back, say
from bench.naive import naive_restore, naive_save
from lockstep.caller.connect import clients_for
from lockstep.caller.orchestrator import GroupCaller
from lockstep.errors import LabError, LockstepError
from lockstep.lab.clusterconf import (
    PACEMAKER_MIN_MEMORY,
    ClusterKind,
    ClusterSpec,
    totem_timings,
    vrrp_advert_ms,
)
from lockstep.lab.lab import bring_up, take_down
from lockstep.lab.observe import cluster_view, placement
from lockstep.lab.verify import (
    EVERYTHING,
    LAST_RESTORE,
    Since,
    VerifyReport,
    log_marks,
    verify_lab,
)
from lockstep.units import format_size

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
                return await put_back(caller, wrong_roles(LAB), "origin", wait)

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


# -- the real middleware's rows (--cluster pacemaker|keepalived) -------------------------

MIDDLEWARE_LAB = "lsbh"
MIDDLEWARE_COUNTS = (
    "token_losses",
    "membership_changes",
    "pacemaker_transitions",
    "resource_moves",
    "vrrp_changes",
    "token_warnings",
)
MARGIN_S = 1.0  # after the middleware's own timeouts: a TCG guest catching up, a log line
WHOLE_LIMIT_S = 120.0  # for a middleware lab to settle into one whole cluster after lab up
SHOWN_LINES = 6  # lines per window shown under the table, for what lockstep caused


def parse_row_settings(text: str, cycles: int) -> list[tuple[int, int]]:
    """``3000:10,1000,300`` as [(ms, cycles), ...]; a setting without ``:CYCLES`` gets ``cycles``.

    Raises:
        ValueError: an item is not MS or MS:CYCLES with positive integers.
    """
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        ms, _, n = item.partition(":")
        try:
            row = (int(ms), int(n) if n else cycles)
        except ValueError:
            raise ValueError(
                f"setting {item!r} is not MS or MS:CYCLES, e.g. 1000 or 3000:10"
            ) from None
        if row[0] <= 0 or row[1] <= 0:
            raise ValueError(f"setting {item!r}: both numbers must be positive")
        out.append(row)
    return out


def middleware_label(spec: ClusterSpec) -> str:
    """A middleware setting as ``pacemaker token 1000 ms`` or ``keepalived advert 100 ms``."""
    if spec.kind == ClusterKind.PACEMAKER:
        return f"pacemaker token {spec.token_ms} ms"
    return f"keepalived advert {spec.advert_ms} ms"


def notice_s(spec: ClusterSpec, vms: int) -> float:
    """How long the middleware takes to act on a silence: then a change shows in its log.

    Corosync: the token, then the consensus to form a new membership.
    VRRPv3: the backup's master-down interval, 3 adverts plus its skew
    ((256 - priority 100) / 256 of an advert).
    """
    if spec.kind == ClusterKind.PACEMAKER:
        t = totem_timings(spec, vms)
        return (t.token_ms + t.consensus_ms) / 1000
    advert = vrrp_advert_ms(spec) / 1000
    return (3 + 156 / 256) * advert


def agrees(view: dict[str, Any], origin: dict[str, Any]) -> list[str]:
    """How ``view`` differs from the ``origin`` view (empty: the cluster is as saved).

    Pacemaker: every node must answer, see every node online and place every
    resource where ``origin`` did; keepalived: each address held by its
    holders at ``origin`` alone.
    """
    if view.get("kind") == "keepalived":
        now, then = placement(view), placement(origin)
        return [
            f"{vip} on {now.get(vip) or 'nobody'}, not {then[vip]}"
            for vip in then
            if now.get(vip) != then[vip]
        ]
    then = placement(origin)
    wrong = []
    for vm, node_view in view.get("nodes", {}).items():
        if "error" in node_view:
            wrong.append(f"{vm}: {node_view['error']}")
            continue
        offline = sorted(n for n, up in node_view.get("nodes", {}).items() if not up)
        if offline:
            wrong.append(f"{vm} sees {', '.join(offline)} offline")
        placed = {r: list(v["on"]) for r, v in node_view.get("resources", {}).items()}
        wrong += [
            f"{vm} sees {r} on {', '.join(placed.get(r, [])) or 'no node'}, not {', '.join(on)}"
            for r, on in then.items()
            if placed.get(r) != on
        ]
    return wrong


def middleware_counts(report: VerifyReport) -> dict[str, Any]:
    """What the middleware logged in a window: each count and the lines that show them."""
    totals = report.middleware
    lines = {k: v for k, v in totals.lines_json().items() if v}
    return {k: totals.count(k) for k in MIDDLEWARE_COUNTS} | {
        "noticed": totals.noticed,
        "lines": lines,
    }


def not_whole(view: dict[str, Any]) -> list[str]:
    """Why the middleware's ``view`` is not one whole cluster (empty: it is).

    Every node must see every node online and the same placement, and each
    resource or address must be on exactly one node.
    """
    wrong = agrees(view, view)
    where = placement(view)
    wrong += [f"{k} on {', '.join(on) or 'no node'}" for k, on in where.items() if len(on) != 1]
    return wrong if where else [*wrong, "nothing placed"]


async def whole_view(wait: float, limit: float = WHOLE_LIMIT_S) -> tuple[dict[str, Any], float]:
    """The middleware's view once it is one whole cluster, and how long that took.

    A cluster that has just formed can still split and merge again (at a short
    token on this loaded machine): the first save must not catch it so.

    Raises:
        RuntimeError: it was not whole for ``limit`` seconds (the message says why).
    """
    t0 = time.monotonic()
    while True:
        await asyncio.sleep(wait)
        view = await cluster_view(MIDDLEWARE_LAB)
        wrong = not_whole(view)
        if not wrong:
            return view, time.monotonic() - t0
        if time.monotonic() - t0 > limit:
            raise RuntimeError(
                f"the cluster was not whole within {limit:g} s of lab up: {'; '.join(wrong)}"
            )
        say(f"  not whole yet: {'; '.join(wrong)}")


async def one_middleware(
    spec: ClusterSpec, cycles: int, vms: int, idle_s: float, guest_time: str = "true"
) -> dict[str, Any]:
    """Bring a middleware lab up at this setting, run both methods' cycles, take it down."""
    pacemaker = spec.kind == ClusterKind.PACEMAKER
    memory = format_size(PACEMAKER_MIN_MEMORY) if pacemaker else "256M"
    opts = lab_options(
        MIDDLEWARE_LAB, (170, 200), vms=vms, memory=memory, stream_rate=0, cluster=spec
    )
    wait = notice_s(spec, vms) + MARGIN_S
    tail = wait + (4.0 if pacemaker else 1.0)  # Pacemaker's scheduler logs a few s after
    name = middleware_label(spec)
    say(
        f"{name}: lab {MIDDLEWARE_LAB} ({vms} VMs, {memory}) on {opts.vm_subnet};"
        f" {wait:.2f} s after each operation"
    )
    result: dict[str, Any] = {
        "cluster": spec.kind,
        "token_ms": spec.token_ms,
        "advert_ms": spec.advert_ms,
        "cycles": cycles,
        "vms": vms,
        "wait_s": round(wait, 2),
    }
    started = time.monotonic()
    result["guest_time"] = guest_time
    async with lab_caller(opts, skew_budget=SKEW_BUDGET, guest_time=guest_time) as caller:
        result["formed_s"] = round(time.monotonic() - started, 1)
        group, clients = caller.group, caller.links
        origin, whole_s = await whole_view(wait)
        result["whole_after_s"] = round(whole_s, 1)
        where = placement(origin)
        say(f"  placement at origin ({whole_s:.1f} s after lab up): {where}")
        await caller.save("origin")
        await asyncio.sleep(wait)

        async def back_to_origin() -> int:
            """1 (and the lab restored to origin) if the middleware's view is not origin's."""
            wrong = agrees(await cluster_view(MIDDLEWARE_LAB), origin)
            return await put_back(caller, wrong, "origin", wait)

        async def window(
            method: str, one: Callable[[int], Awaitable[float | None]], count: int = cycles
        ) -> dict[str, Any]:
            """``count`` runs of ``one``; what the middleware logged, until ``tail`` s after."""
            marks = log_marks(MIDDLEWARE_LAB)
            t0 = time.monotonic()
            figures: list[float] = []
            failed = 0
            for i in range(count):
                figure = await one(i)
                if figure is not None:
                    figures.append(figure)
                failed += await back_to_origin()
                seen = verify_lab(MIDDLEWARE_LAB, EVERYTHING, marks).middleware
                say(
                    f"  {method} cycle {i + 1}/{count}:"
                    f" {'-' if figure is None else f'{figure:.3f}'} ms; so far"
                    f" {seen.count('token_losses')} token losses,"
                    f" {seen.count('membership_changes')} memberships,"
                    f" {seen.count('pacemaker_transitions')} transitions,"
                    f" {seen.count('vrrp_changes')} VRRP changes; {failed} failed"
                )
            await asyncio.sleep(tail)
            report = verify_lab(MIDDLEWARE_LAB, EVERYTHING, marks)
            return middleware_counts(report) | {
                "failed_cycles": failed,
                "max_ms": max(figures) if figures else None,
                "window_s": round(time.monotonic() - t0, 1),
            }

        async def lockstep_cycle(i: int) -> float | None:
            saved = await caller.save(f"hb-{i}")
            await asyncio.sleep(wait)
            restored = await caller.restore(f"hb-{i}")
            await asyncio.sleep(wait)
            skews = [k for k in (saved.resume_skew_ms, restored.resume_skew_ms) if k is not None]
            return max(skews) if skews else None

        async def naive_cycle(i: int) -> float | None:
            est = await caller.sync()
            await naive_save(group, clients, est, f"nv{i}")
            # Every VM is down now: nothing more to notice until the restores.
            est = await caller.sync()
            run = await naive_restore(group, clients, est, f"nv{i}")
            await asyncio.sleep(wait)
            at = run.resumed_at.values()
            return (max(at) - min(at)) * 1000 if at else None

        async def nothing(_: int) -> float | None:
            await asyncio.sleep(idle_s)
            return None

        result["lockstep"] = await window("lockstep", lockstep_cycle)
        if idle_s > 0:
            result["idle"] = await window("idle", nothing, 1) | {"idle_s": idle_s}
        await caller.restore("origin")
        await asyncio.sleep(wait)
        result["naive"] = await window("naive", naive_cycle)
        result["placement_at_origin"] = where
    return result


async def run_middleware(
    specs: list[tuple[ClusterSpec, int]], vms: int, idle_s: float, guest_time: str = "true"
) -> dict[str, Any]:
    """Every middleware setting in turn (one lab each); the machine before and after."""
    before = machine()
    rows = []
    for spec, cycles in specs:
        try:
            rows.append(await one_middleware(spec, cycles, vms, idle_s, guest_time))
        except (LockstepError, RuntimeError) as exc:
            say(f"{middleware_label(spec)} failed: {exc}")
            rows.append(
                {
                    "cluster": spec.kind,
                    "token_ms": spec.token_ms,
                    "advert_ms": spec.advert_ms,
                    "cycles": cycles,
                    "vms": vms,
                    "error": str(exc),
                }
            )
    return {
        "machine": before,
        "loadavg_after": os.getloadavg(),
        "guest_time": guest_time,
        "rows": rows,
    }


def middleware_table(result: dict[str, Any]) -> str:
    """The figures of :func:`run_middleware` as a text table, the goal's verdict, and the lines."""
    lines = [
        "what the middleware logged over N save+restore cycles (one lab per setting);"
        f" guests' wall clocks after a restore: {result.get('guest_time', 'true')}"
        " (true: set to true time, saved: kept)",
        machine_line(),
        f"{'setting':31} {'method':9} {'cycles':>6} {'failed':>6} {'token':>6} {'member-':>7}"
        f" {'trans-':>6} {'moves':>5} {'VRRP':>5} {'token':>6}  {'skew/spread':>11}",
        f"{'':31} {'':9} {'':>6} {'cycles':>6} {'losses':>6} {'ships':>7}"
        f" {'itions':>6} {'':>5} {'chgs':>5} {'warns':>6}  {'max (ms)':>11}",
    ]
    goal: bool | None = None
    shown: list[str] = []
    for r in result["rows"]:
        spec = ClusterSpec(r["cluster"], token_ms=r.get("token_ms"), advert_ms=r.get("advert_ms"))
        name = f"{middleware_label(spec)}, {r['vms']} VMs"
        if "error" in r:
            lines.append(f"{name:31} failed: {r['error']}")
            continue
        for method in ("idle", "lockstep", "naive"):
            m = r.get(method)
            if m is None:
                continue
            n = f"{m['idle_s']:g} s" if method == "idle" else str(r["cycles"])
            v = m.get("max_ms")
            lines.append(
                f"{name:31} {method:9} {n:>6} {'-' if method == 'idle' else m['failed_cycles']:>6}"
                f" {m['token_losses']:6d} {m['membership_changes']:7d}"
                f" {m['pacemaker_transitions']:6d} {m['resource_moves']:5d} {m['vrrp_changes']:5d}"
                f" {m['token_warnings']:6d}  {'-' if v is None else f'{v:11.3f}':>11}"
            )
            if method == "lockstep":
                for kind, events in m["lines"].items():
                    shown += [
                        f"  {name}, lockstep, {kind}: {e['vm']}: {e['line']}"
                        for e in events[:SHOWN_LINES]
                    ]
        key = (r["cluster"], r.get("token_ms"), r.get("advert_ms"))
        if key in (("pacemaker", 1000, None), ("keepalived", None, 100)):
            goal = (goal is not False) and r["lockstep"]["noticed"] == 0
    if goal is not None:
        lines.append(
            "goal: lockstep causes 0 token losses, memberships, transitions, VRRP changes"
            f" at token 1000 ms / advert 100 ms: {'met' if goal else 'NOT met'}"
        )
    la = result["loadavg_after"]
    lines.append(f"load average after {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    if shown:
        lines += ["what lockstep's cycles caused, as the middleware logged it:", *shown]
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help="HEARTBEAT/TIMEOUT,...")
    ap.add_argument(
        "--cluster",
        default=ClusterKind.AGENT.value,
        help="agent (the lab's own, --settings), or pacemaker and/or keepalived, comma-separated",
    )
    ap.add_argument(
        "--token", default="3000,1000,300", help="pacemaker: Corosync tokens, MS[:CYCLES],..."
    )
    ap.add_argument(
        "--advert", default="1000,100", help="keepalived: VRRP adverts, MS[:CYCLES],..."
    )
    ap.add_argument("--vms", type=int, default=2, help="pacemaker, keepalived: VMs per lab")
    ap.add_argument(
        "--idle", type=float, default=60.0, help="pacemaker, keepalived: idle control (s)"
    )
    ap.add_argument(
        "--guest-time",
        choices=("true", "saved"),
        default="true",
        help="pacemaker, keepalived: set the guests' wall clocks after each restore (true,"
        " the default) or keep the saved time",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.cycles < 1:
        ap.error("--cycles must be at least 1")
    kinds = [k.strip() for k in args.cluster.split(",") if k.strip()]
    if kinds == [ClusterKind.AGENT.value]:
        try:
            settings = parse_settings(args.settings)
        except ValueError as exc:
            ap.error(str(exc))
        result = asyncio.run(run(settings, args.cycles))
        print(table(result))
    else:
        specs: list[tuple[ClusterSpec, int]] = []
        try:
            for kind in kinds:
                if kind == ClusterKind.PACEMAKER:
                    specs += [
                        (ClusterSpec(kind, token_ms=ms), n)
                        for ms, n in parse_row_settings(args.token, args.cycles)
                    ]
                elif kind == ClusterKind.KEEPALIVED:
                    specs += [
                        (ClusterSpec(kind, advert_ms=ms), n)
                        for ms, n in parse_row_settings(args.advert, args.cycles)
                    ]
                else:
                    ap.error(f"--cluster {kind}: use agent alone, or pacemaker and/or keepalived")
            for spec, _ in specs:
                notice_s(spec, args.vms)  # a timing the middleware refuses fails here
        except (ValueError, LabError) as exc:
            ap.error(str(exc))
        result = asyncio.run(run_middleware(specs, args.vms, args.idle, args.guest_time))
        print(middleware_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
