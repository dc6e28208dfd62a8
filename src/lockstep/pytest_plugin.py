"""pytest plugin: each test starts on the group put back to a named state.

Installed with lockstep (entry point ``pytest11``); it does nothing until a
test asks for its fixture::

    # pytest --lockstep-group lab.toml --lockstep-state origin
    import pytest

    def test_primary_dies(lockstep_restored):
        group = lockstep_restored.group            # a lockstep.Group
        ...                                        # break the cluster, check the failover

    @pytest.mark.lockstep_state("two-nodes")       # this test's own starting state
    def test_other(lockstep_restored): ...

``lockstep_restored`` restores the state before the test (the whole group, in
step) and hands over a :class:`Restored`: the group, the state, the restore's
report and a mark in the lab guests' logs. When such a test fails, its report
gets sections pytest prints with the failure (and JUnit XML keeps): the
restore's figures and, on the embedded lab, what the guests noticed since the
restore (``lockstep lab verify``) and their console lines of that window. The
restore's figures also go to the test's JUnit properties.

``lockstep_group`` (session scope) is the :class:`~lockstep.api.Group` alone;
override it in a conftest.py to build the group another way.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field

import pytest

from lockstep.api import Group
from lockstep.caller.report import OperationReport
from lockstep.errors import LockstepError

__all__ = ["Restored"]

CONSOLE_LINES = 40  # console lines per VM attached to a failing test
_RESTORED = pytest.StashKey["Restored"]()


@dataclass
class Restored:
    """What ``lockstep_restored`` did before the test: the group, put back to ``state``."""

    group: Group
    state: str
    report: OperationReport
    marks: Mapping[str, int] = field(default_factory=dict)  # lab guests' logs after the restore

    def __repr__(self) -> str:
        return f"Restored(group={self.group.name!r}, state={self.state!r})"

    def sections(self) -> list[tuple[str, str]]:
        """The report sections for a failed test (title, text); a read that fails says so."""
        out = [("lockstep restore", summary(self.report))]
        if self.group.lab is None:
            return out
        try:
            noticed = self.group.verify(marks=self.marks)
            out.append(("lockstep verify", json.dumps(_noticed(noticed), indent=2)))
            lines = self.group.console(self.marks, CONSOLE_LINES)
            text = "\n".join(f"{vm}: {line}" for vm, ls in sorted(lines.items()) for line in ls)
            out.append(("lockstep console", text or "(no console lines since the restore)"))
        except LockstepError as exc:
            out.append(("lockstep verify", f"could not read the lab's guests: {exc}"))
        return out


def summary(report: OperationReport) -> str:
    """One paragraph for people: what a restore or save did, its skews and time (pure)."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} ms"

    lines = [
        f"{report.operation} of state {report.state!r} took {report.duration_s:.2f} s:"
        f" pause skew {ms(report.pause_skew_ms)}, resume skew {ms(report.resume_skew_ms)},"
        f" switch-over {ms(report.switch_over_ms)}, predicted <= {ms(report.predicted_skew_ms)}"
    ]
    lines += [
        f"  {v.name} on {v.host}: {v.frames_held} frames held, {v.frames_delivered} delivered,"
        f" {v.frames_dropped} dropped"
        for v in report.vms
    ]
    return "\n".join(lines)


def _noticed(verify: Mapping[str, object]) -> dict[str, object]:
    keys = (
        *("ok", "transitions", "split_brain", "lost", "duplicated", "reordered"),
        *("heartbeat_misses", "warnings"),
    )
    return {k: verify[k] for k in keys if k in verify}


def pytest_addoption(parser: pytest.Parser) -> None:
    """--lockstep-group, --lockstep-state, --lockstep-verify."""
    group = parser.getgroup("lockstep", "tests on a group put back to a state (lockstep)")
    group.addoption(
        "--lockstep-group",
        metavar="FILE",
        default=None,
        help="the group file (default: $LOCKSTEP_GROUP, else ./lockstep.toml)",
    )
    group.addoption(
        "--lockstep-state",
        metavar="NAME",
        default=None,
        help="the state lockstep_restored puts the group back to"
        " (a test's @pytest.mark.lockstep_state(NAME) wins)",
    )
    group.addoption(
        "--lockstep-verify",
        action="store_true",
        default=False,
        help="check every byte of the state against its checksums before each restore",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Declare the marker (so that --strict-markers accepts it)."""
    config.addinivalue_line(
        "markers",
        "lockstep_state(name): the state lockstep_restored puts the group back to for this test",
    )


@pytest.fixture(scope="session")
def lockstep_group(pytestconfig: pytest.Config) -> Group:
    """The group of --lockstep-group (else $LOCKSTEP_GROUP, else ./lockstep.toml)."""
    try:
        return Group.load(pytestconfig.getoption("lockstep_group"))
    except LockstepError as exc:
        pytest.fail(f"lockstep: {exc}", pytrace=False)


@pytest.fixture
def lockstep_restored(request: pytest.FixtureRequest, lockstep_group: Group) -> Restored:
    """The group put back to its state (the test's lockstep_state marker, else --lockstep-state)."""
    marker = request.node.get_closest_marker("lockstep_state")
    state = marker.args[0] if marker and marker.args else request.config.getoption("lockstep_state")
    if not state:
        pytest.fail(
            "lockstep: no state to restore: pass --lockstep-state NAME"
            " or mark the test @pytest.mark.lockstep_state(NAME)",
            pytrace=False,
        )
    verify = bool(request.config.getoption("lockstep_verify"))
    try:
        report = lockstep_group.restore(str(state), verify=verify)
        marks = lockstep_group.marks() if lockstep_group.lab is not None else {}
    except LockstepError as exc:
        pytest.fail(f"lockstep: restoring state {state!r} failed: {exc}", pytrace=False)
    restored = Restored(lockstep_group, str(state), report, marks)
    request.node.stash[_RESTORED] = restored
    for key in ("duration_s", "resume_skew_ms", "switch_over_ms"):
        value = report.to_json().get(key)
        request.node.user_properties.append((f"lockstep_restore_{key}", value))
    return restored


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test on a restored group gets the restore, the guests' view and their consoles."""
    report = yield
    restored = item.stash.get(_RESTORED, None)
    if restored is not None and report.when == "call" and report.failed:
        for title, text in restored.sections():
            report.sections.append((title, text))
    return report
