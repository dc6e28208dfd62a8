"""What the lab's guests noticed, from their own console logs (``lockstep lab verify``).

Every lab guest runs the cluster agent (``guest/lsagent.py``), which writes what
it notices as JSON lines on its serial console: role changes, split brain, and
lost, duplicated or reordered stream packets. This module reads those lines back
and sums them, per pair, per stream and in total. It never judges the network
itself: it only reports what the guests said, which is what cluster software
inside them would have acted on.

Why the log needs care: a VM's console log is appended across QEMU processes.
After a restore the guest continues from the saved state, so its clock, its
counters and its line numbers go back to what they were at the save. The agent
numbers its lines (``n``) within a run (``r``, one per boot), which cuts the log
into the guest's own timelines (:func:`timeline`):

* a ``start`` line begins a boot;
* a line whose number is not above the previous one (or of another run) begins
  a restore: the guest went back to a saved point;
* right after a restore the guest may write again lines it had written before
  the save (they sat in its serial buffer, which the state saved): a line equal
  to the one already logged under the same run and number is such a replay and
  is not counted again.

The agent logs anomalies as deltas (each line says what is new since its
previous line), so summing the counted lines counts every anomaly once, across
any number of restores; a restored guest's cumulative counters are never
compared with another timeline's.

A restore is visible only if the guest logged a line between the save and the
restore: after ``save --stop`` and ``restore`` the log just goes on, exactly as
the guest's own timeline does, so ``--since last-restore`` cannot find it.

In a lab with cluster middleware (``lab up --cluster``), the same logs also
hold what Corosync, Pacemaker or keepalived said; :mod:`lockstep.lab.middleware`
picks those events out and they are counted in the same window: after a mark,
after the agent's last restore line, or from a time (their own timestamps).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lockstep.errors import LabError
from lockstep.lab.clusterconf import ClusterKind
from lockstep.lab.lab import console_log_path, lab_data_dir
from lockstep.lab.middleware import (
    EVENT_KINDS,
    MiddlewareEvent,
    MiddlewareTotals,
    line_time,
    middleware_events,
)

__all__ = [
    "EVERYTHING",
    "LAST_RESTORE",
    "LogLine",
    "Segment",
    "Since",
    "VerifyReport",
    "VmInfo",
    "analyse",
    "console_log_path",
    "lab_cluster",
    "log_marks",
    "parse_line",
    "parse_log",
    "parse_since",
    "timeline",
    "verify_lab",
]

_CONTEXT_BYTES = 1 << 16  # of a log before a mark: enough for its last agent line
LAST_RESTORE = "last-restore"
_LINE_START = '{"t":'  # every agent line starts so (lsagent.ConsoleLog)


@dataclass(frozen=True)
class VmInfo:
    """A lab VM as ``lab up`` placed it (from the lab's lab.json)."""

    name: str
    host: str
    role: str
    peer: str


@dataclass(frozen=True)
class LogLine:
    """One line of the cluster agent, as it wrote it."""

    vm: str
    run: str
    n: int
    event: str
    t: float  # the guest's wall clock
    fields: Mapping[str, Any]
    text: str  # the JSON text, to recognise a replayed line

    def count(self, key: str) -> int:
        """Integer field ``key`` (0 when absent or not an integer)."""
        value = self.fields.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    def number(self, key: str) -> float | None:
        """Numeric field ``key``, or None."""
        value = self.fields.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return None

    def text_field(self, key: str) -> str | None:
        """String field ``key``, or None."""
        value = self.fields.get(key)
        return value if isinstance(value, str) else None


def parse_line(raw: str) -> LogLine | None:
    """The agent's line in ``raw``, or None for anything else (kernel, init, fragments).

    The object is taken from the last ``{"t":`` of the line to its end, so noise
    before it (another writer's half line) does not hide it.
    """
    start = raw.rfind(_LINE_START)
    if start < 0:
        return None
    text = raw[start:].rstrip("\r\n ")
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    vm, run, n, event, t = (obj.get(k) for k in ("vm", "r", "n", "event", "t"))
    if not (isinstance(vm, str) and isinstance(run, str) and isinstance(event, str)):
        return None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t):
        return None
    return LogLine(vm=vm, run=run, n=n, event=event, t=float(t), fields=obj, text=text)


def parse_log(text: str, vm: str | None = None) -> list[LogLine]:
    """The agent's lines in a console log, in order (only ``vm``'s when given)."""
    lines = (parse_line(raw) for raw in text.splitlines())
    return [line for line in lines if line is not None and (vm is None or line.vm == vm)]


@dataclass(frozen=True)
class Segment:
    """A stretch of a guest's own timeline: from a boot, a restore, or the log's start."""

    kind: str  # "boot", "restore" or "log" (the log starts mid-run)
    run: str
    first_n: int
    first_t: float


@dataclass(frozen=True)
class Entry:
    """A line placed on the timeline: its segment and whether it is a replay."""

    line: LogLine
    segment: int  # index into the segments
    replay: bool


@dataclass(frozen=True)
class Timeline:
    """A guest's console log cut into segments (see the module docstring)."""

    segments: list[Segment]
    entries: list[Entry]
    missing_lines: int  # line numbers skipped inside a segment (lines garbled on the console)

    def restores(self) -> list[int]:
        """Indexes of the segments that begin with a restore."""
        return [i for i, s in enumerate(self.segments) if s.kind == "restore"]


def timeline(lines: Sequence[LogLine]) -> Timeline:
    """Cut one guest's lines into boots and restores, and mark replayed lines."""
    segments: list[Segment] = []
    entries: list[Entry] = []
    seen: dict[tuple[str, int], str] = {}
    missing = 0
    prev: LogLine | None = None
    replaying = False
    for line in lines:
        kind = None
        if line.event == "start":
            kind = "boot"
        elif prev is None:
            kind = "log"
        elif line.run != prev.run or line.n <= prev.n:
            kind = "restore"
        elif line.n > prev.n + 1:
            missing += line.n - prev.n - 1
        if kind is not None:
            segments.append(Segment(kind, line.run, line.n, line.t))
            replaying = kind == "restore"
        key = (line.run, line.n)
        replay = replaying and seen.get(key) == line.text
        replaying = replay
        seen.setdefault(key, line.text)
        entries.append(Entry(line, len(segments) - 1, replay))
        prev = line
    return Timeline(segments, entries, missing)


@dataclass(frozen=True)
class Since:
    """Which lines count: all, those after each guest's last restore, or from a guest time."""

    kind: str  # "all", "last-restore" or "time"
    t: float | None = None

    def to_json(self) -> dict[str, Any]:
        """As in the report."""
        return {"kind": self.kind, "t": self.t}


EVERYTHING = Since("all")


def parse_since(text: str | None) -> Since:
    """``last-restore``, a unix time (``1795674548.5``) or an ISO 8601 time; None is all.

    An ISO time without a zone is local time, as ``date`` prints it.

    Raises:
        ValueError: the text is none of these.
    """
    if text is None or text == "":
        return EVERYTHING
    if text == LAST_RESTORE:
        return Since(LAST_RESTORE)
    try:
        return Since("time", float(text))
    except ValueError:
        pass
    try:
        return Since("time", datetime.fromisoformat(text).timestamp())
    except ValueError:
        raise ValueError(
            f"{text!r} is not {LAST_RESTORE}, a unix time or an ISO 8601 time"
        ) from None


@dataclass
class StreamTotals:
    """What one receiver said about one sender's stream."""

    sender: str
    receiver: str
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    gaps: int = 0
    last_seq: int | None = None

    def to_json(self) -> dict[str, Any]:
        """As in the report."""
        return {
            "from": self.sender,
            "to": self.receiver,
            "received": self.received,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "gaps": self.gaps,
            "last_seq": self.last_seq,
        }


@dataclass
class VmTotals:
    """What one guest said."""

    info: VmInfo
    role_now: str | None = None
    lines: int = 0
    replayed: int = 0
    boots: int = 0
    restores: int = 0
    missing_lines: int = 0
    transitions: list[dict[str, Any]] = field(default_factory=list)
    split_brain: int = 0
    heartbeat_misses: int = 0
    heartbeat_gap_max_s: float = 0.0
    first_t: float | None = None
    last_t: float | None = None

    def to_json(self) -> dict[str, Any]:
        """As in the report."""
        return {
            "name": self.info.name,
            "host": self.info.host,
            "role": self.info.role,
            "role_now": self.role_now,
            "lines": self.lines,
            "replayed": self.replayed,
            "boots": self.boots,
            "restores": self.restores,
            "missing_lines": self.missing_lines,
            "transitions": self.transitions,
            "split_brain": self.split_brain,
            "heartbeat_misses": self.heartbeat_misses,
            "heartbeat_gap_max_s": round(self.heartbeat_gap_max_s, 3),
            "first_t": self.first_t,
            "last_t": self.last_t,
        }


@dataclass
class VerifyReport:
    """The whole answer of ``lockstep lab verify`` (:meth:`to_json` is its JSON)."""

    lab: str
    since: Since
    vms: list[VmTotals]
    streams: list[StreamTotals]
    warnings: list[str]
    cluster: str = ClusterKind.AGENT.value
    middleware: MiddlewareTotals = field(default_factory=MiddlewareTotals)
    view: dict[str, Any] | None = None  # the middleware's own tools, asked now (lab.observe)

    def total(self, key: str) -> int:
        """Sum of a stream counter over every stream."""
        return sum(int(getattr(s, key)) for s in self.streams)

    @property
    def transitions(self) -> int:
        """Role changes (takeovers) over every guest."""
        return sum(len(v.transitions) for v in self.vms)

    def longest_silence(self) -> float:
        """The longest a guest went without hearing its peer's heartbeat, in s (0: none logged).

        From the agents' periodic heartbeat figures and, for a silence that
        ended in a takeover, the silence the takeover logged.
        """
        takeovers = [t["silent_s"] or 0.0 for v in self.vms for t in v.transitions]
        return max([v.heartbeat_gap_max_s for v in self.vms] + takeovers, default=0.0)

    @property
    def split_brain(self) -> int:
        """Split-brain episodes, counted once per guest that saw one begin."""
        return sum(v.split_brain for v in self.vms)

    @property
    def ok(self) -> bool:
        """Nothing noticed (by agents or middleware), and every agent spoke in the window."""
        counts = (self.total("lost"), self.total("duplicated"), self.total("reordered"))
        quiet = self.transitions == 0 and self.split_brain == 0 and not any(counts)
        return quiet and self.middleware.noticed == 0 and all(v.lines for v in self.vms)

    def pairs(self) -> list[dict[str, Any]]:
        """Per primary/standby pair (as placed by ``lab up``)."""
        by_name = {v.info.name: v for v in self.vms}
        out = []
        for v in self.vms:
            if v.info.role != "primary" or v.info.peer not in by_name:
                continue
            s = by_name[v.info.peer]
            out.append(
                {
                    "pair": f"{v.info.name}/{s.info.name}",
                    "primary": v.info.name,
                    "standby": s.info.name,
                    "transitions": len(v.transitions) + len(s.transitions),
                    "split_brain": v.split_brain + s.split_brain,
                    "heartbeat_misses": v.heartbeat_misses + s.heartbeat_misses,
                    "roles_now": {v.info.name: v.role_now, s.info.name: s.role_now},
                }
            )
        return out

    def to_json(self) -> dict[str, Any]:
        """The report as one JSON document (see the CLI's ``verify --help``)."""
        return {
            "lab": self.lab,
            "since": self.since.to_json(),
            "ok": self.ok,
            "transitions": self.transitions,
            "split_brain": self.split_brain,
            "lost": self.total("lost"),
            "duplicated": self.total("duplicated"),
            "reordered": self.total("reordered"),
            "received": self.total("received"),
            "heartbeat_misses": sum(v.heartbeat_misses for v in self.vms),
            "pairs": self.pairs(),
            "streams": [s.to_json() for s in self.streams],
            "vms": [v.to_json() for v in self.vms],
            "warnings": self.warnings,
            "cluster": self.cluster,
            **{kind: self.middleware.count(kind) for kind in EVENT_KINDS},
            "middleware": self.middleware.lines_json(),
            "view": self.view,
        }


def analyse(
    lab: str,
    vms: Sequence[VmInfo],
    logs: Mapping[str, str],
    since: Since = EVERYTHING,
    context: Mapping[str, str] | None = None,
    cluster: str = ClusterKind.AGENT.value,
    middleware_from: Mapping[str, int] | None = None,
) -> VerifyReport:
    """Sum what each guest's agent (and middleware) said in its console log (``logs``: VM -> text).

    ``context``: what each guest logged before ``logs`` starts (the log cut at
    a mark). Its last agent line is placed on the timeline, never counted: a
    restore right at the start of ``logs`` shows against it; its middleware
    lines are not counted again when a restore writes them out once more.
    ``middleware_from``: where in each log the middleware's events start to
    count (a character offset: the cluster had formed there).

    Raises:
        LabError: ``since`` is last-restore and some guest's log shows no restore.
    """
    before = {vm.name: parse_log((context or {}).get(vm.name, ""), vm.name)[-1:] for vm in vms}
    timelines = {
        vm.name: timeline(before[vm.name] + parse_log(logs.get(vm.name, ""), vm.name)) for vm in vms
    }
    if since.kind == LAST_RESTORE:
        unrestored = [name for name, tl in timelines.items() if not tl.restores()]
        if unrestored:
            raise LabError(
                f"the console logs of {', '.join(unrestored)} show no restore (one shows only "
                "if the guest logged a line between the save and the restore); use --since TIME"
            )
    streams: dict[tuple[str, str], StreamTotals] = {}
    report = VerifyReport(lab, since, [], [], [], cluster)
    for vm in vms:
        tl = timelines[vm.name]
        text, prior = logs.get(vm.name, ""), (context or {}).get(vm.name, "")
        start = (middleware_from or {}).get(vm.name, 0)
        report.middleware.add(_middleware(vm.name, text, prior, tl, since, start))
        totals = VmTotals(vm, missing_lines=tl.missing_lines)
        totals.boots = sum(s.kind == "boot" for s in tl.segments)
        totals.restores = len(tl.restores())
        first = tl.restores()[-1] if since.kind == LAST_RESTORE else 0
        for i, entry in enumerate(tl.entries):
            _role_now(totals, entry.line)
            if i < len(before[vm.name]):
                continue
            if entry.segment < first or entry.replay:
                totals.replayed += entry.replay
                continue
            if since.kind == "time" and since.t is not None and entry.line.t < since.t:
                continue
            _count(totals, streams, entry.line)
        report.vms.append(totals)
        if not totals.lines:
            report.warnings.append(f"{vm.name}: no line of the cluster agent in this window")
        if tl.missing_lines:
            report.warnings.append(
                f"{vm.name}: {tl.missing_lines} agent lines missing from the console log"
            )
    report.streams = [streams[k] for k in sorted(streams)]
    return report


def _middleware(
    vm: str, text: str, before: str, tl: Timeline, since: Since, start: int = 0
) -> list[MiddlewareEvent]:
    """The middleware's events in one guest's log window (see :func:`analyse`).

    From character ``start`` of ``text`` on; after the last restore: from the
    agent line that began it; from a time: by each line's own timestamp (a
    line without one counts). The lines before the cut are known lines: seen
    again, they are a replay.
    """
    cut = start
    if since.kind == LAST_RESTORE and tl.restores():
        first = next(e.line for e in tl.entries if e.segment == tl.restores()[-1])
        at = text.rfind(first.text)  # its last copy: the one the restore wrote
        if at >= 0:
            cut = max(cut, text.rfind("\n", 0, at) + 1)
    seen = before.splitlines() + text[:cut].splitlines()
    events = middleware_events(vm, text[cut:], seen)
    if since.kind == "time" and since.t is not None:
        t0 = since.t
        events = [e for e in events if (line_time(e.line, t0) or t0) >= t0]
    return events


def _role_now(totals: VmTotals, line: LogLine) -> None:
    """The role the guest said last, whatever the window (roles are state, not events)."""
    if line.event in ("start", "role", "heartbeat_stats"):
        totals.role_now = line.text_field("role") or totals.role_now
    elif line.event == "takeover":
        totals.role_now = line.text_field("to") or totals.role_now


def _count(totals: VmTotals, streams: dict[tuple[str, str], StreamTotals], line: LogLine) -> None:
    totals.lines += 1
    totals.first_t = line.t if totals.first_t is None else totals.first_t
    totals.last_t = line.t
    event = line.event
    if event == "takeover":
        totals.transitions.append(
            {
                "t": line.t,
                "from": line.text_field("from"),
                "to": line.text_field("to"),
                "why": line.text_field("why"),
                "silent_s": line.number("silent_s"),
            }
        )
    elif event == "split_brain" and line.fields.get("onset") is True:
        totals.split_brain += 1
    elif event == "heartbeat_miss":
        totals.heartbeat_misses += 1
    elif event == "heartbeat_stats":
        gap = line.number("gap_max_s") or 0.0
        totals.heartbeat_gap_max_s = max(totals.heartbeat_gap_max_s, gap)
    elif event.startswith("stream_"):
        sender = line.text_field("from")
        if sender is None:
            return
        key = (sender, totals.info.name)
        s = streams.setdefault(key, StreamTotals(sender, totals.info.name))
        if event == "stream_stats":
            s.received += line.count("rx")
            last = line.number("last_seq")
            s.last_seq = None if last is None else int(last)
        elif event == "stream_gap":
            s.gaps += line.count("gaps")
            s.lost += line.count("lost")
        elif event == "stream_reorder":
            s.reordered += line.count("reordered")
            s.lost += line.count("lost")
        elif event == "stream_dup":
            s.duplicated += line.count("duplicated")


# --- I/O edge ------------------------------------------------------------------------------


def _lab_info(data: Path, what: str) -> dict[str, Any]:
    """The lab's lab.json (``what`` names what is read from it, for the message).

    Raises:
        LabError: the file is missing or unreadable.
    """
    path = data / "lab.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise LabError(f"there is no lab here ({path} is missing): is the lab up?") from exc
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read the lab's {what} from {path}: {exc}") from exc
    if not isinstance(info, dict):
        raise LabError(f"cannot read the lab's {what} from {path}: not a JSON object")
    return info


def lab_cluster(data: Path) -> tuple[str, dict[str, int]]:
    """The cluster kind the lab in ``data`` runs, and its console log lengths once it had formed.

    Labs made before there was a choice run the agent, with no marks.

    Raises:
        LabError: its lab.json is missing or unreadable.
    """
    info = _lab_info(data, "cluster")
    try:
        kind = str(info["options"].get("cluster", {}).get("kind", ClusterKind.AGENT.value))
        marks = {str(vm): int(n) for vm, n in info.get("cluster_marks", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LabError(f"cannot read the lab's cluster from {data / 'lab.json'}: {exc}") from exc
    return kind, marks


def lab_vms(data: Path) -> list[VmInfo]:
    """The VMs ``lab up`` placed, from its lab.json.

    Raises:
        LabError: the file is missing or unreadable.
    """
    info = _lab_info(data, "VMs")
    try:
        return [VmInfo(v["name"], v["host"], v["role"], v["peer"]) for v in info["vms"]]
    except (KeyError, TypeError) as exc:
        raise LabError(f"cannot read the lab's VMs from {data / 'lab.json'}: {exc}") from exc


def read_logs(data: Path, vms: Iterable[VmInfo]) -> dict[str, str]:
    """Every guest's console log (a missing one reads as empty: the VM never started).

    Raises:
        LabError: a log exists but cannot be read.
    """
    return {name: _decode(raw) for name, raw in _read_raw(data, vms).items()}


def _read_raw(data: Path, vms: Iterable[VmInfo]) -> dict[str, bytes]:
    logs = {}
    for vm in vms:
        path = console_log_path(data, vm.host, vm.name)
        try:
            logs[vm.name] = path.read_bytes()
        except FileNotFoundError:
            logs[vm.name] = b""
        except OSError as exc:
            raise LabError(f"cannot read the console log of {vm.name} ({path}): {exc}") from exc
    return logs


def log_marks(name: str) -> dict[str, int]:
    """The length of each guest's console log of lab ``name`` now: a mark for :func:`verify_lab`.

    Raises:
        LabError: there is no such lab.
    """
    marks = {}
    for vm, path in _console_logs(name):
        try:
            marks[vm] = path.stat().st_size
        except FileNotFoundError:
            marks[vm] = 0
    return marks


def console_since(name: str, marks: Mapping[str, int], keep: int) -> dict[str, list[str]]:
    """Each guest's console lines of lab ``name`` since ``marks`` (its last ``keep``, if more).

    A log that cannot be read gives no lines: this is what a report shows beside
    its result, never a reason to lose the result.

    Raises:
        LabError: there is no such lab.
    """
    out = {}
    for vm, path in _console_logs(name):
        try:
            with path.open("rb") as f:
                f.seek(marks.get(vm, 0))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            text = ""
        out[vm] = text.splitlines()[-keep:] if keep > 0 else []
    return out


def _console_logs(name: str) -> list[tuple[str, Path]]:
    """Each guest of lab ``name`` and its console log's path."""
    data = _lab_data(name)
    return [(vm.name, console_log_path(data, vm.host, vm.name)) for vm in lab_vms(data)]


def verify_lab(
    name: str, since: Since = EVERYTHING, marks: Mapping[str, int] | None = None
) -> VerifyReport:
    """Read lab ``name``'s console logs and sum what its guests noticed.

    ``marks`` (from :func:`log_marks`) limits it to what the guests logged since.

    Raises:
        LabError: there is no such lab, a log cannot be read, or ``since`` cannot
            be applied.
    """
    data = _lab_data(name)
    vms = lab_vms(data)
    cluster, formed = lab_cluster(data)
    if marks is None:
        raws = _read_raw(data, vms)
        # The middleware counts from when it had formed: how it formed is not news.
        starts = {
            vm: len(_decode(raw[: _line_start(raw, formed.get(vm, 0))])) for vm, raw in raws.items()
        }
        logs = {vm: _decode(raw) for vm, raw in raws.items()}
        return analyse(name, vms, logs, since, cluster=cluster, middleware_from=starts)
    logs, context = {}, {}
    for vm, raw in _read_raw(data, vms).items():
        mark = _line_start(raw, marks.get(vm, 0))  # a line half written then is after
        logs[vm] = _decode(raw[mark:])
        context[vm] = _decode(raw[max(0, mark - _CONTEXT_BYTES) : mark])
    return analyse(name, vms, logs, since, context, cluster)


def _line_start(raw: bytes, mark: int) -> int:
    """The start of the line byte ``mark`` is in (a line half written at a mark is after it)."""
    return raw.rfind(b"\n", 0, mark) + 1


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _lab_data(name: str) -> Path:
    data = lab_data_dir(name)
    if not data.exists():
        raise LabError(f"there is no lab named {name} (no {data}): run `lockstep lab up` first")
    return data
