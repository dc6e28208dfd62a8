"""How the CLI speaks: rich tables for people, one JSON document for machines.

Every command that reports builds plain data first; :func:`emit` prints it as
JSON (``--json``) or hands it to a renderer that draws tables.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lockstep.caller.report import OperationReport

__all__ = ["console", "emit", "error", "operation_progress", "render_report", "stderr"]

console = Console()
stderr = Console(stderr=True)


def error(message: str, prefix: str = "lockstep") -> None:
    """Print one error sentence on stderr, exactly as given (no markup, one line in pipes)."""
    stderr.print(f"[bold red]{prefix}:[/] {escape(message)}", highlight=False, soft_wrap=True)


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print ``data`` as one JSON document, or through ``render`` for people."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        render(data)


def _instant(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S.%f")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def render_report(report: OperationReport) -> None:
    """Draw a save/restore report: one row per VM, then skews and totals."""
    title = f"{report.operation} {report.state!r}" + (" (--stop)" if report.stop else "")
    table = Table(title=title, title_justify="left")
    ignoring = any(v.frames_ignored for v in report.vms)
    clocks = any(v.clock_correction_ms is not None or v.clock_note for v in report.vms)
    numbers = (
        "memory",
        "held",
        "delivered",
        "dropped",
        *(("ignored",) if ignoring else ()),
        *(("guest clock",) if clocks else ()),
    )
    for col in ("VM", "host", "paused at (UTC)", "resumed at (UTC)", "path", *numbers):
        table.add_column(col, justify="right" if col in numbers else "left")
    for v in report.vms:
        table.add_row(
            v.name,
            v.host,
            _instant(v.paused_at),
            _instant(v.resumed_at),
            v.memory_path or "-",
            f"{v.memory_bytes / 2**20:.0f} MiB" if v.memory_bytes else "-",
            str(v.frames_held),
            str(v.frames_delivered),
            str(v.frames_dropped),
            *((str(v.frames_ignored),) if ignoring else ()),
            *((_clock(v.clock_correction_ms, v.clock_note),) if clocks else ()),
        )
    console.print(table)
    for v in report.vms:
        if v.memory_note:  # why the standard path, or how the RAM image was kept
            console.print(f"  {v.name}: {v.memory_path} memory path: {v.memory_note}", markup=False)
    for c in report.clocks:
        if c.note:  # why its clock was probed over gRPC
            console.print(f"  {c.host} clock: {c.note}", markup=False)
    parts = []
    if report.pause_skew_ms is not None:
        parts.append(f"pause skew [bold]{_ms(report.pause_skew_ms)}[/]")
    if report.resume_skew_ms is not None:
        parts.append(f"resume skew [bold]{_ms(report.resume_skew_ms)}[/]")
    if report.switch_over_ms is not None:
        parts.append(f"switch-over {_ms(report.switch_over_ms)}")
    parts.append(f"predicted ≤ {_ms(report.predicted_skew_ms)}")
    parts.append(f"took {report.duration_s:.2f} s")
    console.print(", ".join(parts))


def _clock(correction_ms: float | None, note: str) -> str:
    """A guest's wall-clock correction for the table ("+12.345 s"), or why it was not set."""
    if correction_ms is None:
        return escape(note) or "-"
    return f"{correction_ms / 1000:+.3f} s"


@contextmanager
def operation_progress(enabled: bool) -> Iterator[Callable[[str, Mapping[str, Any]], None] | None]:
    """A progress display for a save/restore (phases, and bytes while memory is written)."""
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    )
    tasks: dict[str, Any] = {}
    phase_task = progress.add_task("starting", total=None)

    def update(event: str, details: Mapping[str, Any]) -> None:
        if event == "phase":
            progress.update(phase_task, description=str(details["name"]))
        elif event == "memory":
            vm = str(details["vm"])
            if vm not in tasks:
                tasks[vm] = progress.add_task(f"  memory of {vm}", total=None)
            total = int(details["total"]) or None
            progress.update(tasks[vm], completed=int(details["done"]), total=total)

    with progress:
        yield update
