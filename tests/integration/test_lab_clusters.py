"""Real Corosync + Pacemaker and keepalived in the lab (``lab up --cluster``), as ``lab verify`` reads them.

Each test brings up a 2-VM lab of its own (own_lab, from test_lab_verify:
always taken down, console logs kept on failure) with the guests' streams off
(rate 0: the middleware is what is watched here). It checks that the
middleware formed as lockstep configured it, that an idle cluster logs
nothing ``lab verify`` counts, and that a real failover (the QEMU of the VM
holding the virtual address killed with SIGKILL, after a save) is counted,
with the lines that show it, and seen in the middleware's own view. Then the
save is restored: the address is back where it was saved, and nothing moves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from lockstep.lab.clusterconf import ClusterSpec
from lockstep.lab.lab import vm_paths
from lockstep.lab.observe import cluster_view, placement
from lockstep.lab.verify import log_marks, verify_lab
from tests.integration import test_lab_verify
from tests.integration.test_lab_verify import OwnLab

pytestmark = test_lab_verify.pytestmark

own_lab = test_lab_verify.own_lab
IDLE_S = 30.0  # an idle cluster, watched this long
FAILOVER_S = 90.0  # bound on a failover under TCG (measured here: about 8 s at token 1000 ms)


def _middleware(lab: OwnLab, marks: dict[str, int]) -> dict[str, Any]:
    """``lab verify --json`` of what the guests logged since ``marks``."""
    return verify_lab(lab.name, marks=marks).to_json()


def _why(report: dict[str, Any], view: dict[str, Any] | None = None) -> str:
    """An assertion message: the counts and every counted line, then the view."""
    lines = [f"{kind}: {report[kind]}" for kind in report["middleware"]]
    for kind, events in report["middleware"].items():
        lines += [f"  {e['vm']}: {e['line']}" for e in events if kind != "token_warnings"]
    return "\n".join([*lines, f"view: {view}"])


def _kill(lab: OwnLab, vm: str) -> None:
    """SIGKILL guest ``vm``'s QEMU, as a crash of its host would."""
    host = lab.group.vms[vm].host
    os.kill(int(vm_paths(lab.data, host, vm).pidfile.read_text()), signal.SIGKILL)


def _wait_until(
    lab: OwnLab, marks: dict[str, int], done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Verify since ``marks`` every second until ``done`` or FAILOVER_S pass; the last report."""
    deadline = time.monotonic() + FAILOVER_S
    while True:
        report = _middleware(lab, marks)
        if done(report) or time.monotonic() > deadline:
            return report
        time.sleep(1.0)


def _started_on(view: dict[str, Any], vm: str) -> bool:
    """Whether crm_mon on ``vm`` shows the whole group started there."""
    resources = view["nodes"][vm].get("resources", {})
    return bool(resources) and all(
        r["role"] == "Started" and r["on"] == [vm] for r in resources.values()
    )


def _view_until(lab: OwnLab, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The middleware's view, asked every second until ``done`` or FAILOVER_S pass; the last one."""
    deadline = time.monotonic() + FAILOVER_S
    while True:
        view = asyncio.run(cluster_view(lab.name))
        if done(view) or time.monotonic() > deadline:
            return view
        time.sleep(1.0)


def _restored(lab: OwnLab, state: str, settle_s: float) -> dict[str, Any]:
    """Restore ``state`` (the killed VM comes back with the rest); what was logged since, after a wait."""
    marks = log_marks(lab.name)
    print(f"\n{lab.group_operation('restore', state)}")
    time.sleep(settle_s)
    return _middleware(lab, marks)


def _idle(lab: OwnLab) -> dict[str, Any]:
    """What the guests logged over IDLE_S seconds with nothing done to the lab."""
    marks = log_marks(lab.name)
    time.sleep(IDLE_S)
    return _middleware(lab, marks)


def test_pacemaker_forms_idles_quietly_and_fails_over(own_lab: Callable[..., OwnLab]) -> None:
    """Corosync + Pacemaker on p1 and s1 (token 1000 ms): the group runs on p1; idle, nothing is counted.

    Then, after a save, p1's QEMU is killed: s1 logs the token loss and a new
    membership, its scheduler calculates a transition that starts vip and web
    on s1 (no fencing: p1's resources are taken as stopped), and crm_mon on s1
    shows the group there and p1 offline. After the restore, crm_mon on both
    nodes shows both online and the group on p1 again, and nothing was placed
    anew since the restore.
    """
    lab = own_lab(
        vms=2, memory="512M", stream_rate=0, cluster=ClusterSpec("pacemaker", token_ms=1000)
    )
    view = asyncio.run(cluster_view(lab.name))
    assert placement(view) == {"vip": ["p1"], "web": ["p1"]}, view
    for node in ("p1", "s1"):
        assert view["nodes"][node]["nodes"] == {"p1": True, "s1": True}, view
        assert view["nodes"][node]["quorum"], view

    idle = _idle(lab)
    print(f"\nidle {IDLE_S:.0f} s: {_why(idle)}")
    for kind in ("token_losses", "membership_changes", "pacemaker_transitions", "resource_moves"):
        assert idle[kind] == 0, _why(idle)

    saved = lab.group_operation("save", "before-kill")
    marks = log_marks(lab.name)
    killed = time.monotonic()
    _kill(lab, "p1")
    after = _wait_until(
        lab,
        marks,
        lambda d: {e["resource"] for e in d["middleware"]["resource_moves"]} >= {"vip", "web"},
    )
    took = time.monotonic() - killed
    view = _view_until(lab, lambda v: _started_on(v, "s1"))
    why = _why(after, view)
    print(f"\nfailover seen in the logs after {took:.1f} s:\n{why}")
    assert after["token_losses"] >= 1, why
    assert after["membership_changes"] >= 1, why
    assert any("Members left: 1" in e["line"] for e in after["middleware"]["membership_changes"]), (
        why
    )
    assert after["pacemaker_transitions"] >= 1, why
    moves = {(e["resource"], e["dst"]) for e in after["middleware"]["resource_moves"]}
    assert moves == {("vip", "s1"), ("web", "s1")}, why
    assert all(e["vm"] == "s1" for e in after["middleware"]["resource_moves"]), why
    assert not after["ok"], why
    assert view["nodes"]["p1"] == {"error": "its QEMU does not run"}, why
    assert view["nodes"]["s1"]["nodes"] == {"p1": False, "s1": True}, why
    assert placement(view)["vip"] == ["s1"], why

    back = _restored(lab, "before-kill", settle_s=15.0)
    view = _view_until(lab, lambda v: _started_on(v, "p1"))
    why = f"{saved}\n{_why(back, view)}"
    print(f"\nsince the restore:\n{why}")
    assert back["resource_moves"] == 0, why
    for node in ("p1", "s1"):
        assert view["nodes"][node]["nodes"] == {"p1": True, "s1": True}, why
        assert view["nodes"][node]["resources"]["vip"]["on"] == ["p1"], why


def test_keepalived_pair_idles_quietly_and_the_standby_takes_over(
    own_lab: Callable[..., OwnLab],
) -> None:
    """One VRRPv3 pair (advert 1 s): p1 holds the address; idle, no state change is counted.

    Then, after a save, p1's QEMU is killed: s1 enters MASTER state (one
    counted VRRP change, with its line) and holds the address. After the
    restore p1 holds it again and neither side logged a state change.
    """
    lab = own_lab(vms=2, stream_rate=0, cluster=ClusterSpec("keepalived"))
    view = asyncio.run(cluster_view(lab.name))
    assert view["vips"]["VI_1"]["holders"] == ["p1"], view

    idle = _idle(lab)
    print(f"\nidle {IDLE_S:.0f} s: {_why(idle)}")
    assert idle["vrrp_changes"] == 0, _why(idle)

    saved = lab.group_operation("save", "before-kill")
    marks = log_marks(lab.name)
    _kill(lab, "p1")
    after = _wait_until(lab, marks, lambda d: d["vrrp_changes"] > 0)
    time.sleep(5)  # room for a second, wrong, state change to show
    after = _middleware(lab, marks)
    view = asyncio.run(cluster_view(lab.name))
    why = _why(after, view)
    print(f"\nfailover:\n{why}")
    changes = [(e["vm"], e["instance"], e["state"]) for e in after["middleware"]["vrrp_changes"]]
    assert changes == [("s1", "VI_1", "MASTER")], why
    assert "(VI_1) Entering MASTER STATE" in after["middleware"]["vrrp_changes"][0]["line"], why
    assert view["vips"]["VI_1"]["holders"] == ["s1"], why

    back = _restored(lab, "before-kill", settle_s=10.0)
    view = asyncio.run(cluster_view(lab.name))
    why = f"{saved}\n{_why(back, view)}"
    print(f"\nsince the restore:\n{why}")
    assert back["vrrp_changes"] == 0, why
    assert view["vips"]["VI_1"]["holders"] == ["p1"], why
