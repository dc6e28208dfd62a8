"""lockstep.Group and the pytest plugin on the real lab: a script's calls and a test's restore.

The plugin runs in pytest's own pytester, on the session's lab; a test that
fails on purpose shows what the plugin attaches: the restore, what the guests
noticed, their console lines.
"""

from __future__ import annotations

import time

import pytest

from lockstep import Group
from tests.integration.conftest import Lab

pytest_plugins = ["pytester"]


def test_a_script_saves_restores_and_reads_what_the_guests_noticed(fresh: Lab) -> None:
    """Group.load, save, restore, verify, console: the guests noticed nothing across the restore.

    verify since the restore counts one restore per guest and no role change,
    and each guest logged console lines since the mark.
    """
    group = Group.load(fresh.group_file)
    assert group.lab == fresh.name
    saved = group.save("api-origin")
    assert {v.name for v in saved.vms} == set(fresh.group.vms)
    assert "api-origin" in {s.name for s in group.states()}
    time.sleep(1.5)  # a restore shows in a guest's log once it logged a line after the save
    marks = group.marks()
    restored = group.restore("api-origin")
    assert restored.resume_skew_ms is not None
    noticed = group.verify(marks=marks)
    assert noticed["ok"] and noticed["transitions"] == 0, noticed
    assert {v["name"]: v["restores"] for v in noticed["vms"]} == dict.fromkeys(fresh.group.vms, 1)
    lines = group.console(marks, keep=5)
    assert sorted(lines) == sorted(fresh.group.vms) and all(lines.values())
    status = group.status()
    assert {s.name for ss in status.values() for s in ss if s.runstate == "running"} == set(
        fresh.group.vms
    )


def test_a_failing_test_shows_the_restore_the_guests_view_and_consoles(
    fresh: Lab, pytester: pytest.Pytester
) -> None:
    """A test failing on the restored lab carries the plugin's three sections.

    The restore's figures, what the guests noticed since it (JSON, with its
    transitions) and their console lines of the window (JSON lines of each VM).
    """
    group = Group.load(fresh.group_file)
    group.save("plugin-origin")
    pytester.makepyfile(
        """
        import time

        def test_breaks(lockstep_restored):
            assert lockstep_restored.group.lab is not None
            time.sleep(2)  # the guests log a line a second
            assert False, "on purpose"
        """
    )
    result = pytester.runpytest(
        "--lockstep-group", str(fresh.group_file), "--lockstep-state", "plugin-origin"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- lockstep restore -*",
            "restore of state 'plugin-origin' took *",
            "*- lockstep verify -*",
            '*"transitions": 0,*',
            "*- lockstep console -*",
            'p1: {"t":*"vm":"p1"*',
        ]
    )
