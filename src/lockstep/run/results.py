"""What a run found, case by case: as one JSON document and as JUnit XML (what CI systems read).

A case passes when it exits 0 within its time limit. It fails when it exits
otherwise, is stopped at its time limit (``timeout``), or cannot run (``error``:
it did not start, or the group could not be put back first, in which case it
never ran on a half-restored group). What the group noticed since the restore
(``noticed``: ``lockstep lab verify`` on the lab, a check command elsewhere) and
the guests' console lines of the case's window are kept beside, whatever the
verdict; a failed case also keeps the lines that explain it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from lockstep.run.execute import Line

__all__ = ["CaseResult", "RunResult", "Status", "junit_xml"]

Status = Literal["passed", "failed", "timeout", "error", "interrupted"]
_EXPLAIN = 40  # output lines kept as a failure's explanation


@dataclass
class CaseResult:
    """One case: its verdict, its times, what it printed and what the group noticed."""

    name: str
    path: str
    status: Status
    message: str = ""
    exit_code: int | None = None
    started: float = 0.0  # wall clock, when the case began (after the restore)
    duration_s: float = 0.0  # the case's own run
    reset_s: float = 0.0  # the restore before it
    restore: dict[str, Any] | None = None  # the restore's report
    output: list[Line] = field(default_factory=list)
    dropped: int = 0
    noticed: dict[str, Any] | None = None  # verify since the restore, or the check's result
    console: dict[str, list[str]] = field(default_factory=dict)  # VM -> lines of the window

    @property
    def passed(self) -> bool:
        """Whether the case passed."""
        return self.status == "passed"

    @property
    def actions(self) -> list[tuple[float, str]]:
        """The case's own actions (``action: TEXT`` lines): (when, what)."""
        return [(line.t, a) for line in self.output if (a := line.action) is not None]

    def explanation(self) -> list[str]:
        """The lines that explain a failure: its message, then the case's last lines."""
        if self.passed:
            return []
        tail = [line.text for line in self.output[-_EXPLAIN:]]
        return [self.message, *tail] if self.message else tail

    def to_json(self) -> dict[str, Any]:
        """As in ``lockstep run --json``."""
        return {
            "name": self.name,
            "path": self.path,
            "status": self.status,
            "message": self.message,
            "exit_code": self.exit_code,
            "started": self.started,
            "duration_s": self.duration_s,
            "reset_s": self.reset_s,
            "restore": self.restore,
            "actions": [{"t": t, "action": a} for t, a in self.actions],
            "output": [{"t": x.t, "stream": x.stream, "text": x.text} for x in self.output],
            "dropped_lines": self.dropped,
            "noticed": self.noticed,
            "console": self.console,
            "explanation": self.explanation(),
        }


@dataclass
class RunResult:
    """A whole run: the group, the state every case started from, every case."""

    group: str
    state: str
    started: float
    duration_s: float = 0.0
    cases: list[CaseResult] = field(default_factory=list)
    interrupted: bool = False

    def count(self, status: Status) -> int:
        """How many cases ended so."""
        return sum(1 for c in self.cases if c.status == status)

    @property
    def passed(self) -> bool:
        """Whether every case passed and the run was not interrupted."""
        return not self.interrupted and all(c.passed for c in self.cases)

    def to_json(self) -> dict[str, Any]:
        """The run as one JSON document."""
        return {
            "group": self.group,
            "state": self.state,
            "started": self.started,
            "duration_s": self.duration_s,
            "interrupted": self.interrupted,
            "passed": self.passed,
            "counts": {s: self.count(s) for s in ("passed", "failed", "timeout", "error")},
            "cases": [c.to_json() for c in self.cases],
        }


def junit_xml(run: RunResult) -> str:
    """The run as a JUnit XML report (one testsuite, one testcase per case)."""
    errors = run.count("error") + run.count("timeout") + run.count("interrupted")
    suite = ET.Element(
        "testsuite",
        {
            "name": f"lockstep run --from {run.state}",
            "tests": str(len(run.cases)),
            "failures": str(run.count("failed")),
            "errors": str(errors),
            "skipped": "0",
            "time": f"{run.duration_s:.3f}",
            "timestamp": datetime.fromtimestamp(run.started, UTC).isoformat(timespec="seconds"),
        },
    )
    for case in run.cases:
        element = ET.SubElement(
            suite,
            "testcase",
            {
                "classname": f"lockstep.{run.group}",
                "name": case.name,
                "time": f"{case.duration_s:.3f}",
            },
        )
        props = ET.SubElement(element, "properties")
        ET.SubElement(props, "property", {"name": "reset_s", "value": f"{case.reset_s:.3f}"})
        if case.restore is not None and case.restore.get("switch_over_ms") is not None:
            value = f"{case.restore['switch_over_ms']:.1f}"
            ET.SubElement(props, "property", {"name": "switch_over_ms", "value": value})
        if case.status == "failed":
            failure = ET.SubElement(element, "failure", {"message": case.message})
            failure.text = "\n".join(case.explanation())
        elif case.status != "passed":
            error = ET.SubElement(element, "error", {"message": case.message, "type": case.status})
            error.text = "\n".join(case.explanation())
        out = ET.SubElement(element, "system-out")
        out.text = "\n".join(line.text for line in case.output if line.stream == "out")
        err = ET.SubElement(element, "system-err")
        err.text = "\n".join(line.text for line in case.output if line.stream == "err")
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"
