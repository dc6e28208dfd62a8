"""``make demo``: the main job end to end on a real Pacemaker cluster in the embedded lab.

The lab: 2 hosts (network namespaces), one VM on each (p1 on h1, s1 on h2)
running Corosync 3 and Pacemaker (token 3000 ms, Corosync's own default), with a resource group of a
virtual address (IPaddr2) and a web service on it, started on p1; a client
machine outside the group talks to the address. Then, printing every command
as a user would type it:

1. ``lockstep save start``: the whole cluster, paused and resumed in step;
2. a failure: ``lockstep fault kill p1``; Pacemaker moves the address and the
   service to s1, and the client's ARP entry follows them;
3. ``lockstep restore start``: back to the saved state;
4. the verdict: crm_mon on every node shows the original placement and the
   CIB exactly as saved (nothing written to it since the save: no transition); Corosync logged no
   token loss or membership change and Pacemaker no transition since the
   restore; the client's ARP entry points at p1 again, though it sent nothing.

``python -m lockstep.lab.demo --help`` lists its options (another token, a
longer watch). It exits non-zero when the verdict is bad; the lab is
always taken down.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from lockstep.group import load_group
from lockstep.lab.client import client_mac, ping_argv
from lockstep.lab.lab import lab_cluster
from lockstep.lab.observe import cluster_view, placement
from lockstep.lab.topology import client_netns
from lockstep.lab.verify import LAST_RESTORE, Since, verify_lab

__all__ = ["main"]

console = Console()
LAB = "lsdemo"
PRIMARY, STANDBY = "p1", "s1"
FAILOVER_S = 120.0  # bound on Pacemaker's failover under TCG (15-25 s here)
POLL_S = 2.0  # between looks at the cluster (each look runs crm_mon in every guest)


def _lockstep() -> list[str]:
    exe = Path(sys.executable).parent / "lockstep"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lockstep.cli.main"]


def _run(args: list[str], *, json_out: bool = False, check: bool = True) -> Any:
    """Run ``lockstep ARGS`` as a user would, echoing the command."""
    console.print(f"\n[bold cyan]$ lockstep {' '.join(args)}[/]")
    cmd = _lockstep() + args
    if json_out:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            console.print(proc.stderr.strip())
            if check:
                raise SystemExit(proc.returncode)
            return None
        return json.loads(proc.stdout)
    rc = subprocess.run(cmd, check=False).returncode
    if check and rc != 0:
        raise SystemExit(rc)
    return None


def _shell(argv: list[str]) -> None:
    """Run a plain command (not lockstep's) as a user would, echoing it."""
    console.print(f"\n[bold cyan]$ {' '.join(argv)}[/]")
    subprocess.run(argv, check=False)


def _say(text: str) -> None:
    console.print(f"[bold]{text}[/]")


def _report_line(d: dict[str, Any]) -> str:
    skews = []
    if d.get("pause_skew_ms") is not None:
        skews.append(f"pause skew {d['pause_skew_ms']:.3f} ms")
    skews.append(f"resume skew {d['resume_skew_ms']:.3f} ms")
    if d.get("switch_over_ms") is not None:
        skews.append(f"switch-over {d['switch_over_ms']:.1f} ms")
    return (
        f"{d['operation']} {d['state']!r} of {len(d['vms'])} VMs in {d['duration_s']:.2f} s: "
        + ", ".join(skews)
        + f"; frames held {d['frames_held']}, delivered {d['frames_delivered']},"
        f" dropped {d['frames_dropped']}"
    )


def _view() -> dict[str, Any]:
    return asyncio.run(cluster_view(LAB))


def _where(view: dict[str, Any], vm: str) -> str:
    """One line: what crm_mon on ``vm`` says (online nodes, where vip and web run, CIB version)."""
    node = view["nodes"].get(vm, {})
    if "error" in node:
        return f"{vm}: {node['error']}"
    online = ", ".join(n for n, up in node.get("nodes", {}).items() if up) or "none"
    res = ", ".join(
        f"{r} {v['role']} on {','.join(v['on']) or '-'}" for r, v in node["resources"].items()
    )
    return f"crm_mon on {vm}: online {online}; {res}; CIB {node.get('cib')}"


def _cibs(view: dict[str, Any]) -> dict[str, str | None]:
    return {vm: node.get("cib") for vm, node in view["nodes"].items()}


def _listed(cibs: dict[str, str | None]) -> str:
    return ", ".join(f"{vm} {version}" for vm, version in cibs.items())


def _holds(view: dict[str, Any], vm: str) -> bool:
    """Every node that answers puts the whole resource group, started, on ``vm``."""
    nodes = [n for n in view["nodes"].values() if "error" not in n]
    groups = [n["resources"].values() for n in nodes]
    return bool(nodes) and all(
        g and all(r["on"] == [vm] and r["role"] == "Started" for r in g) for g in groups
    )


def _wait_view(done: Callable[[dict[str, Any]], bool], bound: float) -> tuple[dict[str, Any], bool]:
    """Look at the cluster every POLL_S until ``done`` or ``bound`` seconds pass."""
    deadline = time.monotonic() + bound
    while True:
        view = _view()
        ok = done(view)
        if ok or time.monotonic() > deadline:
            return view, ok
        time.sleep(POLL_S)


def _ping(vip: str) -> None:
    _shell(["ip", "netns", "exec", client_netns(LAB), *ping_argv(vip)])


def _arp(vip: str) -> str | None:
    _shell(["ip", "-n", client_netns(LAB), "neigh", "show", vip])
    return asyncio.run(client_mac(LAB, vip))


def demo(work: Path, token_ms: int, settle_s: float) -> bool:
    """Run the demo in ``work`` (the group file goes there); return the verdict."""
    group = ["-g", str(work / "lockstep.toml")]
    _say(
        f"1. The lab: 2 hosts, Corosync 3 + Pacemaker on {PRIMARY} (h1) and {STANDBY} (h2),"
        f" token {token_ms} ms; a virtual address and a web service as one resource group"
    )
    up = ["lab", "up", "--name", LAB, "--cluster", "pacemaker", "--vms", "2"]
    _run([*group, *up, "--token", str(token_ms)])
    _run([*group, "status"])
    _run([*group, "check"])
    vip = lab_cluster(LAB).service().vip
    spec = load_group(work / "lockstep.toml")
    macs = {vm: spec.vms[vm].nics[0].mac for vm in (PRIMARY, STANDBY)}
    _run(["lab", "exec", "--name", LAB, PRIMARY, "--", "crm_mon -1 | tail -n 6"], check=False)
    before = _view()
    console.print(_where(before, PRIMARY))
    _say(f"   the client outside the group talks to {vip}:")
    _ping(vip)
    arp_before = _arp(vip)

    _say("2. Save the whole cluster as one state, every VM paused at the same instant")
    saved = _run([*group, "save", "start", "--json"], json_out=True)
    console.print(_report_line(saved))
    saved_cibs = _cibs(_view())

    _say(f"3. A failure: {PRIMARY}, which holds the address, is killed; Pacemaker must move it")
    killed = time.monotonic()
    _run([*group, "fault", "kill", PRIMARY])
    failed_over, took_over = _wait_view(lambda v: _holds(v, STANDBY), FAILOVER_S)
    console.print(_where(failed_over, STANDBY) + f" ({time.monotonic() - killed:.0f} s after)")
    _ping(vip)
    arp_failed_over = _arp(vip)

    _say("4. Restore the saved state: every VM resumes at the same instant")
    restored = _run([*group, "restore", "start", "--json"], json_out=True)
    console.print(_report_line(restored))
    arp_after = _arp(vip)  # the client sent nothing since the restore
    console.print(f"   (watching {settle_s:.0f} s: Corosync or Pacemaker would notice by then)")
    time.sleep(settle_s)
    _run(["lab", "verify", "--name", LAB, "--since", LAST_RESTORE], check=False)
    after = verify_lab(LAB, Since(LAST_RESTORE)).to_json()
    for vm in (PRIMARY, STANDBY):
        _run(["lab", "exec", "--name", LAB, vm, "--", "crm_mon -1 | tail -n 6"], check=False)
    view = _view()
    for vm in (PRIMARY, STANDBY):
        console.print(_where(view, vm))

    quiet = ("token_losses", "membership_changes", "pacemaker_transitions", "resource_moves")
    checks = {
        f"the client reached {vip} at {PRIMARY} ({macs[PRIMARY]}) before the save": arp_before
        == macs[PRIMARY],
        f"Pacemaker moved the address to {STANDBY} when {PRIMARY} failed, and the client"
        f" followed it": took_over and arp_failed_over == macs[STANDBY],
        f"crm_mon on every node after the restore: both online, the group on {PRIMARY}": all(
            node.get("nodes") == {PRIMARY: True, STANDBY: True} for node in view["nodes"].values()
        )
        and _holds(view, PRIMARY)
        and placement(view) == {"vip": [PRIMARY], "web": [PRIMARY]},
        f"the CIB on every node is the saved one ({_listed(saved_cibs)}):"
        " nothing written to it since the save": None not in saved_cibs.values()
        and _cibs(view) == saved_cibs,
        "since the restore, no Corosync token loss or membership change, no Pacemaker"
        " transition or resource move": all(after[k] == 0 for k in quiet),
        f"the client's ARP entry points at {PRIMARY} again right after the restore": arp_after
        == macs[PRIMARY],
        "no stream packet lost or duplicated, no frame dropped by the freeze": after["lost"] == 0
        and after["duplicated"] == 0
        and saved["frames_dropped"] == 0
        and restored["frames_dropped"] == 0,
    }
    console.print()
    for what, ok in checks.items():
        console.print(f"  {'[green]✓' if ok else '[red]✗'}[/] {what}", highlight=False)
    verdict = all(checks.values())
    skew = max(saved["pause_skew_ms"], saved["resume_skew_ms"], restored["resume_skew_ms"])
    console.print(
        f"\n[bold]verdict: {'PASS' if verdict else 'FAIL'}[/] — the cluster was restored"
        f" {'without noticing' if verdict else 'but noticed'}; worst skew {skew:.3f} ms,"
        f" restore took {restored['duration_s']:.2f} s"
    )
    return verdict


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lockstep.lab.demo",
        description=(__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument(
        "--token",
        type=int,
        default=3000,
        help="Corosync token timeout in ms [default: 3000, Corosync's own; 1000 holds here"
        " only on a quiet machine, see README]",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=15.0,
        help="seconds watched after the restore [default: 15, many tokens]",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the demo; always take the lab down; exit 1 on a bad verdict."""
    args = _args(argv)
    if os.geteuid() != 0:
        console.print("[red]make demo needs root (namespaces, taps, QEMU)[/]")
        raise SystemExit(1)
    work = Path(tempfile.mkdtemp(prefix="lockstep-demo-"))
    ok = False
    try:
        ok = demo(work, args.token, args.settle)
    finally:
        console.print()
        _run(["lab", "down", "--name", LAB], check=False)
        shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
