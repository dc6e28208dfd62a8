"""The memory benchmark's results as a markdown table, JSON and a PNG plot."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.memory import Row
from lockstep.units import parse_size

__all__ = ["goals", "markdown", "plot", "write_json"]


def _med(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _f(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(rows: Sequence[Row]) -> str:
    """One line per (VMs, RAM, path); medians over repeats, max over VMs where it says so."""
    head = (
        "| VMs | RAM | path | written/VM | save downtime p50 / max (ms) | RAM image kept"
        " (max ms) | save (s) | restore → all resumed (s) | `lockstep restore` process (s)"
        " | resume skew (ms) | guests answer (s) | read by restore | loading (GB/s)"
        " | raw read (GB/s) | loading / raw |\n"
        "|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.vms} | {r.memory} | {r.path} | {r.status} |" + " |" * 11)
            continue
        down = (
            f"{_f(_med(r.downtime_ms), '.0f')} / {_f(max(r.downtime_ms), '.0f')}"
            if r.downtime_ms
            else "— (destroyed)"
        )
        keep = f"{r.keep} ({_f(max(r.keep_ms), '.0f')})" if r.keep_ms else "—"
        ratio = "—" if r.of_raw is None else f"{r.of_raw:.0%}"
        read = r.restore_read_bytes / 2**30
        lines.append(
            f"| {r.vms} | {r.memory} | {r.path} | {r.fill_mib} MiB | {down} | {keep}"
            f" | {_f(r.save_s, '.2f')} | {_f(_med(r.restore_s), '.3f')}"
            f" | {_f(r.cli_restore_s, '.2f')} | {_f(_med(r.resume_skew_ms), '.3f')}"
            f" | {_f(_med(r.guests_answer_s), '.2f')} | {read:.2f} GiB"
            f" | {_f(r.restore_read_gbps, '.2f')} | {_f(r.raw_read_gbps, '.2f')} | {ratio} |"
        )
    return head + "\n".join(lines) + "\n"


def goals(rows: Sequence[Row]) -> list[str]:
    """The issue's goals, each met or not, from the rows that ran."""
    ok = [r for r in rows if r.status == "ok"]

    def find(vms: int, memory: str, path: str) -> Row | None:
        return next((r for r in ok if (r.vms, r.memory, r.path) == (vms, memory, path)), None)

    out = []
    r = find(8, "1G", "fast")
    if r and r.restore_s:
        t = statistics.median(r.restore_s)
        out.append(f"fast restore, 8 VMs x 1 GiB, call to all resumed: {t:.3f} s (goal <= 1 s)")
    for vms in (2, 4, 8):
        small, big = find(vms, "256M", "fast"), find(vms, "4G", "fast")
        if small and big and small.restore_s and big.restore_s:
            a, b = statistics.median(small.restore_s), statistics.median(big.restore_s)
            out.append(
                f"fast restore, {vms} VMs, 4 GiB vs 256 MiB: {b:.3f} s vs {a:.3f} s ="
                f" {b / a:.2f}x (goal <= 1.5x)"
            )
    for r in ok:
        if r.path == "standard" and r.of_raw is not None and r.raw_read_gbps:
            out.append(
                f"standard restore, {r.vms} VMs x {r.memory}: loads at {r.of_raw:.0%} of the"
                f" disk's raw read speed for the same bytes (median {r.raw_read_gbps:.2f} GB/s;"
                " goal >= 80%)"
            )
        if r.path == "fast" and r.downtime_ms:
            keep = max(r.keep_ms, default=0.0)
            out.append(
                f"fast save downtime, {r.vms} VMs x {r.memory}: max {max(r.downtime_ms):.0f} ms,"
                f" of which keeping the RAM image ({r.keep}) {keep:.0f} ms"
                f" (goal <= 100 ms + that): {max(r.downtime_ms) - keep:.0f} ms beside it"
            )
    return out


def write_json(path: Path, rows: Sequence[Row], env: Mapping[str, Any], command: str) -> None:
    """All the figures, per VM and per repeat, with the environment they were taken in."""
    doc = {"command": command, "environment": dict(env), "rows": [r.to_json() for r in rows]}
    path.write_text(json.dumps(doc, indent=1) + "\n")


def plot(path: Path, rows: Sequence[Row]) -> None:
    """Restore time and save downtime against guest RAM, a line per (path, VMs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_s) = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        if r.status == "ok":
            series.setdefault((r.path, r.vms), []).append(r)
    styles = {"fast": "-", "standard": "--", "naive": ":"}
    for (kind, vms), rs in sorted(series.items()):
        rs.sort(key=lambda r: parse_size(r.memory))
        x = [parse_size(r.memory) / 2**30 for r in rs]
        label = f"{kind}, {vms} VMs"
        ax_r.plot(x, [_med(r.restore_s) for r in rs], styles[kind], marker="o", label=label)
        if kind != "naive":
            y = [max(r.downtime_ms) if r.downtime_ms else None for r in rs]
            ax_s.plot(x, y, styles[kind], marker="o", label=label)
    for ax, title, unit in (
        (ax_r, "restore: call to all VMs resumed", "s"),
        (ax_s, "save: longest VM downtime (pause to resume)", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("guest RAM (GiB)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
