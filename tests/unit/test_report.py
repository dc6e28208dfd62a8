"""The operation report's derived figures: skews, a restore's switch-over, guest clocks."""

from __future__ import annotations

import pytest

from lockstep.caller.clock import ClockEstimate
from lockstep.caller.report import OperationReport, VmLine
from lockstep.execd.model import VmReport


def _lines() -> list[VmLine]:
    return [
        VmLine("p1", "h1", paused_at=100.000, resumed_at=100.040),
        VmLine("s1", "h2", paused_at=100.0005, resumed_at=100.0402),
    ]


def test_a_restores_switch_over_runs_from_the_first_pause_to_the_last_resume() -> None:
    """For a restore, the replaced VMs' pauses and the new VMs' resumes span the switch-over."""
    report = OperationReport("s", "restore", vms=_lines())
    assert report.switch_over_ms == pytest.approx(40.2)
    assert report.pause_skew_ms == pytest.approx(0.5)
    assert report.resume_skew_ms == pytest.approx(0.2)
    assert report.to_json()["switch_over_ms"] == pytest.approx(40.2)


def test_a_save_or_a_restore_that_replaced_nothing_has_no_switch_over() -> None:
    """A save pauses and resumes the same VMs: no switch-over; nor a restore with nothing paused."""
    assert OperationReport("s", "save", vms=_lines()).switch_over_ms is None
    fresh = [VmLine("p1", "h1", resumed_at=100.0)]
    assert OperationReport("s", "restore", vms=fresh).switch_over_ms is None
    assert OperationReport("s", "restore", vms=fresh).to_json()["switch_over_ms"] is None


def test_each_guests_clock_correction_or_why_not_is_in_the_json() -> None:
    """A step's clock correction (or note) lands on its VM's line; a later step without one keeps it."""
    report = OperationReport("s", "restore")
    report.merge(
        {"h1": [VmReport("p1", clock_correction_ms=61_000.5)]}, {"h1": ClockEstimate(0.0, 0.0, 8)}
    )
    report.merge(
        {"h1": [VmReport("s1", clock_note="no guest agent")]}, {"h1": ClockEstimate(0.0, 0.0, 8)}
    )
    report.merge({"h1": [VmReport("p1", frames_held=3)]}, {"h1": ClockEstimate(0.0, 0.0, 8)})
    vms = {v["name"]: v for v in report.to_json()["vms"]}
    assert (vms["p1"]["clock_correction_ms"], vms["p1"]["clock_note"]) == (61_000.5, "")
    assert (vms["s1"]["clock_correction_ms"], vms["s1"]["clock_note"]) == (None, "no guest agent")
