"""``lockstep fault ...``: failures injected into the group on purpose, listed and healed.

Each command asks the execd of every host concerned at once
(:mod:`lockstep.caller.faults`) and prints what each host did, or with
``--json`` one document: ``fault`` (the new fault's id, "" for heal and list),
``kind``, ``hosts`` (per host: ``did``, its sentences, and ``held``, the faults
it holds afterwards) and ``errors`` (per host that failed: why).
"""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.table import Table

from lockstep.caller import faults
from lockstep.caller.orchestrator import GroupCaller
from lockstep.cli.common import host_errors, json_option, with_caller
from lockstep.cli.output import console, emit
from lockstep.execd.model import MAX_FREEZE_S, FaultAction, Freeze, Heal, Kill, ListFaults, Loss
from lockstep.units import parse_duration

__all__ = ["fault"]


@click.group()
def fault() -> None:
    """Inject failures into the group, as the cluster inside would meet them.

    \b
      lockstep fault kill p1            # p1's QEMU gets SIGKILL: a crashed node
      lockstep fault freeze p1 5        # p1 alone pauses 5 s, then runs on: a stalled node
      lockstep fault partition p1 s1    # frames between p1 and s1 dropped, both ways
      lockstep fault partition h1 h2    # a host means its VMs
      lockstep fault loss s1 30         # 30 % of the frames to and from s1 dropped
      lockstep fault list               # the faults each host holds
      lockstep fault heal               # every fault undone; a frozen VM runs again

    The next restore of the group undoes every fault: the new VMs run on
    fresh taps that no rule names, a frozen VM is replaced, a killed one
    comes back. Network faults are nftables rules (bridge family) on the
    hosts; delay is not offered, as the kernel lockstep was built on has no
    netem (delaying frames needs sch_netem, or a tc action this kernel lacks).
    """  # noqa: D301 (\b is click's mark for a paragraph kept as written)


async def _act(caller: GroupCaller, action: FaultAction, as_json: bool) -> None:
    """Inject ``action``, print what each host did; exit 1 if some host failed."""
    fid, results = await caller.fault(action)
    data: dict[str, Any] = {
        "fault": fid,
        "kind": faults.kind_of(action),
        "hosts": {
            h: {"did": r.value.did, "held": [vars(f) for f in r.value.held]}
            for h, r in results.items()
            if r.value is not None
        },
        "errors": host_errors(results),
    }
    emit(data, as_json, _render_list if isinstance(action, ListFaults) else _render_did)
    if data["errors"]:
        sys.exit(1)


def _render_did(data: dict[str, Any]) -> None:
    for host, reply in data["hosts"].items():
        for line in reply["did"]:
            console.print(f"{host}: {line}", markup=False, highlight=False)
    for host, why in data["errors"].items():
        console.print(f"[red]{host}: {why}[/]", highlight=False)
    if data["fault"] and data["kind"] != "kill":
        console.print(
            f"fault {data['fault']}: `lockstep fault heal {data['fault']}` or the next restore"
            " undoes it",
            markup=False,
            highlight=False,
        )


def _render_list(data: dict[str, Any]) -> None:
    table = Table(title="faults held", title_justify="left")
    for col in ("fault", "host", "VMs here", "what"):
        table.add_column(col)
    rows = sorted(
        (f["id"], host, ", ".join(f["vms"]) or "-", f["what"])
        for host, reply in data["hosts"].items()
        for f in reply["held"]
    )
    for row in rows:
        table.add_row(*row)
    if rows:
        console.print(table)
    else:
        console.print("no fault is held")
    for host, why in data["errors"].items():
        console.print(f"[red]{host}: {why}[/]", highlight=False)


@fault.command("kill")
@click.argument("vm")
@json_option
@with_caller
async def kill(caller: GroupCaller, vm: str, as_json: bool) -> None:
    """Kill VM's QEMU (SIGKILL), as a node that crashed.

    The VM shows as crashed in `lockstep status` until the next restore (or
    `lockstep up`, which boots it afresh).
    """
    await _act(caller, Kill(vm), as_json)


@fault.command("freeze")
@click.argument("vm")
@click.argument("seconds")
@json_option
@with_caller
async def freeze(caller: GroupCaller, vm: str, seconds: str, as_json: bool) -> None:
    """Pause VM alone for SECONDS (5, 2.5, 500ms), then let it run on, as a stalled node.

    Its guest does not see the time stand still, its peers see it go quiet.
    A restore in between replaces it (it is not resumed); `lockstep fault heal`
    resumes it at once. A save is refused while a VM is frozen.
    """
    try:
        duration = parse_duration(seconds)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="SECONDS") from exc
    if not 0 < duration <= MAX_FREEZE_S:
        raise click.BadParameter(
            f"a freeze lasts more than 0 and at most {MAX_FREEZE_S:g} s", param_hint="SECONDS"
        )
    await _act(caller, Freeze(vm, duration), as_json)


@fault.command("partition")
@click.argument("a")
@click.argument("b")
@json_option
@with_caller
async def partition(caller: GroupCaller, a: str, b: str, as_json: bool) -> None:
    """Cut the network between the VMs of A and those of B, both ways, until healed.

    A and B are comma-separated VM or host names (a host means its VMs; a
    name that is both means the VM). Every frame between a VM of A and a VM
    of B is dropped, unicast and broadcast, on one host or across hosts; the
    VMs on each side still reach each other and every VM outside the cut.
    Frames are told apart by their NICs' MACs in the group file (a libvirt
    domain's: in its live XML) and by port on one host: a VM that sends from
    another MAC (a VRRP virtual MAC) is cut only from the VMs of its own host.
    """
    await _act(caller, faults.partition(caller.group, a, b), as_json)


@fault.command("loss")
@click.argument("vm")
@click.argument("percent", type=click.IntRange(1, 100))
@json_option
@with_caller
async def loss(caller: GroupCaller, vm: str, percent: int, as_json: bool) -> None:
    """Drop PERCENT (1-100) of the frames to and from VM, at random, until healed.

    Each direction and each copy of a broadcast is drawn on its own; 100 cuts
    VM off. One loss per VM: heal it before setting another.
    """
    await _act(caller, Loss(vm, percent), as_json)


@fault.command("heal")
@click.argument("ids", nargs=-1, metavar="[FAULT]...")
@json_option
@with_caller
async def heal(caller: GroupCaller, ids: tuple[str, ...], as_json: bool) -> None:
    """Undo the faults named (by id, see `lockstep fault list`), or every one of the group.

    A frozen VM resumes at once and network rules are removed. A killed VM
    stays down: a restore or `lockstep up` brings it back.
    """
    await _act(caller, Heal(ids), as_json)


@fault.command("list")
@json_option
@with_caller
async def list_faults(caller: GroupCaller, as_json: bool) -> None:
    """List the faults every host holds: id, host, its VMs concerned, what it does there."""
    await _act(caller, ListFaults(), as_json)
