"""The pytest plugin, run by pytest's own pytester: tests that start on the group put back.

The inner sessions' conftest.py overrides ``lockstep_group`` with a Group over
stub hosts (:func:`tests.helpers.hosts.stub_api`), as a user may override it;
everything else is the installed plugin.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import pytest
from tests.helpers.hosts import stub_api

@pytest.fixture(scope="session")
def rig():
    return stub_api(("origin", "two-nodes"))

@pytest.fixture(scope="session")
def lockstep_group(rig):
    return rig[0]

@pytest.fixture
def restores(rig):
    return lambda: len(rig[1]["h1"].args("prepare_restore"))
"""


def test_each_test_starts_on_its_state(pytester: pytest.Pytester) -> None:
    """lockstep_restored restores before every test: --lockstep-state, or the test's marker.

    Each test sees one more restore than the one before, of the state it asked for.
    """
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        def test_first(lockstep_restored, restores):
            assert lockstep_restored.state == "origin" and restores() == 1
            assert lockstep_restored.report.operation == "restore"

        @pytest.mark.lockstep_state("two-nodes")
        def test_marked(lockstep_restored, restores):
            assert lockstep_restored.state == "two-nodes" and restores() == 2

        def test_untouched(restores):
            assert restores() == 2
        """
    )
    result = pytester.runpytest("--lockstep-state", "origin", "--strict-markers")
    result.assert_outcomes(passed=3)


def test_a_failing_test_carries_the_restore(pytester: pytest.Pytester) -> None:
    """A failed test's report has a 'lockstep restore' section; JUnit XML gets the figures.

    The section names the state and every VM's frames; the JUnit properties
    hold the restore's duration and skews, for a CI system to chart.
    """
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        def test_breaks(lockstep_restored):
            assert False, "the cluster failed over"
        """
    )
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest("--lockstep-state", "origin", f"--junitxml={junit}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- lockstep restore -*",
            "restore of state 'origin' took * s: pause skew *, resume skew * ms*",
            "  p1 on h1: * frames held, * delivered, * dropped",
        ]
    )
    props = {p.get("name"): p.get("value") for p in ET.parse(junit).getroot().iter("property")}
    assert set(props) == {
        "lockstep_restore_duration_s",
        "lockstep_restore_resume_skew_ms",
        "lockstep_restore_switch_over_ms",
    }
    assert float(props["lockstep_restore_resume_skew_ms"] or "nan") >= 0


def test_a_passing_test_carries_no_sections(pytester: pytest.Pytester) -> None:
    """Only failed tests get the lockstep sections (a passing run's output stays quiet)."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile("def test_ok(lockstep_restored):\n    pass\n")
    result = pytester.runpytest("--lockstep-state", "origin", "-rA")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*lockstep restore*")


def test_no_state_named_is_an_error_that_says_how(pytester: pytest.Pytester) -> None:
    """Without --lockstep-state or a marker, the test errors saying both ways to name one."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile("def test_x(lockstep_restored):\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no state to restore: pass --lockstep-state NAME or mark*"])


def test_a_failed_restore_errors_the_test_without_running_it(pytester: pytest.Pytester) -> None:
    """A restore that fails makes the test an error (never run on a half-restored group)."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        def test_x(lockstep_restored):
            raise SystemExit("the test body ran")
        """
    )
    result = pytester.runpytest("--lockstep-state", "missing")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*restoring state 'missing' failed*"])
    result.stdout.no_fnmatch_line("*the test body ran*")


def test_no_group_file_names_where_it_looked(pytester: pytest.Pytester) -> None:
    """With the plugin's own lockstep_group and no group file, the error names the file."""
    pytester.makepyfile("def test_x(lockstep_restored):\n    pass\n")
    result = pytester.runpytest("--lockstep-state", "origin", "--lockstep-group", "nope.toml")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*lockstep: *nope.toml*"])


def test_help_lists_the_options(pytester: pytest.Pytester) -> None:
    """pytest --help shows the plugin's options."""
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--lockstep-group=FILE*", "*--lockstep-state=NAME*"])
