"""``lockstep lab``: the embedded lab (hosts as namespaces, VMs in pairs) for trying lockstep."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

from lockstep.cli.output import console, emit, stderr
from lockstep.errors import LockstepError
from lockstep.group import group_file_path
from lockstep.lab.image import build_image
from lockstep.lab.lab import LabOptions, bring_up, take_down
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
@click.option("--memory", default="256M", show_default=True, help="Memory per VM.")
@click.option("--heartbeat", default="1s", show_default=True, help="Cluster heartbeat interval.")
@click.option("--timeout", "fail_timeout", default="3s", show_default=True, help="Failure timeout.")
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
@click.pass_context
def lab_up(
    ctx: click.Context, name: str, hosts: int, vms: int, memory: str, heartbeat: str,
    fail_timeout: str, offsets: tuple[str, ...], packages: tuple[str, ...],
) -> None:  # fmt: skip
    """Bring the lab up and write its group file (./lockstep.toml unless -g)."""
    parent = ctx.parent.parent if ctx.parent else None
    group_opt = parent.params.get("group_file") if parent else None
    try:
        opts = LabOptions(
            name=name, hosts=hosts, vms=vms, memory=memory,
            heartbeat=parse_duration(heartbeat), timeout=parse_duration(fail_timeout),
            clock_offsets=_offsets(offsets), extra_packages=packages,
            group_file=group_file_path(group_opt),
        )  # fmt: skip
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    group = _run(bring_up(opts, _say))
    console.print(
        f"lab [bold]{name}[/] is up: {len(group.hosts)} hosts, {len(group.vms)} VMs;"
        f" group file {opts.group_file}"
    )


@lab.command("down")
@click.option("--name", default="lslab", show_default=True)
def lab_down(name: str) -> None:
    """Remove everything the lab made (VMs, execds, namespaces, links, files)."""
    removed = _run(take_down(name, _say))
    console.print(f"lab {name} is down ({len(removed)} objects removed)")


@lab.command("image")
@click.option("--package", "packages", multiple=True, metavar="PKG")
@click.option("--json", "as_json", is_flag=True)
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
