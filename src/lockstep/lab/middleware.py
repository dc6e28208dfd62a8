"""What the cluster middleware in the lab's guests said: its log lines and its own tools' views.

Pure parsers, unit-tested on lines the real daemons wrote in the lab:

* Corosync (stderr, on the serial console): token warnings ("Token has not
  been received in 755 ms"), token losses ("A processor failed, forming new
  configuration"), new memberships ("A new membership (1.2c) was formed") and
  knet links going down;
* Pacemaker (its detail log, PCMK_logfile=/dev/console): the transitions the
  DC's scheduler calculated, and the resources it placed anew: a ``Move`` or
  ``Migrate`` from one node to another, or a ``Start`` (after the cluster
  formed, a resource starts only where it did not run: without fencing, the
  resources of a lost node are taken as stopped, so their failover shows as
  ``Start vip ( s1 )``, not as a move);
* keepalived (``-l``, on the console): VRRP state changes ("(VI_1) Entering
  MASTER STATE");
* ``crm_mon --output-as=xml``: the nodes, the DC and where each resource runs;
* ``ip -o addr``: the addresses a guest holds (who has a virtual address).

Each counted event keeps the line that shows it. A console log can show a
line twice after a restore (the guest's serial buffer was saved with it and
is written out again): :func:`middleware_events` counts a line only the first
time its exact text appears.
"""

from __future__ import annotations

import calendar
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EVENT_KINDS",
    "CrmStatus",
    "MiddlewareEvent",
    "MiddlewareTotals",
    "eth_addresses",
    "line_time",
    "middleware_events",
    "parse_crm_mon",
    "parse_middleware_line",
]

EVENT_KINDS = (
    "token_warnings",
    "token_losses",
    "membership_changes",
    "knet_link_downs",
    "pacemaker_transitions",
    "resource_moves",
    "vrrp_changes",
)
"""Every kind of event counted, as named in ``lab verify --json``."""

NOTICED_KINDS = (
    "token_losses",
    "membership_changes",
    "pacemaker_transitions",
    "resource_moves",
    "vrrp_changes",
)
"""The kinds that mean the middleware reacted (a token warning or a knet link down only warns)."""

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("token_warnings", re.compile(r"\[TOTEM \] Token has not been received in (?P<ms>\d+) ms")),
    ("token_losses", re.compile(r"\[TOTEM \] A processor failed, forming new configuration")),
    (
        "membership_changes",
        re.compile(r"\[TOTEM \] A new membership \((?P<ring>[^)]+)\) was formed\.?(?P<rest>.*)"),
    ),
    (
        "knet_link_downs",
        re.compile(r"\[KNET  \] link: host: (?P<host>\d+) link: (?P<link>\d+) is down"),
    ),
    (
        "pacemaker_transitions",
        re.compile(
            r"pacemaker-schedulerd.*Calculated transition (?P<n>\d+)"
            r"(?: \(with (?:errors|warnings)\))?, saving inputs"
        ),
    ),
    (
        "resource_moves",
        re.compile(
            r"pacemaker-schedulerd.*Actions: (?P<action>Start|Move|Migrate)\s+(?P<resource>\S+)"
            r"\s+\(\s*(?:(?P<src>[^\s)]+)\s*->\s*)?(?P<dst>[^\s)]+)\s*\)"
        ),
    ),
    (
        "vrrp_changes",
        # keepalived -l's stamp ends in the year; its syslog copy (Keepalived_vrrp[pid]:) is not.
        re.compile(r"\d{4}: \((?P<instance>[^)\s]+)\) Entering (?P<state>[A-Z]+) STATE"),
    ),
)


@dataclass(frozen=True)
class MiddlewareEvent:
    """One thing a daemon said that ``lab verify`` counts, with the line that says it."""

    kind: str  # one of EVENT_KINDS
    vm: str
    line: str
    detail: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """As in the report."""
        return {"vm": self.vm, "line": self.line, **self.detail}


def parse_middleware_line(vm: str, raw: str) -> MiddlewareEvent | None:
    """The counted event on one console line of ``vm``, or None."""
    line = raw.strip()
    for kind, pattern in _PATTERNS:
        match = pattern.search(line)
        if match:
            detail = {k: v.strip() for k, v in match.groupdict().items() if v and v.strip()}
            return MiddlewareEvent(kind, vm, line, detail)
    return None


def middleware_events(vm: str, text: str, seen: Iterable[str] = ()) -> list[MiddlewareEvent]:
    """The counted events in ``text`` (a console log), each line counted once.

    ``seen``: lines written before ``text`` starts (the log before a mark): a
    line equal to one of them is a replay of the guest's serial buffer after a
    restore, not a new event.
    """
    known = {line.strip() for line in seen}
    events = []
    for raw in text.splitlines():
        event = parse_middleware_line(vm, raw)
        if event is None or event.line in known:
            continue
        known.add(event.line)
        events.append(event)
    return events


@dataclass
class MiddlewareTotals:
    """The counted events of every guest, by kind."""

    events: dict[str, list[MiddlewareEvent]] = field(
        default_factory=lambda: {kind: [] for kind in EVENT_KINDS}
    )

    def add(self, events: Iterable[MiddlewareEvent]) -> None:
        """Count ``events``."""
        for event in events:
            self.events[event.kind].append(event)

    def count(self, kind: str) -> int:
        """How many events of ``kind``.

        A membership is counted once however many guests saw it form (by its
        ring id); everything else once per line.
        """
        if kind == "membership_changes":
            return len({e.detail.get("ring", e.line) for e in self.events[kind]})
        return len(self.events[kind])

    @property
    def noticed(self) -> int:
        """Events that mean the middleware reacted (see NOTICED_KINDS)."""
        return sum(self.count(kind) for kind in NOTICED_KINDS)

    def lines_json(self) -> dict[str, list[dict[str, Any]]]:
        """The lines that show each kind: {kind: [{"vm", "line", ...detail}]}."""
        return {kind: [e.to_json() for e in self.events[kind]] for kind in EVENT_KINDS}


@dataclass(frozen=True)
class CrmStatus:
    """What ``crm_mon --output-as=xml`` says on one node."""

    dc: str | None
    quorum: bool
    nodes: dict[str, bool]  # node -> online
    resources: dict[str, tuple[str, ...]]  # resource -> nodes it runs on (active ones)
    roles: dict[str, str]  # resource -> role ("Started", "Stopped", ...)
    cib: str | None = None  # the node's CIB version, admin_epoch.epoch.num_updates

    def formed(self, members: Sequence[str]) -> bool:
        """A DC is elected and every one of ``members`` is online."""
        return self.dc is not None and all(self.nodes.get(m) for m in members)

    def group_on(self, resources: Sequence[str]) -> str | None:
        """The one node where every one of ``resources`` is started, or None."""
        where = {self.resources.get(r, ()) for r in resources}
        started = all(self.roles.get(r) == "Started" for r in resources)
        if started and len(where) == 1:
            (nodes,) = where
            if len(nodes) == 1:
                return nodes[0]
        return None

    def describe(self) -> str:
        """One line: nodes, DC, resources."""
        online = [n for n, up in self.nodes.items() if up]
        offline = [n for n, up in self.nodes.items() if not up]
        parts = [f"online {', '.join(online) or 'none'}"]
        if offline:
            parts.append(f"offline {', '.join(offline)}")
        parts.append(f"DC {self.dc or 'none'}{'' if self.quorum else ' (no quorum)'}")
        for r, role in self.roles.items():
            on = ", ".join(self.resources.get(r, ()))
            parts.append(f"{r} {role}{f' on {on}' if on else ''}")
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        """As in the report."""
        return {
            "dc": self.dc,
            "quorum": self.quorum,
            "nodes": self.nodes,
            "resources": {
                r: {"role": self.roles[r], "on": list(n)} for r, n in self.resources.items()
            },
            "cib": self.cib,
        }


_CIB_ROOT = re.compile(r"<cib\s[^>]*>")
_CIB_VERSION = ("admin_epoch", "epoch", "num_updates")


def cib_version(text: str) -> str | None:
    """The CIB version in a ``<cib ...>`` root element found in ``text`` (``0.7.12``), or None."""
    root = _CIB_ROOT.search(text)
    if root is None:
        return None
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', root.group(0)))
    parts = [attrs.get(a) for a in _CIB_VERSION]
    return ".".join(p for p in parts if p) if all(p and p.isdigit() for p in parts) else None


def parse_crm_mon(text: str) -> CrmStatus:
    """crm_mon's XML (``--output-as=xml``) as a :class:`CrmStatus`.

    Text after crm_mon's XML may hold the CIB's root element (see
    :data:`lockstep.lab.cluster.CRM_MON`): its version is the status's ``cib``.

    Raises:
        ValueError: the text is not crm_mon's XML (crm_mon could not reach the
            cluster, or was cut off).
    """
    start = text.find("<pacemaker-result")
    if start < 0:
        raise ValueError(f"not crm_mon XML: {text.strip()[:120]!r}")
    close = "</pacemaker-result>"
    end = text.find(close, start)
    end = len(text) if end < 0 else end + len(close)
    try:
        # The XML comes from a lab guest lockstep made, not from a stranger.
        root = ET.fromstring(text[start:end])  # noqa: S314
    except ET.ParseError as exc:
        raise ValueError(f"crm_mon XML does not parse: {exc}") from exc
    dc = root.find("summary/current_dc")
    present = dc is not None and dc.get("present") == "true"
    nodes = {n.get("name", "?"): n.get("online") == "true" for n in root.findall("nodes/node")}
    resources: dict[str, tuple[str, ...]] = {}
    roles: dict[str, str] = {}
    for r in root.iter("resource"):
        rid = r.get("id", "?")
        roles[rid] = r.get("role", "?")
        active = r.get("active") == "true"
        resources[rid] = tuple(n.get("name", "?") for n in r.findall("node")) if active else ()
    return CrmStatus(
        dc=dc.get("name") if present and dc is not None else None,
        quorum=present and dc is not None and dc.get("with_quorum") == "true",
        nodes=nodes,
        resources=resources,
        roles=roles,
        cib=cib_version(text[end:]),
    )


_MONTHS = {m: i for i, m in enumerate(calendar.month_abbr) if m}
_STAMP = re.compile(
    r"^(?:[A-Z][a-z]{2} )?(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) "
    r"(?P<hms>\d\d:\d\d:\d\d)(?P<frac>\.\d+)?(?: (?P<year>\d{4}))?"
)


def line_time(line: str, near: float) -> float | None:
    """The guest time (unix seconds) a daemon's line starts with, or None.

    The daemons write syslog-style stamps in the guest's zone (UTC in the lab)
    and most without a year: the year is the one that puts the stamp nearest
    to ``near``.
    """
    match = _STAMP.match(line)
    if match is None or match["mon"] not in _MONTHS:
        return None
    h, m, sec = (int(x) for x in match["hms"].split(":"))
    frac = float(match["frac"] or 0)
    year = int(match["year"]) if match["year"] else time.gmtime(near).tm_year
    years = [year] if match["year"] else [year - 1, year, year + 1]
    stamps = []
    for y in years:
        try:
            when = (y, _MONTHS[match["mon"]], int(match["day"]), h, m, sec)
            stamps.append(calendar.timegm((*when, 0, 0, 0)) + frac)
        except (ValueError, OverflowError):
            continue
    return min(stamps, key=lambda t: abs(t - near)) if stamps else None


def eth_addresses(text: str) -> list[str]:
    """The IPv4 addresses in ``ip -4 -o addr`` output (without prefix lengths)."""
    return re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/\d+", text)
