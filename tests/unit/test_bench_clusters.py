"""The middleware benches' pure parts: settings, waits, whether a view is origin's, the cases."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from bench.cases import CASES, lockstep_rows, ready_at, summary, write_cases
from bench.heartbeat import agrees, notice_s, parse_row_settings
from lockstep.lab.clusterconf import ClusterSpec


def _node(online: dict[str, bool], on: str) -> dict[str, Any]:
    started = {"role": "Started", "on": [on]}
    return {"dc": "s1", "nodes": online, "resources": {"vip": started, "web": started}}


def test_row_settings_take_their_own_cycles() -> None:
    """``3000:10,1000`` gives 3000 ms ten cycles and 1000 ms the default."""
    assert parse_row_settings("3000:10, 1000", 20) == [(3000, 10), (1000, 20)]
    with pytest.raises(ValueError, match="MS:CYCLES"):
        parse_row_settings("fast", 20)
    with pytest.raises(ValueError, match="positive"):
        parse_row_settings("1000:0", 20)


def test_waits_follow_the_middleware_timeouts() -> None:
    """Corosync notices after token + consensus, VRRPv3 after its master-down interval."""
    assert notice_s(ClusterSpec("pacemaker", token_ms=1000), 2) == pytest.approx(2.2)
    assert notice_s(ClusterSpec("keepalived", advert_ms=100), 2) == pytest.approx(0.3609, abs=1e-3)


def test_a_view_agrees_only_when_every_node_sees_origin() -> None:
    """A node offline, a node that did not answer or the group elsewhere is a difference."""
    both = {"p1": True, "s1": True}
    origin = {"kind": "pacemaker", "nodes": {"p1": _node(both, "p1"), "s1": _node(both, "p1")}}
    assert agrees(origin, origin) == []
    split = {"kind": "pacemaker", "nodes": {"p1": _node(both, "p1"), "s1": _node(both, "s1")}}
    assert agrees(split, origin) == ["s1 sees vip on s1, not p1", "s1 sees web on s1, not p1"]
    lost = {"p1": True, "s1": False}
    gone = {"kind": "pacemaker", "nodes": {"p1": _node(lost, "p1"), "s1": {"error": "timeout"}}}
    assert agrees(gone, origin) == ["p1 sees s1 offline", "s1: timeout"]
    vrrp = {"kind": "keepalived", "vips": {"VI_1": {"vip": "10.0.0.100", "holders": ["p1"]}}}
    moved = {"kind": "keepalived", "vips": {"VI_1": {"vip": "10.0.0.100", "holders": ["s1"]}}}
    assert agrees(vrrp, vrrp) == []
    assert agrees(moved, vrrp) == ["VI_1 on ['s1'], not ['p1']"]


def test_cases_are_written_as_executables_in_order(tmp_path: Path) -> None:
    """Every case is an executable sourcing the prelude; the helpers are not cases."""
    cases = write_cases(tmp_path)
    assert [c.name for c in cases] == sorted(CASES)
    assert len(cases) == 10
    for case in cases:
        assert case.path.stat().st_mode & stat.S_IXUSR
        assert '. "$BENCH_DIR/common.sh"' in case.path.read_text()
    assert not (tmp_path / "cluster.py").stat().st_mode & stat.S_IXUSR


def test_lockstep_rows_time_ready_from_the_start_of_the_restore() -> None:
    """Ready is the case's first ``ready`` action, from when the restore began."""
    run = {
        "cases": [
            {
                "name": "01-kill-holder",
                "status": "passed",
                "started": 100.0,
                "reset_s": 0.8,
                "duration_s": 9.0,
                "restore": {"switch_over_ms": 40.0},
                "actions": [{"t": 101.5, "action": "ready (p1)"}, {"t": 102.0, "action": "kill"}],
                "noticed": {"token_losses": 1, "membership_changes": 1},
            }
        ]
    }
    (row,) = lockstep_rows(run)
    assert row["ready_s"] == pytest.approx(2.3)
    assert row["noticed"] == {
        "token_losses": 1,
        "membership_changes": 1,
        "pacemaker_transitions": 0,
    }
    assert ready_at([(5.0, "kill p1")]) is None
    verdict = summary({"lockstep": [row], "reboot": [{"reset_s": 80.0, "ready_s": 82.0}]})
    assert verdict[-1].startswith("goal: reset overhead per case <= 2 s with lockstep: met")
