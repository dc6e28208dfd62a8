"""The whole loop on the lab's Pacemaker cluster: failure cases, each from the same state.

What lockstep is for (issue 15): inject a failure, watch the cluster fail
over, put it back, next case. A lab of 2 VMs runs Corosync + Pacemaker
(``lab up --cluster pacemaker``, token ``--token`` ms) with the resource group
(virtual address and HTTP service) on p1; once it has formed, lockstep state
``origin`` is saved. The bench writes its failure cases as executables into a
temporary folder (each a shell script using ``lockstep fault ...`` and
``lockstep lab exec VM -- CMD``, which waits until the cluster has reacted as
expected and exits non-zero if it did not) and runs them with
``lockstep run --from origin CASES --json``.

The baseline puts the cluster back the way one does without lockstep: every
VM rebooted (the group's VMs down and up again, on fresh disks, the network
faults healed) and the cluster formed again (Corosync and Pacemaker started,
the resource group configured and started), then the same case runs. It runs
on the first ``--reboot-cases`` cases only (each reset takes minutes here).

Per case and method: the reset (lockstep: the restore's own duration, from
``lockstep run --json``; baseline: from the reboot's start until the cluster
had formed with the group started) and the time until the cluster was ready
for the case (from the start of the reset until the case's own first check
saw every node online, a DC and the group started on p1 on every node's
crm_mon: the same check, in the same process, for both methods). Goal
(issue 15): reset overhead per case <= 2 s with lockstep.

    python -m bench.cases [--token 1000] [--reboot-cases 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import lab_caller, lab_options, machine_line, percentile, say
from lockstep.caller.orchestrator import GroupCaller
from lockstep.errors import LockstepError
from lockstep.execd.model import Heal
from lockstep.lab.cluster import form_cluster
from lockstep.lab.clusterconf import PACEMAKER_MIN_MEMORY, ClusterSpec
from lockstep.lab.lab import (
    guest,
    lab_cluster,
    lab_data_dir,
    wait_guests,
)
from lockstep.run.cases import Case, discover
from lockstep.run.execute import execute
from lockstep.run.loop import case_env
from lockstep.units import format_size

LAB = "lsbc"
STATE = "origin"
GOAL_S = 2.0  # reset overhead per case with lockstep (issue 15)
CASE_TIMEOUT_S = 120.0
READY = "ready"  # the action a case prints once its first check saw the cluster ready

HELPER = '''"""The cases' look at the lab's Pacemaker cluster (from bench/cases.py; not a case).

    ready [--any]          until every node is online, a DC is elected and the group
                           is started on p1 (--any: on one node) in every node's view
    placed NODE [--on VM,...]   until the group is started on NODE in VM's views
    logged KIND N          until the middleware logged N events of KIND since `ready`
Each waits --within S seconds (default 60) and exits 1 if it did not see it.
"""

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from lockstep.lab.observe import cluster_view
from lockstep.lab.verify import EVERYTHING, log_marks, verify_lab

LAB = os.environ["LOCKSTEP_LAB"]
MARKS = Path(os.environ["BENCH_MARKS"])  # one file per run of a case: where `ready` marked
GROUP = ("vip", "web")


def group_on(view):
    """Where one node's crm_mon places the whole group started, or None."""
    if "error" in view or view.get("dc") is None:
        return None
    res = view.get("resources", {})
    where = {tuple(res.get(r, {}).get("on", ())) for r in GROUP}
    roles = {res.get(r, {}).get("role") for r in GROUP}
    if roles == {"Started"} and len(where) == 1:
        (on,) = where
        if len(on) == 1:
            return on[0]
    return None


def ready(view, node):
    nodes = view.get("nodes", {})
    if not nodes:
        return False
    places = set()
    for v in nodes.values():
        if "error" in v or not v.get("nodes") or not all(v["nodes"].values()):
            return False
        places.add(group_on(v))
    return len(places) == 1 and None not in places and (node is None or places == {node})


def describe(view):
    out = []
    for vm, v in sorted(view.get("nodes", {}).items()):
        if "error" in v:
            out.append(vm + ": " + v["error"][:80])
            continue
        online = ",".join(n for n, up in sorted(v.get("nodes", {}).items()) if up)
        out.append(vm + ": online " + online + ", DC " + str(v.get("dc")) + ", group on "
                   + str(group_on(v)))
    return "; ".join(out)


async def until(check, within, what):
    t0 = time.monotonic()
    last = None
    while True:
        ok, last = await check()
        if ok:
            return True, time.monotonic() - t0
        if time.monotonic() - t0 > within:
            print("not seen within", within, "s:", what, "(last:", str(last) + ")", flush=True)
            return False, time.monotonic() - t0
        await asyncio.sleep(0.3)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("ready", "placed", "logged"))
    ap.add_argument("args", nargs="*")
    ap.add_argument("--any", action="store_true")
    ap.add_argument("--on", default="")
    ap.add_argument("--within", type=float, default=60.0)
    a = ap.parse_args()
    if a.what == "ready":
        node = None if a.any else "p1"

        async def check():
            view = await cluster_view(LAB)
            return ready(view, node), describe(view)

        ok, took = await until(check, a.within, "the cluster ready")
        if ok:
            if not MARKS.exists():
                MARKS.write_text(json.dumps(log_marks(LAB)))
            print("action: ready (" + (node or "any node") + ", checked for %.2f s)" % took,
                  flush=True)
        return 0 if ok else 1
    if a.what == "placed":
        node = a.args[0]
        on = [v for v in a.on.split(",") if v]

        async def check():
            view = await cluster_view(LAB)
            views = [v for vm, v in view.get("nodes", {}).items() if not on or vm in on]
            return bool(views) and all(group_on(v) == node for v in views), describe(view)

        ok, took = await until(check, a.within, "the group on " + node)
        print(("group on %s after %.2f s" % (node, took)) if ok else "", flush=True)
        return 0 if ok else 1
    kind, n = a.args[0], int(a.args[1])
    marks = json.loads(MARKS.read_text()) if MARKS.exists() else None

    async def check():
        seen = verify_lab(LAB, EVERYTHING, marks).middleware.count(kind)
        return seen >= n, kind + " " + str(seen)

    ok, took = await until(check, a.within, str(n) + " " + kind)
    print(("%s >= %d after %.2f s" % (kind, n, took)) if ok else "", flush=True)
    return 0 if ok else 1


sys.exit(asyncio.run(main()))
'''

COMMON = """# Sourced by every case (written by bench/cases.py; not a case).
set -eu
lockstep() { "$BENCH_PYTHON" -m lockstep.cli.main "$@"; }
onvm() { vm=$1; shift; lockstep lab exec --name "$LOCKSTEP_LAB" "$vm" -- "$@"; }
cluster() { "$BENCH_PYTHON" "$BENCH_DIR/cluster.py" "$@"; }
BENCH_MARKS="$BENCH_DIR/marks-$LOCKSTEP_CASE-$$.json"
export BENCH_MARKS
act() { echo "action: $*"; }
cluster ready
"""

CASES: dict[str, str] = {
    "01-kill-holder": """act kill p1, which holds the group
lockstep fault kill p1
cluster placed s1 --on s1
""",
    "02-kill-standby": """act kill s1, the standby
lockstep fault kill s1
cluster logged membership_changes 1
cluster placed p1 --on p1
""",
    "03-partition": """act partition p1 from s1
lockstep fault partition p1 s1
cluster placed s1 --on s1
cluster placed p1 --on p1
""",
    "04-freeze-past-token": """act freeze p1 for 4 s, past token + consensus
lockstep fault freeze p1 4
cluster logged token_losses 1
cluster ready --any --within 90
""",
    "05-frame-loss": """act drop 40 % of the frames to and from p1 for 10 s
lockstep fault loss p1 40
sleep 10
act heal
lockstep fault heal
cluster ready --any
""",
    "06-kill-corosync": """act kill corosync on p1
onvm p1 'pkill -9 -x corosync'
cluster placed s1 --on s1
""",
    "07-kill-pacemakerd": """act kill pacemakerd and its daemons on p1
onvm p1 'pkill -9 pacemaker'
cluster placed s1 --on s1
""",
    "08-standby-holder": """act put p1 in standby
onvm p1 'crm_attribute --node p1 --name standby --update on'
cluster placed s1
""",
    "09-move-resource": """act move the group to s1
onvm p1 'crm_resource --move --resource service --node s1'
cluster placed s1
""",
    "10-kill-service": """act kill the HTTP service on p1
onvm p1 'pkill -9 -f "http[.]server"'
cluster logged pacemaker_transitions 1
cluster ready --within 60
""",
}


def write_cases(folder: Path) -> list[Case]:
    """The helper, the common prelude and every case, in ``folder``; the cases in order."""
    (folder / "cluster.py").write_text(HELPER)
    (folder / "common.sh").write_text(COMMON)
    for name, body in CASES.items():
        path = folder / name
        path.write_text(f'#!/bin/sh\n. "$BENCH_DIR/common.sh"\n{body}')
        path.chmod(0o755)
    return discover([folder])


def bench_env(folder: Path) -> dict[str, str]:
    """What the cases need beside ``lockstep run``'s environment: this Python, the folder."""
    return {"BENCH_PYTHON": sys.executable, "BENCH_DIR": str(folder)}


def ready_at(actions: list[tuple[float, str]]) -> float | None:
    """When a case's first check saw the cluster ready (wall clock), or None."""
    return next((t for t, a in actions if a.startswith(READY)), None)


def lockstep_run(group_file: Path, folder: Path, out: Path) -> dict[str, Any]:
    """``lockstep run --from origin CASES --json``, as a user runs it; its JSON.

    Raises:
        RuntimeError: it printed no JSON.
    """
    argv = [sys.executable, "-m", "lockstep.cli.main", "-g", str(group_file), "run"]
    argv += ["--from", STATE, "--timeout", f"{CASE_TIMEOUT_S:g}s", "--json"]
    argv += ["--html", str(out.with_suffix(".html")), str(folder)]
    say("$ lockstep " + " ".join(argv[3:]))
    env = os.environ | bench_env(folder)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    sys.stderr.write(proc.stderr)
    out.write_text(proc.stdout)
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except ValueError as exc:
        raise RuntimeError(f"lockstep run exited {proc.returncode} without JSON") from exc
    return result


def lockstep_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per case of ``lockstep run --json``: status, reset, ready, case time, noticed."""
    rows = []
    for c in result["cases"]:
        began = c["started"] - c["reset_s"]
        actions = [(a["t"], a["action"]) for a in c["actions"]]
        ready = ready_at(actions)
        noticed = c.get("noticed") or {}
        rows.append(
            {
                "case": c["name"],
                "status": c["status"],
                "reset_s": c["reset_s"],
                "switch_over_ms": (c.get("restore") or {}).get("switch_over_ms"),
                "ready_s": None if ready is None else ready - began,
                "case_s": c["duration_s"],
                "noticed": {
                    k: noticed.get(k, 0)
                    for k in ("token_losses", "membership_changes", "pacemaker_transitions")
                },
                "explanation": c.get("explanation", [])[-4:],
            }
        )
    return rows


async def reboot_reset(caller: GroupCaller) -> dict[str, float]:
    """Put the cluster back by rebooting: faults healed, every VM down and up, cluster formed.

    Returns the seconds each step took, ``reset_s`` in all.

    Raises:
        LockstepError: a step failed.
    """
    t0 = time.monotonic()
    await caller.fault(Heal(()))
    await caller.down()
    await caller.up()
    booting = time.monotonic()
    data = lab_data_dir(LAB)
    await wait_guests(caller.group, data)
    booted = time.monotonic()
    plan = lab_cluster(LAB)
    shells = {m.name: guest(caller.group, m.name, data) for m in plan.members}
    try:
        await form_cluster(plan, shells, say)
    finally:
        for shell in shells.values():
            await shell.close()
    end = time.monotonic()
    return {
        "down_up_s": booting - t0,
        "boot_s": booted - booting,
        "form_s": end - booted,
        "reset_s": end - t0,
    }


async def reboot_rows(
    caller: GroupCaller, group_file: Path, folder: Path, cases: list[Case]
) -> list[dict[str, Any]]:
    """The baseline: before each case, reboot every VM and form the cluster again."""
    rows = []
    for case in cases:
        say(f"{case.name}: rebooting every VM, forming the cluster again")
        began = time.time()
        try:
            steps = await reboot_reset(caller)
        except LockstepError as exc:
            rows.append({"case": case.name, "status": "error", "error": str(exc)})
            continue
        env = case_env(caller.group, group_file, "reboot", case, LAB) | bench_env(folder)
        outcome = await execute(case, env, CASE_TIMEOUT_S)
        ready = ready_at([(x.t, a) for x in outcome.lines if (a := x.action) is not None])
        status = (
            "passed" if outcome.exit_code == 0 else ("timeout" if outcome.timed_out else "failed")
        )
        say(f"{case.name}: {status}; reset {steps['reset_s']:.1f} s")
        row: dict[str, Any] = {"case": case.name, "status": status, **steps}
        row["ready_s"] = None if ready is None else ready - began
        row["case_s"] = outcome.duration
        row["output"] = [x.text for x in outcome.lines][-6:]
        rows.append(row)
    return rows


async def run(token_ms: int, reboot_cases: int, keep: Path) -> dict[str, Any]:
    """Lab up, origin saved, ``lockstep run`` of every case, the reboot baseline, lab down."""
    spec = ClusterSpec("pacemaker", token_ms=token_ms)
    memory = format_size(PACEMAKER_MIN_MEMORY)
    opts = lab_options(LAB, (200, 230), vms=2, memory=memory, stream_rate=0, cluster=spec)
    folder = Path(tempfile.mkdtemp(prefix="lockstep-cases-"))
    cases = write_cases(folder)
    say(f"lab {LAB}: Pacemaker on 2 VMs ({memory}), token {token_ms} ms; cases in {folder}")
    result: dict[str, Any] = {"token_ms": token_ms, "vms": 2, "machine": machine_line()}
    t0 = time.monotonic()
    try:
        async with lab_caller(opts) as caller:
            result["lab_up_s"] = round(time.monotonic() - t0, 1)
            await asyncio.sleep(5)
            saved = await caller.save(STATE)
            say(f"state {STATE} saved in {saved.duration_s:.2f} s")
            t1 = time.monotonic()
            ran = lockstep_run(opts.group_file, folder, keep)
            result["lockstep_run_s"] = round(time.monotonic() - t1, 1)
            result["lockstep"] = lockstep_rows(ran)
            t2 = time.monotonic()
            result["reboot"] = await reboot_rows(
                caller, opts.group_file, folder, cases[:reboot_cases]
            )
            result["reboot_run_s"] = round(time.monotonic() - t2, 1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def _s(value: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.2f}"


def table(result: dict[str, Any]) -> str:
    """The figures of :func:`run` as a table per case, a summary and the goal's verdict."""
    reboot = {r["case"]: r for r in result.get("reboot", [])}
    lines = [
        f"the loop on the lab's Pacemaker cluster: {result['vms']} VMs, token"
        f" {result['token_ms']} ms; {machine_line()}",
        "lockstep: `lockstep run --from origin CASES`; reboot: every VM down and up, cluster"
        f" formed again (measured on the first {len(reboot)} of {len(result['lockstep'])} cases)",
        "reset: lockstep's restore, or the reboot until the cluster had formed with the group"
        " started; ready: from the reset's start until the case's first check saw the cluster"
        " whole (every node online, the group on p1 in every node's crm_mon)",
        f"{'case':22} {'status':8} {'reset s':>8} {'ready s':>8} {'case s':>7}"
        f"  {'in the case: token losses/memberships/transitions':>20}"
        f"  {'reboot: status':>14} {'reset s':>8} {'ready s':>8} {'case s':>7}",
    ]
    for r in result["lockstep"]:
        n = r["noticed"]
        noticed = f"{n['token_losses']}/{n['membership_changes']}/{n['pacemaker_transitions']}"
        b = reboot.get(r["case"])
        tail = ""
        if b is not None:
            tail = (
                f"  {b['status']:>14} {_s(b.get('reset_s'), 8)} {_s(b.get('ready_s'), 8)}"
                f" {_s(b.get('case_s'))}"
            )
        lines.append(
            f"{r['case']:22} {r['status']:8} {_s(r['reset_s'], 8)} {_s(r['ready_s'], 8)}"
            f" {_s(r['case_s'])}  {noticed:>50}{tail}"
        )
    lines += summary(result)
    for r in result["lockstep"]:
        if r["status"] != "passed":
            lines.append(f"{r['case']} (lockstep) {r['status']}: " + " / ".join(r["explanation"]))
    for b in reboot.values():
        if b["status"] != "passed":
            why = b.get("error") or " / ".join(b.get("output", []))
            lines.append(f"{b['case']} (reboot) {b['status']}: {why}")
    return "\n".join(lines)


def summary(result: dict[str, Any]) -> list[str]:
    """p50 and max of reset and ready per method; the goal's verdict."""

    def stats(rows: list[dict[str, Any]], key: str) -> str:
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values:
            return "-"
        return f"p50 {percentile(values, 50):.2f} s, max {max(values):.2f} s"

    ls, rb = result["lockstep"], result.get("reboot", [])
    out = [
        f"lockstep ({len(ls)} cases): reset {stats(ls, 'reset_s')}; ready {stats(ls, 'ready_s')};"
        f" the whole run {result.get('lockstep_run_s', 0):.0f} s",
        f"reboot ({len(rb)} cases): reset {stats(rb, 'reset_s')}; ready {stats(rb, 'ready_s')};"
        f" those cases {result.get('reboot_run_s', 0):.0f} s",
    ]
    resets = [r["reset_s"] for r in ls if r.get("reset_s") is not None]
    reboots = [r["reset_s"] for r in rb if r.get("reset_s") is not None]
    if resets and reboots:
        mine, theirs = percentile(resets, 50), percentile(reboots, 50)
        out.append(
            f"reset per case: lockstep {mine:.2f} s against {theirs:.1f} s rebooting (p50),"
            f" {theirs / mine:.0f}x"
        )
    if rb and result.get("reboot_run_s"):
        per_case = result["reboot_run_s"] / len(rb)
        out.append(
            f"the loop of {len(ls)} cases: lockstep {result.get('lockstep_run_s', 0):.0f} s;"
            f" rebooting, estimated from the {len(rb)} measured ({per_case:.0f} s per case):"
            f" {per_case * len(ls):.0f} s"
        )
    met = bool(resets) and max(resets) <= GOAL_S and len(resets) == len(ls)
    out.append(
        f"goal: reset overhead per case <= {GOAL_S:g} s with lockstep:"
        f" {'met' if met else 'NOT met'} (max {max(resets, default=float('nan')):.2f} s)"
    )
    return out


def main() -> None:
    """Run the benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--token", type=int, default=1000, help="Corosync token (ms)")
    ap.add_argument(
        "--reboot-cases", type=int, default=3, help="cases the reboot baseline runs (first N)"
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument(
        "--run-json",
        type=Path,
        default=Path(tempfile.gettempdir()) / "lockstep-cases-run.json",
        help="where lockstep run's own JSON goes",
    )
    args = ap.parse_args()
    if not 0 <= args.reboot_cases <= len(CASES):
        ap.error(f"--reboot-cases must be 0 to {len(CASES)}")
    result = asyncio.run(run(args.token, args.reboot_cases, args.run_json))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
