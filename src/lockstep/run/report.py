"""The HTML report of a run: per case, its verdict, a timeline picture of every VM, and why.

The timeline (matplotlib, embedded as a PNG) has one row per VM: the role
its cluster agent held (primary, standby) over the case's window, the
heartbeat silences and takeovers it logged, and vertical marks for the
instant the group was put back and for each of the case's own actions
(``action: TEXT`` lines). Times are seconds from the start of the restore.
A failed case shows the lines that explain it. The page stands alone: one
file, no script, no outside address.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from lockstep.lab.verify import LogLine, parse_log
from lockstep.run.results import CaseResult, RunResult

__all__ = ["ROLE_COLOURS", "Band", "Mark", "html_report", "timeline", "timeline_png"]

# A role's band on the timeline (the report's legend names them: primary dark, standby light).
ROLE_COLOURS = {"primary": "#2b7bba", "standby": "#9ecae1", None: "#dddddd"}
_STATUS_COLOUR = {"passed": "#2e7d32", "failed": "#c62828"}


@dataclass(frozen=True)
class Band:
    """A stretch of one VM's row: ``kind`` is a role ("primary", "standby") or "silence"."""

    vm: str
    start: float
    end: float
    kind: str


@dataclass(frozen=True)
class Mark:
    """An instant on one VM's row (a takeover, a split brain) or on every row (vm None)."""

    t: float
    label: str
    vm: str | None = None


def _role_bands(vm: str, lines: Sequence[LogLine], t0: float, end: float) -> list[Band]:
    """``vm``'s roles over the window: from its role and takeover lines, and its periodic stats.

    A role first seen in a stats line was held from the window's start (the
    stats line says what the agent has been all along); a role or takeover
    line changes it at its own instant.
    """
    bands: list[Band] = []
    role: str | None = None
    since = 0.0
    for line in lines:
        if line.event == "takeover":
            new: str | None = "primary"
        elif line.event in ("role", "heartbeat_stats"):
            new = line.text_field("role")
        else:
            continue
        if new is None or new == role:
            continue
        at = 0.0 if role is None and line.event == "heartbeat_stats" else max(0.0, line.t - t0)
        if role is not None:
            bands.append(Band(vm, since, at, role))
        role, since = new, at
    if role is not None:
        bands.append(Band(vm, since, max(since, end), role))
    return bands


def timeline(case: CaseResult) -> tuple[list[Band], list[Mark]]:
    """What the case's picture draws, from its console lines (pure).

    ``t0`` is the start of the restore; a VM's role runs from its agent's
    ``role``/``takeover`` lines; a takeover's silence is drawn before it.
    """
    t0 = case.started - case.reset_s
    end = case.duration_s + case.reset_s
    bands: list[Band] = []
    marks = [Mark(case.reset_s, "case starts")]
    marks += [Mark(t - t0, text) for t, text in case.actions]
    for vm, raw in sorted(case.console.items()):
        lines = parse_log("\n".join(raw), vm)
        bands += _role_bands(vm, lines, t0, end)
        for line in lines:
            at = line.t - t0
            if line.event == "takeover":
                silent = line.number("silent_s") or 0.0
                bands.append(Band(vm, max(0.0, at - silent), at, "silence"))
                marks.append(Mark(at, "takeover", vm))
            elif line.event == "split_brain" and line.fields.get("onset"):
                marks.append(Mark(at, "split brain", vm))
    return bands, marks


def timeline_png(case: CaseResult) -> bytes:
    """The case's timeline as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands, marks = timeline(case)
    vms = sorted(case.console) or ["(no VM logs)"]
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.45 * len(vms)), dpi=90)
    for b in bands:
        row = vms.index(b.vm)
        if b.kind == "silence":
            ax.broken_barh([(b.start, b.end - b.start)], (row - 0.1, 0.2), color="#e53935")
        else:
            colour = ROLE_COLOURS.get(b.kind, "#dddddd")
            ax.broken_barh([(b.start, b.end - b.start)], (row - 0.35, 0.7), color=colour)
    for m in marks:
        if m.vm is None:
            ax.axvline(m.t, color="#555555", lw=0.8, ls="--")
            ax.text(m.t, len(vms) - 0.4, m.label, rotation=90, va="top", fontsize=7)
        else:
            ax.plot([m.t], [vms.index(m.vm)], marker="v", color="#b71c1c")
            ax.annotate(m.label, (m.t, vms.index(m.vm) + 0.3), fontsize=7)
    ax.axvline(0.0, color="#000000", lw=1.0)
    ax.set_yticks(range(len(vms)), vms)
    ax.set_xlim(left=-0.2, right=max(case.reset_s + case.duration_s, 1.0) * 1.02)
    ax.set_xlabel("seconds from the restore (primary dark, standby light, red: silence)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _noticed(case: CaseResult) -> str:
    n = case.noticed
    if not n:
        return "nothing was checked"
    if "check" in n:
        return f"check {' '.join(n['check'])}: {'ok' if n.get('ok') else 'failed'}"
    keys = ("transitions", "split_brain", "lost", "duplicated", "reordered")
    return ", ".join(f"{k.replace('_', ' ')} {n.get(k, 0)}" for k in keys)


def _case_html(case: CaseResult) -> str:
    picture = base64.b64encode(timeline_png(case)).decode()
    colour = _STATUS_COLOUR.get(case.status, "#ef6c00")
    why = "\n".join(case.explanation())
    output = "\n".join(f"{line.stream}: {line.text}" for line in case.output)
    console = "\n".join(
        f"{vm}: {text}" for vm, lines in sorted(case.console.items()) for text in lines
    )
    switch = (case.restore or {}).get("switch_over_ms")
    name = html.escape(case.name)
    reset = f"reset {case.reset_s:.2f} s"
    if switch is not None:
        reset += f" (switch-over {switch:.1f} ms)"
    noticed = html.escape(_noticed(case))
    explained = f"<h3>why</h3><pre class='why'>{html.escape(why)}</pre>" if why else ""
    return f"""
<section class="case" id="{name}">
 <h2><span class="status" style="background:{colour}">{case.status}</span> {name}</h2>
 <p>{reset}, case {case.duration_s:.2f} s; since the restore the group noticed: {noticed}</p>
 <img alt="timeline of {name}" src="data:image/png;base64,{picture}">
 {explained}
 <details><summary>output ({len(case.output)} lines)</summary>
  <pre>{html.escape(output)}</pre></details>
 <details><summary>console lines of this window</summary>
  <pre>{html.escape(console)}</pre></details>
</section>"""


def html_report(run: RunResult) -> str:
    """The whole run as one standalone HTML page."""
    when = datetime.fromtimestamp(run.started, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    counts = ", ".join(f"{run.count(s)} {s}" for s in ("passed", "failed", "timeout", "error"))
    group, state = html.escape(run.group), html.escape(run.state)
    ended = "; interrupted" if run.interrupted else ""
    rows = "\n".join(
        f"<tr><td><a href='#{html.escape(c.name)}'>{html.escape(c.name)}</a></td>"
        f"<td>{c.status}</td><td>{c.reset_s:.2f}</td><td>{c.duration_s:.2f}</td></tr>"
        for c in run.cases
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>lockstep run --from {html.escape(run.state)}</title>
<style>
 body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
 .status {{ color: white; padding: 0.1em 0.5em; border-radius: 0.3em; font-size: 0.8em; }}
 pre {{ background: #f5f5f5; padding: 0.5em; overflow-x: auto; font-size: 0.85em; }}
 pre.why {{ background: #fdecea; }}
 table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; }}
 img {{ max-width: 100%; }}
</style></head><body>
<h1>lockstep run: group {group}, every case from state {state}</h1>
<p>{when}; {len(run.cases)} cases in {run.duration_s:.1f} s: {counts}{ended}</p>
<table><tr><th>case</th><th>status</th><th>reset (s)</th><th>case (s)</th></tr>
{rows}
</table>
{"".join(_case_html(c) for c in run.cases)}
</body></html>
"""
