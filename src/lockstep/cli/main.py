"""The ``lockstep`` command: save and restore a group of VMs across hosts, in step.

Every command reads the group file (``-g``, ``$LOCKSTEP_GROUP`` or
``./lockstep.toml``), talks to every host's execd at once over mutual TLS, and
reports as tables, or as one JSON document with ``--json``. Errors are one
sentence on stderr and a non-zero exit status; never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from lockstep.caller.clock import SyncPolicy
from lockstep.caller.orchestrator import GroupCaller, HostResult
from lockstep.caller.report import OperationReport, clock_lines
from lockstep.cli.certs import certs
from lockstep.cli.common import host_errors, json_option, with_caller
from lockstep.cli.fault import fault
from lockstep.cli.lab import lab
from lockstep.cli.output import console, emit, error, operation_progress, render_report
from lockstep.cli.run import run
from lockstep.errors import LockstepError
from lockstep.group import group_file_path
from lockstep.net import pcap
from lockstep.net.frames import describe, mac_text

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-g",
    "--group",
    "group_file",
    metavar="GROUP.toml",
    help="The group file (default: $LOCKSTEP_GROUP, else ./lockstep.toml).",
)
@click.version_option(package_name="lockstep")
@click.pass_context
def main(ctx: click.Context, group_file: str | None) -> None:
    """Save and restore a group of QEMU/KVM VMs spread over hosts as one state.

    Every VM pauses at the same instant and resumes at the same instant (the
    skew is measured and reported), frames in flight are held outside the VMs
    and delivered after resume, and disks are qcow2 layers, never copied.

    \b
    Try it on the embedded lab (root):
      lockstep lab up            # 2 hosts, 4 VMs, writes ./lockstep.toml
      lockstep save start        # one consistent state of the whole group
      lockstep restore start     # back to it; the cluster never notices
      lockstep lab down
    """  # noqa: D301 (\b is click's mark for a paragraph kept as written)
    ctx.ensure_object(dict)
    ctx.obj["group_path"] = group_file_path(group_file)


main.add_command(certs)
main.add_command(fault)
main.add_command(lab)
main.add_command(run)


@main.command()
@json_option
@with_caller
async def up(caller: GroupCaller, as_json: bool) -> None:
    """Start every VM of the group that is not running."""
    result = await caller.up()
    data = {h: [vars(s) for s in vms] for h, vms in result.items()}
    emit(data, as_json, lambda d: _render_status({h: HostResult(h, v) for h, v in result.items()}))


@main.command()
@json_option
@with_caller
async def down(caller: GroupCaller, as_json: bool) -> None:
    """Stop every VM of the group (states are kept)."""
    result = await caller.down()
    emit(
        {h: [vars(s) for s in vms] for h, vms in result.items()},
        as_json,
        lambda d: console.print("all VMs of the group are stopped"),
    )


def _render_status(results: dict[str, HostResult[Any]]) -> None:
    table = Table(title="VMs", title_justify="left")
    for col in ("host", "VM", "runstate", "pid", "layer", "from state", "libvirt domain"):
        table.add_column(col)
    for host, r in sorted(results.items()):
        if r.error is not None:
            table.add_row(host, "-", f"[red]{r.error}[/]", "", "", "", "")
            continue
        for s in r.value or []:
            domain = f"{s.domain} ({s.uuid})" if s.domain else "-"
            table.add_row(
                host, s.name, s.runstate, str(s.pid or "-"), s.layer or "-", s.state or "-", domain
            )
    console.print(table)


@main.command()
@json_option
@with_caller
async def status(caller: GroupCaller, as_json: bool) -> None:
    """Show every host's VMs: runstate, pid, active layers, state they came from, libvirt domain.

    With --json a libvirt domain's live XML too (as `virsh dumpxml` shows it).
    """
    results = await caller.status()
    data = {
        "hosts": {h: [vars(s) for s in (r.value or [])] for h, r in results.items()},
        "errors": host_errors(results),
    }
    emit(data, as_json, lambda _d: _render_status(results))
    if data["errors"]:
        sys.exit(1)


def sync_options(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Add ``--sync-target`` and ``--sync-limit`` to a command body (the caller's sync policy)."""

    @functools.wraps(fn)
    async def body(caller: GroupCaller, /, sync_target: float, sync_limit: float, **kw: Any) -> Any:
        try:
            caller.sync_policy = SyncPolicy(target=sync_target / 1000, limit=sync_limit)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
        return await fn(caller, **kw)

    default = SyncPolicy()
    body = click.option(
        "--sync-limit",
        type=float,
        default=default.limit,
        show_default=True,
        metavar="S",
        help="Probe each host's clock for at most this long.",
    )(body)
    return click.option(
        "--sync-target",
        type=float,
        default=default.target * 1000,
        show_default=True,
        metavar="MS",
        help="Probe each host's clock until its error bound is this small (or the limit).",
    )(body)


@main.command()
@json_option
@with_caller
@sync_options
async def check(caller: GroupCaller, as_json: bool) -> None:
    """Measure each host's clock offset and delay, and the skew they predict.

    Each host is probed over a light UDP path beside gRPC (keyed over mutual
    TLS) until the error bound reaches --sync-target or --sync-limit is spent;
    where that path is blocked, over gRPC (the "path" column says which, and
    why). No host clock is changed: lockstep converts between clocks itself.
    """
    est, _ = await caller.check()
    lines, skew = clock_lines(est)
    data = {"hosts": {c.host: vars(c) for c in lines}, "predicted_skew_ms": skew}

    def render(d: dict[str, Any]) -> None:
        table = Table(title="clocks", title_justify="left")
        for col in ("host", "offset", "delay", "error bound", "samples", "path", "probing"):
            table.add_column(col, justify="left" if col in ("host", "path") else "right")
        for c in lines:
            table.add_row(
                c.host,
                f"{c.offset_ms:+.3f} ms",
                f"{c.delay_ms:.3f} ms",
                f"±{c.error_bound_ms:.3f} ms",
                str(c.samples),
                c.path,
                f"{c.sync_s:.2f} s",
            )
        console.print(table)
        for c in lines:
            if c.note:
                console.print(f"  {c.host}: {c.note}", markup=False)
            refused = {k: v for k, v in c.refused.items() if v}
            if refused:
                said = ", ".join(f"{v} {k}" for k, v in sorted(refused.items()))
                console.print(f"  {c.host}: its probe path has ignored {said} probes", markup=False)
        console.print(f"predicted skew ≤ [bold]{d['predicted_skew_ms']:.3f} ms[/]")

    emit(data, as_json, render)


def _report(report: OperationReport, as_json: bool) -> None:
    emit(report.to_json(), as_json, lambda _d: render_report(report))


force_option = click.option(
    "--force", is_flag=True, help="Go on even if clock sync predicts more skew than the budget."
)
budget_option = click.option(
    "--skew-budget",
    type=float,
    default=2.0,
    show_default=True,
    metavar="MS",
    help="Refuse to start if clock error alone could cause more skew than this.",
)


@main.command()
@click.argument("name")
@click.option("--stop", is_flag=True, help="Destroy the VMs after saving (the paper's behaviour).")
@force_option
@budget_option
@json_option
@with_caller
@sync_options
async def save(
    caller: GroupCaller, name: str, stop: bool, force: bool, skew_budget: float, as_json: bool
) -> None:
    """Save the whole group as state NAME, every VM paused at one instant.

    By default every VM then resumes at one common instant on a new disk
    layer and gets the frames held for it while it was paused.
    """
    caller.skew_budget = skew_budget / 1000
    with operation_progress(sys.stderr.isatty()) as progress:
        report = await caller.save(name, stop=stop, force=force, progress=progress)
    _report(report, as_json)


@main.command()
@click.argument("name")
@click.option(
    "--verify",
    is_flag=True,
    help="Also check the hash of the guests' saved RAM (reads all of it: about a second per"
    " GiB from the page cache, more from disk). Sizes, device state and frames are always checked.",
)
@force_option
@budget_option
@json_option
@with_caller
@sync_options
async def restore(
    caller: GroupCaller, name: str, verify: bool, force: bool, skew_budget: float, as_json: bool
) -> None:
    """Restore the whole group to state NAME: new VMs, switched to at one instant.

    Every file of the state is checked on every host first. The new VMs are
    prepared beside the running ones; only when every host is ready do the
    running VMs pause and the new ones resume, at one instant. A restore that
    cannot finish leaves the group as it was. The state stays as it was: it
    can be restored again and again.
    """
    caller.skew_budget = skew_budget / 1000
    with operation_progress(sys.stderr.isatty()) as progress:
        report = await caller.restore(name, force=force, verify=verify, progress=progress)
    _report(report, as_json)


@main.command()
@json_option
@with_caller
async def states(caller: GroupCaller, as_json: bool) -> None:
    """List the states of the group, with the hosts that hold them."""
    results = await caller.states()
    merged: dict[str, dict[str, Any]] = {}
    for host, r in sorted(results.items()):
        for s in r.value or []:
            entry = merged.setdefault(
                s.name,
                {
                    "name": s.name,
                    "created_at": s.created_at,
                    "parent": s.parent,
                    "hosts": [],
                    "vms": [],
                    "size_bytes": 0,
                },
            )
            entry["hosts"].append(host)
            entry["vms"] += s.vms
            entry["size_bytes"] += s.size_bytes
    data = {
        "states": sorted(merged.values(), key=lambda e: e["created_at"]),
        "errors": host_errors(results),
    }

    def render(d: dict[str, Any]) -> None:
        table = Table(title="states", title_justify="left")
        for col in ("name", "created (UTC)", "parent", "hosts", "VMs", "size"):
            table.add_column(col)
        for e in d["states"]:
            table.add_row(
                e["name"], e["created_at"], e["parent"] or "-", ", ".join(e["hosts"]),
                ", ".join(sorted(e["vms"])), f"{e['size_bytes'] / 2**20:.1f} MiB",
            )  # fmt: skip
        console.print(table)
        for h, err in d["errors"].items():
            error(f"host {h}: {err}", prefix="warning")

    emit(data, as_json, render)


@main.group()
def state() -> None:
    """Inspect or delete one state."""


@state.command("show")
@click.argument("name")
@json_option
@with_caller
async def state_show(caller: GroupCaller, name: str, as_json: bool) -> None:
    """Show state NAME's manifest on every host (VMs, layers, files, checksums)."""
    results = await caller.state_show(name)
    errors = host_errors(results)
    if len(errors) == len(results):
        raise LockstepError(
            f"state {name!r} is on no host: " + "; ".join(f"{h}: {e}" for h, e in errors.items())
        )
    data = {
        "hosts": {h: r.value for h, r in results.items() if r.value is not None},
        "errors": errors,
    }
    emit(data, as_json, lambda d: console.print_json(data=d))


@state.command("delete")
@click.argument("name")
@json_option
@with_caller
async def state_delete(caller: GroupCaller, name: str, as_json: bool) -> None:
    """Delete state NAME on every host (refused while other states depend on it)."""
    removed = await caller.state_delete(name)
    emit(
        {"state": name, "removed_layers": removed},
        as_json,
        lambda _d: console.print(f"state {name!r} deleted"),
    )


@state.command("frames")
@click.argument("name")
@click.argument("vm")
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the frames as pcap to this file (NIC i > 0: FILE.nic<i>.pcap beside it).",
)
@json_option
@with_caller
async def state_frames(
    caller: GroupCaller, name: str, vm: str, out: Path | None, as_json: bool
) -> None:
    """List the frames state NAME holds for VM, or export them as pcap.

    These are the frames that were on their way to VM when the group paused:
    a restore delivers them to the VM, in this order, right after it resumes.
    With --out they are written as pcap files (tcpdump -r, wireshark).
    """
    files = await caller.state_frames(name, vm)
    written: list[str] = []
    frames: list[dict[str, Any]] = []
    for nic, (file, content) in enumerate(files):
        for i, (ts, frame) in enumerate(pcap.parse_pcap(content, f"{file} of state {name!r}")):
            frames.append(
                {
                    "nic": nic,
                    "index": i,
                    "time": ts,
                    "length": len(frame),
                    "src": mac_text(frame[6:12]),
                    "dst": mac_text(frame[0:6]),
                    "summary": describe(frame),
                }
            )
        if out is not None:
            path = out if nic == 0 else out.with_suffix(f".nic{nic}{out.suffix or '.pcap'}")
            try:
                path.write_bytes(content)
            except OSError as exc:
                raise LockstepError(f"cannot write {path}: {exc.strerror}") from exc
            written.append(str(path))
    data = {"state": name, "vm": vm, "nics": len(files), "frames": frames, "written": written}

    def render(d: dict[str, Any]) -> None:
        table = Table(title=f"frames held for {vm} in state {name}", title_justify="left")
        for col in ("nic", "#", "captured (UTC)", "bytes", "source", "destination", "what"):
            table.add_column(col)
        for f in d["frames"]:
            when = datetime.fromtimestamp(f["time"], UTC).strftime("%H:%M:%S.%f")
            table.add_row(
                str(f["nic"]), str(f["index"]), when, str(f["length"]), f["src"], f["dst"],
                f["summary"],
            )  # fmt: skip
        if d["frames"]:
            console.print(table)
        else:
            console.print(f"state {name!r} holds no frame for {vm}")
        for p in d["written"]:
            console.print(f"wrote {p}")

    emit(data, as_json, render)


if __name__ == "__main__":
    main()
