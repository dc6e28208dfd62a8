"""``lockstep lab``: the embedded lab (hosts as namespaces, VMs in pairs) for trying lockstep."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import click
from rich.table import Table

from lockstep.cli.output import console, emit, error, stderr
from lockstep.errors import LockstepError
from lockstep.group import group_file_path
from lockstep.lab.access import command_line, find_guest, follow, tail_start
from lockstep.lab.clusterconf import ClusterKind, ClusterSpec
from lockstep.lab.image import build_image
from lockstep.lab.lab import LabOptions, bring_up, take_down
from lockstep.lab.observe import verify_with_view
from lockstep.lab.verify import parse_since
from lockstep.units import parse_duration

__all__ = ["lab"]


def _say(line: str) -> None:
    stderr.print(f"[dim]lab:[/] {line}", highlight=False)


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except LockstepError as exc:
        stderr.print(f"[bold red]lockstep:[/] {exc}", highlight=False)
        sys.exit(1)


def _offsets(values: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for v in values:
        host, sep, secs = v.partition("=")
        try:
            out[host] = float(secs)
        except ValueError:
            sep = ""
        if not sep or not host:
            raise click.BadParameter(f"{v!r} is not HOST=SECONDS (for example h2=2.5)")
    return out


def _starts(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        vm, sep, command = v.partition("=")
        if not sep or not vm or not command.strip():
            raise click.BadParameter(f"{v!r} is not VM=COMMAND (for example p1='keepalived -n')")
        out[vm] = command
    return out


_TIMINGS = {
    "token_ms": ("--token", ClusterKind.PACEMAKER),
    "consensus_ms": ("--consensus", ClusterKind.PACEMAKER),
    "knet_ping_interval_ms": ("--knet-ping-interval", ClusterKind.PACEMAKER),
    "knet_ping_timeout_ms": ("--knet-ping-timeout", ClusterKind.PACEMAKER),
    "advert_ms": ("--advert", ClusterKind.KEEPALIVED),
}


def _cluster_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``lab up``'s middleware options (the kind, then its timings in ms)."""
    helps = {
        "token_ms": "Corosync token timeout in ms [default: 3000, Corosync's own].",
        "consensus_ms": "Corosync consensus timeout in ms [default: 1.2 x token].",
        "knet_ping_interval_ms": "knet ping interval in ms [default: token / 4].",
        "knet_ping_timeout_ms": "knet ping timeout in ms [default: token / 2].",
        "advert_ms": "VRRP advert interval in ms, a multiple of 10 [default: 1000].",
    }
    for dest, (flag, _) in reversed(_TIMINGS.items()):
        option = click.option(
            flag, dest, type=click.IntRange(min=1), metavar="MS", help=helps[dest]
        )
        command = option(command)
    return click.option(
        "--cluster",
        "kind",
        type=click.Choice([k.value for k in ClusterKind]),
        default=ClusterKind.AGENT.value,
        show_default=True,
        help="What the guests run as their cluster (see above).",
    )(command)


def _cluster_spec(kind: str, **timings: int | None) -> ClusterSpec:
    """The ClusterSpec of ``lab up``'s options; a timing of another kind is refused."""
    for dest, value in timings.items():
        flag, owner = _TIMINGS[dest]
        if value is not None and kind != owner:
            raise click.BadParameter(f"{flag} is for --cluster {owner.value}", param_hint=flag)
    return ClusterSpec(kind=kind, **timings)


@click.group()
def lab() -> None:
    """The embedded lab: hosts as network namespaces, VMs in primary/standby pairs.

    Needs root. Nothing of the lab is routed to the machine's network.
    """


@lab.command("up")
@click.option(
    "--name", default="lslab", show_default=True, help="Lab name (prefix of its objects)."
)
@click.option("--hosts", default=2, show_default=True, help="Number of hosts (namespaces).")
@click.option(
    "--vms", default=4, show_default=True, help="Number of VMs (pairs of primary/standby)."
)
@click.option(
    "--memory",
    default=None,
    help="Memory per VM [default: 256M; 512M with --cluster pacemaker, its least].",
)
@click.option("--heartbeat", default="1s", show_default=True, help="Cluster heartbeat interval.")
@click.option("--timeout", "fail_timeout", default="3s", show_default=True, help="Failure timeout.")
@click.option(
    "--stream-rate",
    default=LabOptions.stream_rate,
    show_default=True,
    type=click.IntRange(min=0),
    help="Stream packets per second from every guest to every other guest (0: none); under"
    " TCG every packet costs host CPU (python -m bench.idle measures it).",
)
@click.option(
    "--disks",
    default=LabOptions.disks,
    show_default=True,
    type=click.IntRange(1, 8),
    help="Disks per VM: the root disk, then empty data disks (/dev/vdb...); states keep each.",
)
@click.option(
    "--driver",
    default=LabOptions.driver,
    show_default=True,
    type=click.Choice(["qemu", "libvirt", "mixed"]),
    help="qemu: the execds start the VMs' QEMU; libvirt: the VMs are domains of a libvirtd"
    " the lab starts on each host, for virsh too (needs libvirt-python: pip install"
    " 'lockstep[libvirt]'); mixed: the standbys are domains, the primaries QEMU VMs.",
)
@click.option(
    "--clock-offset",
    "offsets",
    multiple=True,
    metavar="HOST=SECONDS",
    help="Make a host's execd clock wrong (tests sync).",
)
@click.option(
    "--package",
    "packages",
    multiple=True,
    metavar="PKG",
    help="Extra Debian package for the guest image.",
)
@click.option(
    "--start",
    "starts",
    multiple=True,
    metavar="VM=COMMAND",
    help="A shell command VM runs at boot, beside the lab's agent (e.g. your cluster software).",
)
@_cluster_options
@click.pass_context
def lab_up(
    ctx: click.Context, /, name: str, hosts: int, vms: int, memory: str | None, heartbeat: str,
    fail_timeout: str, stream_rate: int, disks: int, driver: str, offsets: tuple[str, ...],
    packages: tuple[str, ...], starts: tuple[str, ...], **cluster: Any,
) -> None:  # fmt: skip
    """Bring the lab up and write its group file (./lockstep.toml unless -g).

    \b
    --cluster agent       lockstep's cluster agent only (heartbeats and streams)
    --cluster pacemaker   also Corosync 3 (knet) + Pacemaker: one cluster of all
                          the VMs (two_node with 2), a resource group of a virtual
                          address (IPaddr2, .100 of the VM subnet) and an HTTP
                          service on it; no fencing in the lab
    --cluster keepalived  also keepalived: one VRRPv3 pair per primary/standby
                          pair, each with a virtual address (.100, .101, ...)

    lockstep writes the middleware's configuration and waits until it has
    formed (Pacemaker's group started, or every pair's primary MASTER).
    """  # noqa: D301 (\b is click's mark for a paragraph kept as written)
    parent = ctx.parent.parent if ctx.parent else None
    group_opt = parent.params.get("group_file") if parent else None
    spec = _cluster_spec(**cluster)
    if memory is None:
        memory = "512M" if spec.kind == ClusterKind.PACEMAKER else "256M"
    try:
        opts = LabOptions(
            name=name, hosts=hosts, vms=vms, memory=memory,
            heartbeat=parse_duration(heartbeat), timeout=parse_duration(fail_timeout),
            stream_rate=stream_rate, disks=disks,
            driver=cast(Literal["qemu", "libvirt", "mixed"], driver),  # click's Choice
            clock_offsets=_offsets(offsets), extra_packages=packages,
            start=_starts(starts), group_file=group_file_path(group_opt), cluster=spec,
        )  # fmt: skip
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    group = _run(bring_up(opts, _say))
    console.print(
        f"lab [bold]{name}[/] is up: {len(group.hosts)} hosts, {len(group.vms)} VMs;"
        f" group file {opts.group_file}"
    )


@lab.command("down")
@click.option("--name", default="lslab", show_default=True, help="The lab to take down.")
def lab_down(name: str) -> None:
    """Remove everything the lab made (VMs, execds, namespaces, links, files)."""
    removed = _run(take_down(name, _say))
    console.print(f"lab {name} is down ({len(removed)} objects removed)")


@lab.command("image")
@click.option(
    "--package",
    "packages",
    multiple=True,
    metavar="PKG",
    help="Extra Debian package for the guest image (as `lab up --package`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def lab_image(packages: tuple[str, ...], as_json: bool) -> None:
    """Build the guest image (or find it in the cache) and print its paths."""
    try:
        image = build_image(list(packages), progress=_say)
    except LockstepError as exc:
        stderr.print(f"[bold red]lockstep:[/] {exc}", highlight=False)
        sys.exit(1)
    data = {k: str(v) for k, v in vars(image).items()}
    emit(
        data,
        as_json,
        lambda d: console.print(f"guest image {d['digest'][:16]}: {Path(d['rootfs']).parent}"),
    )


@lab.command("verify")
@click.option("--name", default="lslab", show_default=True, help="Lab name.")
@click.option(
    "--since",
    metavar="last-restore|TIME",
    help="Count only what each guest logged after its last restore, or from TIME on "
    "(unix seconds or ISO 8601, on the guests' clocks).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--check", is_flag=True, help="Exit 1 when the guests noticed anything.")
def lab_verify(name: str, since: str | None, as_json: bool, check: bool) -> None:
    """Show what the guests' cluster agents noticed: role changes, split brain, packets.

    Every lab guest runs a cluster agent (primary/standby heartbeats with its
    pair peer, and sequence-numbered UDP streams to every other guest) that
    logs what it notices on its serial console. This sums those logs: nothing
    is measured from outside the guests.

    \b
    --since last-restore  only what each guest logged after its last restore
                          (a restore shows in a log when the guest wrote a line
                          between the save and the restore; not after save --stop)
    --since TIME          only lines from TIME on, unix seconds or ISO 8601 (local
                          time without a zone), compared with the GUESTS' clocks:
                          they stand still while a VM is paused and go back to
                          the saved time on restore
    (no --since)          everything since the lab came up

    \b
    JSON: {"lab", "since": {"kind", "t"}, "ok", "transitions", "split_brain",
    "lost", "duplicated", "reordered", "received", "heartbeat_misses",
    "pairs": [{"pair", "primary", "standby", "transitions", "split_brain",
    "heartbeat_misses", "roles_now"}],
    "streams": [{"from", "to", "received", "lost", "duplicated", "reordered",
    "gaps", "last_seq"}],
    "vms": [{"name", "host", "role", "role_now", "lines", "replayed", "boots",
    "restores", "missing_lines", "transitions": [{"t", "from", "to", "why",
    "silent_s"}], "split_brain", "heartbeat_misses", "heartbeat_gap_max_s",
    "first_t", "last_t"}], "warnings": [...],
    "cluster", "token_warnings", "token_losses", "membership_changes",
    "knet_link_downs", "pacemaker_transitions", "resource_moves",
    "vrrp_changes", "middleware": {KIND: [{"vm", "line", ...}]}, "view"}

    "transitions" counts takeovers; "split_brain" the split-brain episodes each
    guest saw begin; "lost", "duplicated" and "reordered" the stream packets the
    receiving guests counted so.

    With --cluster pacemaker or keepalived, the middleware's own view too: from
    its logs (counted from when it had formed, or in the window above), token
    warnings and losses, new memberships (once per ring id), knet links down,
    Pacemaker transitions, resources placed anew (Start, Move, Migrate) and VRRP
    state changes, each with its lines in "middleware"; and, asked now in
    every guest, "view": crm_mon's nodes, DC and resources, or who holds each
    virtual address. "ok" is true when the agents' five counts and the
    middleware's losses, memberships, transitions, moves and VRRP changes are
    all 0 and every guest's agent logged in the window.
    """  # noqa: D301 (\b is click's mark for a paragraph kept as written)
    try:
        window = parse_since(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from exc
    report = _run(verify_with_view(name, window))
    emit(report.to_json(), as_json, _render_verify)
    if check and not report.ok:
        sys.exit(1)


def _render_verify(d: dict[str, Any]) -> None:
    pairs = Table(title=f"lab {d['lab']}: pairs", title_justify="left")
    for col in ("pair", "roles now", "takeovers", "split brain", "heartbeat misses"):
        pairs.add_column(col, justify="left" if col in ("pair", "roles now") else "right")
    for p in d["pairs"]:
        roles = ", ".join(f"{vm} {role or '?'}" for vm, role in p["roles_now"].items())
        pairs.add_row(
            p["pair"],
            roles,
            _flag(p["transitions"]),
            _flag(p["split_brain"]),
            str(p["heartbeat_misses"]),
        )
    console.print(pairs)
    streams = Table(title="streams", title_justify="left")
    for col in ("from", "to", "received", "lost", "duplicated", "reordered"):
        streams.add_column(col, justify="left" if col in ("from", "to") else "right")
    for s in d["streams"]:
        streams.add_row(
            s["from"],
            s["to"],
            str(s["received"]),
            _flag(s["lost"]),
            _flag(s["duplicated"]),
            _flag(s["reordered"]),
        )
    console.print(streams)
    if d["cluster"] != ClusterKind.AGENT.value:
        _render_middleware(d)
    for warning in d["warnings"]:
        stderr.print(f"[yellow]warning:[/] {warning}", highlight=False)
    verdict = "[bold green]nothing noticed[/]" if d["ok"] else "[bold red]noticed[/]"
    middleware = ""
    if d["cluster"] != ClusterKind.AGENT.value:
        middleware = (
            f"; {d['cluster']}: {d['token_losses']} token losses, {d['membership_changes']}"
            f" memberships, {d['pacemaker_transitions']} transitions, {d['resource_moves']}"
            f" resources placed anew, {d['vrrp_changes']} VRRP state changes"
        )
    console.print(
        f"{verdict}: {d['transitions']} takeovers, {d['split_brain']} split brain, "
        f"{d['lost']} lost, {d['duplicated']} duplicated, {d['reordered']} reordered "
        f"of {d['received']} packets received{middleware} (since: {d['since']['kind']})"
    )


def _render_middleware(d: dict[str, Any]) -> None:
    """The middleware's events (with their lines) and its view now."""
    events = Table(title=f"{d['cluster']}: what it logged", title_justify="left")
    events.add_column("event")
    events.add_column("count", justify="right")
    events.add_column("lines (vm: line)", overflow="fold")
    for kind, lines in d["middleware"].items():
        shown = "\n".join(f"{e['vm']}: {e['line']}" for e in lines[-5:])
        more = f"\n(and {len(lines) - 5} more)" if len(lines) > 5 else ""
        events.add_row(kind.replace("_", " "), _flag(d[kind]), shown + more)
    console.print(events)
    view = d.get("view") or {}
    for vm, node in view.get("nodes", {}).items():
        if "error" in node:
            console.print(f"crm_mon on {vm}: [yellow]{node['error']}[/]")
            continue
        online = ", ".join(n for n, up in node["nodes"].items() if up) or "none"
        where = ", ".join(
            f"{r} {v['role']}{' on ' + ', '.join(v['on']) if v['on'] else ''}"
            for r, v in node["resources"].items()
        )
        console.print(f"crm_mon on {vm}: online {online}; DC {node['dc'] or 'none'}; {where}")
    for instance, v in view.get("vips", {}).items():
        holders = ", ".join(v["holders"]) or "nobody"
        console.print(f"{instance} {v['vip']}: held by {holders} (MASTER by config: {v['master']})")


def _flag(n: int) -> str:
    return f"[bold red]{n}[/]" if n else "0"


# -- into the guests: exec and console --------------------------------------------

EXEC_FAILED = 255  # lockstep could not run the command (as ssh says so)


@lab.command(
    "exec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("--name", default="lslab", show_default=True, help="Lab name.")
@click.option(
    "--timeout",
    default="30s",
    show_default=True,
    help="Kill the command after this long (it then exits 124, as timeout(1)).",
)
@click.argument("vm")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def lab_exec(name: str, timeout: str, vm: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in guest VM; its output and exit status are passed through.

    The command runs with /bin/sh as root in the guest, through the guest's
    control channel (a serial port, not the network: the guest's NICs belong
    to the experiment and may be frozen). Standard output and error come back
    together, once the command has ended; nothing is read from standard input.

    \b
    One argument is a shell command line as it is (pipes, ';' and $VARS work);
    several are run as they are, one word each (quoted for you):
      lockstep lab exec p1 -- ip -br addr
      lockstep lab exec p1 -- 'ip addr add 10.124.0.200/24 dev eth0 && ip -br addr'
      lockstep lab exec s1 -- arping -U -c 2 -I eth0 10.124.0.200

    Exit status: the command's own; 124 if it ran past --timeout; 255 if
    lockstep could not run it (no such lab or VM, the guest did not answer).
    """  # noqa: D301 (\b is click's mark for a paragraph kept as written)
    try:
        seconds = parse_duration(timeout)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--timeout") from exc
    if command[:1] == ("--",):  # click keeps the "--" that follows VM
        command = command[1:]
    if not command:
        raise click.UsageError("no command given after VM")
    try:
        guest = find_guest(name, vm)
        rc, out = asyncio.run(guest.run(command_line(command), seconds))
    except LockstepError as exc:
        error(str(exc))
        sys.exit(EXEC_FAILED)
    sys.stdout.write(out)
    sys.stdout.flush()
    sys.exit(rc)


@lab.command("console")
@click.option("--name", default="lslab", show_default=True, help="Lab name.")
@click.option(
    "--from-start", is_flag=True, help="Show the whole log first (the guest's every boot)."
)
@click.option(
    "-n",
    "--lines",
    default=10,
    show_default=True,
    type=click.IntRange(min=0),
    help="Show the log's last N lines first (as tail -n); 0: only what comes next.",
)
@click.argument("vm")
def lab_console(name: str, from_start: bool, lines: int, vm: str) -> None:
    """Follow guest VM's serial console live, as tail -F does, until Ctrl-C.

    The console is the guest's first serial port, which QEMU appends to a log
    that lives on across restores and restarts: after a restore the guest
    goes on from the saved point, so lines it wrote after the save are
    followed by what the restored guest writes. The console only shows; to
    type commands, use `lockstep lab exec`.

    \b
      lockstep lab console p1              # the last 10 lines, then live
      lockstep lab console --from-start s1 # the whole log, then live
    """  # noqa: D301 (\b is click's mark for a paragraph kept as written)
    try:
        guest = find_guest(name, vm)
        path = guest.console
        start = 0 if from_start or not path.exists() else tail_start(path, lines)
    except (LockstepError, OSError) as exc:
        error(str(exc))
        sys.exit(1)
    out = sys.stdout.buffer
    try:
        for chunk in follow(path, start=start, stop=lambda: not guest.lab_is_up()):
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        return
    except OSError as exc:
        error(f"cannot read {path}: {exc.strerror}")
        sys.exit(1)
    stderr.print(f"[dim]lab:[/] lab {name} is down; the console of {vm} ended", highlight=False)
