"""`lockstep run`'s parts without a group: finding cases, running one, writing the reports."""

from __future__ import annotations

import asyncio
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lockstep.errors import ConfigError
from lockstep.run.cases import Case, discover
from lockstep.run.execute import Line, execute
from lockstep.run.report import html_report, timeline
from lockstep.run.results import CaseResult, RunResult, junit_xml


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie no reaper collected yet does not run)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _script(path: Path, body: str, *, executable: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    if executable:
        path.chmod(0o755)
    return path


def test_cases_come_in_order_and_only_executables_of_a_folder_count(tmp_path: Path) -> None:
    """A folder's executables run in name order (sub-folders too); its other files are not cases."""
    folder = tmp_path / "cases"
    _script(folder / "20-partition", "true")
    _script(folder / "10-kill-primary", "true")
    _script(folder / "nested" / "30-freeze", "true")
    (folder / "README").write_text("not a case")
    single = _script(tmp_path / "smoke", "true")
    found = discover([single, folder])
    assert [c.name for c in found] == [
        "smoke",
        "10-kill-primary",
        "20-partition",
        "nested/30-freeze",
    ]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: _script(p / "c", "true", executable=False), "must be executable"),
        (lambda p: p / "absent", "no such case"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no executable file in it"),
    ],
    ids=["not-executable", "missing", "empty-folder"],
)
def test_what_is_no_case_is_one_clear_error(tmp_path: Path, make: object, fragment: str) -> None:
    """A file that is not executable, a missing path, a folder without cases: one sentence each."""
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=fragment):
        discover([path])


def test_two_cases_of_one_name_are_refused(tmp_path: Path) -> None:
    """The same name twice (the same file named twice) is refused: reports need distinct names."""
    case = _script(tmp_path / "a", "true")
    with pytest.raises(ConfigError, match="given twice: a"):
        discover([case, case])


def test_a_case_runs_with_its_environment_and_its_lines_stamped(tmp_path: Path) -> None:
    """Exit status, environment, both streams line by line with times, actions recognised."""
    case = Case(
        "hello",
        _script(
            tmp_path / "hello",
            'echo "state $LOCKSTEP_FROM_STATE"; echo "action: kill p1"; echo oops >&2; exit 3',
        ),
    )
    env = dict(os.environ, LOCKSTEP_FROM_STATE="origin")
    out = asyncio.run(execute(case, env, timeout=10))
    assert out.exit_code == 3 and not out.timed_out
    assert [(x.stream, x.text) for x in out.lines] == [
        ("out", "state origin"),
        ("out", "action: kill p1"),
        ("err", "oops"),
    ] or sorted(x.text for x in out.lines) == ["action: kill p1", "oops", "state origin"]
    assert all(out.started <= x.t <= out.ended for x in out.lines)
    assert [x.action for x in out.lines if x.action] == ["kill p1"]


def test_a_hanging_case_is_stopped_at_its_limit_with_what_it_started(tmp_path: Path) -> None:
    """A case past its time limit is stopped, and so is the background process it started."""
    marker = tmp_path / "child.pid"
    case = Case("hang", _script(tmp_path / "hang", f"sleep 300 & echo $! > {marker}; sleep 300"))
    started = time.monotonic()
    out = asyncio.run(execute(case, dict(os.environ), timeout=0.5))
    assert out.timed_out and out.exit_code is None
    assert time.monotonic() - started < 5
    child = int(marker.read_text())
    time.sleep(0.2)
    assert not _alive(child)


def test_a_cancelled_run_stops_the_case_before_going_on(tmp_path: Path) -> None:
    """Ctrl-C (the run cancelled) stops the case's process group; the cancellation goes on."""
    marker = tmp_path / "pid"
    case = Case("slow", _script(tmp_path / "slow", f"echo $$ > {marker}; sleep 300"))

    async def cancel_soon() -> None:
        task = asyncio.create_task(execute(case, dict(os.environ), timeout=60))
        # Another process writes the file: there is no event to wait on.
        while not marker.exists() or not marker.read_text().strip():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    assert not _alive(int(marker.read_text()))


def _run() -> RunResult:
    ok = CaseResult("10-ok", "/c/10-ok", "passed", started=1000.5, duration_s=2.0, reset_s=0.5)
    ok.output = [Line(1000.6, "out", "action: kill p1")]
    ok.restore = {"switch_over_ms": 31.5}
    ok.console = {
        "s1": [
            '{"t": 1000.1, "vm": "s1", "r": "a", "n": 1, "event": "role", "role": "standby"}',
            '{"t": 1001.4, "vm": "s1", "r": "a", "n": 2, "event": "takeover", "role": "primary",'
            ' "silent_s": 0.3}',
        ]
    }
    bad = CaseResult("20-bad", "/c/20-bad", "failed", message="case 20-bad exited with status 1")
    bad.output = [Line(1010.0, "err", "assertion failed: VIP not on s1")]
    hung = CaseResult("30-hang", "/c/30-hang", "timeout", message="case 30-hang did not end")
    return RunResult("lab", "origin", started=1000.0, duration_s=20.0, cases=[ok, bad, hung])


def test_junit_xml_has_a_testcase_per_case_with_failures_and_errors() -> None:
    """A failed case is a <failure> with its explanation, a timeout an <error>; counts add up."""
    suite = ET.fromstring(junit_xml(_run()))
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"10-ok", "20-bad", "30-hang"}
    failure = cases["20-bad"].find("failure")
    assert failure is not None and "VIP not on s1" in (failure.text or "")
    error = cases["30-hang"].find("error")
    assert error is not None and error.get("type") == "timeout"
    props = {p.get("name"): p.get("value") for p in cases["10-ok"].iter("property")}
    assert props == {"reset_s": "0.500", "switch_over_ms": "31.5"}


def test_the_timeline_shows_roles_silences_the_restore_and_actions() -> None:
    """From console lines: s1 standby then primary, the silence before its takeover, the marks."""
    bands, marks = timeline(_run().cases[0])
    kinds = [(b.vm, b.kind) for b in bands]
    assert ("s1", "standby") in kinds and ("s1", "primary") in kinds and ("s1", "silence") in kinds
    silence = next(b for b in bands if b.kind == "silence")
    assert silence.end - silence.start == pytest.approx(0.3)
    labels = {m.label for m in marks}
    assert {"case starts", "kill p1", "takeover"} <= labels


def test_html_report_stands_alone_with_a_picture_per_case() -> None:
    """One page, no outside address, a PNG timeline per case, the failure's lines shown."""
    page = html_report(_run())
    assert page.count("data:image/png;base64,") == 3
    assert "assertion failed: VIP not on s1" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_a_role_only_in_stats_lines_was_held_from_the_window_s_start() -> None:
    """After a restore the agents log no role line, only stats: the role band starts at 0.

    A later role line still changes the role at its own instant.
    """
    case = CaseResult("10-ok", "/c/10-ok", "passed", started=1000.5, duration_s=2.0, reset_s=0.5)
    case.console = {
        "p1": [
            '{"t": 1000.9, "vm": "p1", "r": "a", "n": 7, "event": "heartbeat_stats",'
            ' "role": "standby", "rx": 10}',
            '{"t": 1001.5, "vm": "p1", "r": "a", "n": 8, "event": "role", "role": "primary"}',
        ]
    }
    bands, _ = timeline(case)
    assert [b.kind for b in bands] == ["standby", "primary"]
    assert [(b.start, b.end) for b in bands] == [
        (0.0, pytest.approx(1.5)),
        (pytest.approx(1.5), 2.5),
    ]
