"""The HTML report of `lockstep run`, opened in a real browser (headless chromium).

The page must stand alone (no scripts, no outside address) and draw, for
each case, its picture: a case whose guests logged roles shows them as bands
of the role colours, in a place of its own on the page.
"""

from __future__ import annotations

from pathlib import Path

from lockstep.run.report import ROLE_COLOURS, html_report
from lockstep.run.results import CaseResult, RunResult
from tests.helpers.browser import bands_of, screenshot


def _case(name: str, vms: dict[str, str]) -> CaseResult:
    """A passed case whose guests logged their role at 0.1 s and a takeover at 1.4 s."""
    case = CaseResult(name, f"/c/{name}", "passed", started=1000.5, duration_s=2.0, reset_s=0.5)
    case.console = {
        vm: [
            f'{{"t": 1000.1, "vm": "{vm}", "r": "a", "n": 1, "event": "role", "role": "{role}"}}',
            f'{{"t": 1001.4, "vm": "{vm}", "r": "a", "n": 2, "event": "heartbeat"}}',
        ]
        for vm, role in vms.items()
    }
    return case


def test_every_case_s_timeline_is_drawn(tmp_path: Path) -> None:
    """Three cases with roles give three separate bands of primary and standby colour.

    And a case with no VM logs draws no role colour at all (the count is exact).
    """
    cases = [_case(f"{i}0-case", {"p1": "primary", "s1": "standby"}) for i in (1, 2, 3)]
    cases.append(CaseResult("40-none", "/c/40-none", "failed", message="exited with status 1"))
    page = tmp_path / "report.html"
    page.write_text(html_report(RunResult("lab", "origin", 1000.0, 9.0, cases)))
    image = screenshot(page, tmp_path / "report.png")
    primary = bands_of(image, [ROLE_COLOURS["primary"]])
    standby = bands_of(image, [ROLE_COLOURS["standby"]])
    assert len(primary) == 3, f"primary bands at rows {primary}"
    assert len(standby) == 3, f"standby bands at rows {standby}"
    for p, s in zip(primary, standby, strict=True):
        assert abs(p.start - s.start) < 200, "each case's roles are drawn in one picture"
