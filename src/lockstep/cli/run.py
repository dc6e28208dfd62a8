"""``lockstep run --from STATE CASE...``: every failure case on the group put back to one state."""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from lockstep.caller.connect import connected
from lockstep.cli.common import fail, group_of, json_option
from lockstep.cli.output import console, emit, stderr
from lockstep.errors import ConfigError, LockstepError
from lockstep.run.cases import discover
from lockstep.run.loop import RunOptions, run_cases
from lockstep.run.report import html_report
from lockstep.run.results import RunResult, junit_xml
from lockstep.units import parse_duration

__all__ = ["run"]


def _say(line: str) -> None:
    stderr.print(f"[dim]run:[/] {line}", highlight=False)


def _render(result: RunResult) -> None:
    table = Table(title=f"cases, each from state {result.state}", title_justify="left")
    for col in ("case", "status", "reset", "case time", "noticed since the restore"):
        table.add_column(col, justify="right" if col in ("reset", "case time") else "left")
    for c in result.cases:
        n = c.noticed or {}
        noticed = (
            ("ok" if n.get("ok") else "check failed")
            if "check" in n
            else ", ".join(
                f"{k} {n[k]}" for k in ("transitions", "split_brain", "lost") if n.get(k)
            )
            or ("nothing" if n else "-")
        )
        colour = "green" if c.passed else "red"
        table.add_row(
            c.name,
            f"[{colour}]{c.status}[/]",
            f"{c.reset_s:.2f} s",
            f"{c.duration_s:.2f} s",
            noticed,
        )
    console.print(table)
    for c in result.cases:
        if not c.passed:
            console.print(f"[red]{c.name}[/]: {c.message}", highlight=False)
    console.print(
        f"{result.count('passed')} of {len(result.cases)} passed in {result.duration_s:.1f} s"
        + ("; interrupted" if result.interrupted else "")
    )


@click.command("run")
@click.option(
    "--from", "state", required=True, metavar="STATE", help="The state every case starts from."
)
@click.argument("cases", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--timeout",
    default="10m",
    show_default=True,
    metavar="DUR",
    help="A case still running after this is stopped (with what it started): a timeout.",
)
@click.option(
    "--check",
    metavar="COMMAND",
    help="Outside the lab: a command run after every case, in its environment; its exit"
    " status and output say what the group noticed (on the lab, `lab verify` does).",
)
@click.option("--verify", is_flag=True, help="Before every case, also hash the state's saved RAM.")
@click.option(
    "--junit",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Write a JUnit XML report here.",
)
@click.option(
    "--html", type=click.Path(path_type=Path), metavar="FILE", help="Write the HTML report here."
)
@json_option
@click.pass_context
def run(
    ctx: click.Context,
    state: str,
    cases: tuple[Path, ...],
    timeout: str,
    check: str | None,
    verify: bool,
    junit: Path | None,
    html: Path | None,
    as_json: bool,
) -> None:
    """Run failure cases, each on the group put back to state STATE first.

    A CASE is an executable, or a folder of them (run in name order). Before
    every case the group is restored to STATE (a case never runs on a
    half-restored group: if the restore fails, the case is an error). The case
    runs with the group's details in its environment: LOCKSTEP_GROUP (so
    `lockstep` commands work in it), LOCKSTEP_FROM_STATE, LOCKSTEP_HOSTS,
    LOCKSTEP_VMS, LOCKSTEP_VM_<VM>_HOST and _MAC (on the lab also _IP). It
    passes when it exits 0. A line it prints as `action: TEXT` marks one of its
    actions on the report's timeline. Ctrl-C stops the case, puts the group
    back to STATE, and reports what ran.

    \b
    Exit status: 0 when every case passed, 1 when one did not, 130 when
    interrupted.

    \b
    Example, on the embedded lab:
      lockstep save origin
      lockstep run --from origin cases/ --junit report.xml --html report.html
    """  # noqa: D301 (\b is click's mark for a paragraph kept as written)
    group = group_of(ctx)
    group_file: Path = ctx.find_root().obj["group_path"]
    try:
        found = discover(list(cases))
        options = RunOptions(
            timeout=parse_duration(timeout),
            check=shlex.split(check) if check else (),
            verify=verify,
        )
    except (ConfigError, ValueError) as exc:
        fail(str(exc))

    async def body() -> RunResult:
        async with connected(group) as caller:
            return await run_cases(caller, group_file, state, found, options, _say)

    try:
        result = asyncio.run(body())
    except LockstepError as exc:
        fail(str(exc))
        raise AssertionError("unreachable") from exc
    except KeyboardInterrupt:
        stderr.print("[bold red]lockstep:[/] interrupted again: stopped at once", highlight=False)
        sys.exit(130)
    if junit is not None:
        junit.write_text(junit_xml(result))
    if html is not None:
        html.write_text(html_report(result))
    data: dict[str, Any] = result.to_json()
    emit(data, as_json, lambda _d: _render(result))
    sys.exit(130 if result.interrupted else 0 if result.passed else 1)
