"""Forming a lab's middleware through the guests' control channels, against scripted guests.

The guests here are stubs that answer each shell command as a guest would
(crm_mon's XML, ``ip addr``); the real daemons are in
tests/integration/test_lab_clusters.py. What is checked: the order of the
steps, that forming is bounded, and that a cluster that does not form is
reported in the middleware's own terms.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from lockstep.errors import LabError
from lockstep.lab import cluster
from lockstep.lab.cluster import ClusterPlan, form_cluster, plan_cluster, read_view
from lockstep.lab.clusterconf import ClusterSpec, Member

MEMBERS = [Member("p1", "10.124.0.11"), Member("s1", "10.124.0.12")]
PAIRS = [("p1", "s1")]
SUBNET = "10.124.0.0/24"


def crm_mon(online: dict[str, bool], dc: str | None, where: str | None = None) -> str:
    """crm_mon --output-as=xml as Pacemaker 2.1.5 writes it (the parts lockstep reads)."""
    nodes = "".join(
        f'<node name="{n}" id="{i}" online="{str(up).lower()}" type="member"/>'
        for i, (n, up) in enumerate(online.items(), start=1)
    )
    current = (
        f'<current_dc present="true" name="{dc}" id="2" with_quorum="true"/>'
        if dc
        else '<current_dc present="false"/>'
    )
    resources = ""
    if where:
        resources = (
            '<resources><group id="service" number_resources="2">'
            + "".join(
                f'<resource id="{r}" role="Started" active="true" nodes_running_on="1">'
                f'<node name="{where}" id="1" cached="true"/></resource>'
                for r in ("vip", "web")
            )
            + "</group></resources>"
        )
    return (
        '<pacemaker-result api-version="2.25" request="crm_mon --output-as=xml">'
        f"<summary>{current}</summary><nodes>{nodes}</nodes>{resources}"
        '<status code="0" message="OK"/></pacemaker-result>\n'
    )


class Guest:
    """A scripted guest: ``answer`` maps a command to (rc, output); every command is logged."""

    def __init__(self, name: str, log: list[tuple[str, str]], answer: Callable[[str], str]) -> None:
        self.name, self.log, self.answer = name, log, answer

    async def run(self, command: str, *, timeout: float = 30.0) -> tuple[int, str]:
        """Log the command; answer it."""
        self.log.append((self.name, command))
        await asyncio.sleep(0)
        if command.startswith("corosync-cfgtool"):
            return 0, "Local node ID 1, transport knet\n"
        if command.startswith("cibadmin --empty") and "fail" in self.name:
            return 1, "Call cib_create failed (-203): Update does not conform to the schema\n"
        return 0, self.answer(command)


def pacemaker_plan() -> ClusterPlan:
    return plan_cluster(ClusterSpec("pacemaker", token_ms=1000), "lsc", MEMBERS, PAIRS, SUBNET)


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Poll every 10 ms instead of every 2 s."""
    monkeypatch.setattr(cluster, "POLL_S", 0.01)


def test_pacemaker_forms_in_order() -> None:
    """Corosync everywhere, its answer awaited, Pacemaker everywhere on its CIB, formed, group started.

    The CIB is written on every node before its Pacemaker starts (one
    command), and nothing configures the cluster afterwards.
    """
    log: list[tuple[str, str]] = []
    looks = iter(
        [crm_mon({"p1": True, "s1": False}, None)] * 2
        + [crm_mon({"p1": True, "s1": True}, "s1")] * 2
        + [crm_mon({"p1": True, "s1": True}, "s1", "p1")]
    )

    def answer(command: str) -> str:
        return next(looks) if command.startswith("crm_mon") else ""

    shells = {m.name: Guest(m.name, log, answer) for m in MEMBERS}
    said: list[str] = []
    took = asyncio.run(form_cluster(pacemaker_plan(), shells, said.append, timeout=10))
    assert took < 10
    steps = [(vm, c.split()[0] if not c.startswith("mkdir") else "write+start") for vm, c in log]
    assert steps[:4] == [
        ("p1", "write+start"),
        ("s1", "write+start"),
        ("p1", "corosync-cfgtool"),
        ("s1", "corosync-cfgtool"),
    ]
    assert [s for s in steps[4:6]] == [("p1", "cibadmin"), ("s1", "cibadmin")]
    assert [c for _vm, c in steps[6:]] == ["crm_mon"] * 5
    assert "corosync -f" in log[0][1]
    for _vm, command in log[4:6]:
        assert command.index("CIB_file=") < command.index("install ") < command.index("pacemakerd")
    assert any("DC s1" in line for line in said)


def test_a_cluster_that_does_not_form_is_named_in_crm_mons_words() -> None:
    """Bounded: the error says what crm_mon shows (s1 offline, no DC), in one sentence."""
    log: list[tuple[str, str]] = []

    def answer(command: str) -> str:
        return crm_mon({"p1": True, "s1": False}, None) if command.startswith("crm_mon") else ""

    shells = {m.name: Guest(m.name, log, answer) for m in MEMBERS}
    with pytest.raises(LabError) as caught:
        asyncio.run(form_cluster(pacemaker_plan(), shells, lambda _: None, timeout=0.3))
    message = str(caught.value)
    assert "did not form within 0.3 s" in message
    assert "crm_mon on p1 shows online p1; offline s1; DC none" in message
    assert "\n" not in message


def test_a_failing_command_names_the_guest_and_its_output() -> None:
    """cibadmin failing in a guest: the error names the guest, the status and the last output line."""
    log: list[tuple[str, str]] = []

    def answer(command: str) -> str:
        return crm_mon({"p1fail": True, "s1": True}, "s1") if command.startswith("crm_mon") else ""

    members = [Member("p1fail", "10.124.0.11"), Member("s1", "10.124.0.12")]
    plan = plan_cluster(ClusterSpec("pacemaker"), "lsc", members, [("p1fail", "s1")], SUBNET)
    shells = {m.name: Guest(m.name, log, answer) for m in members}
    with pytest.raises(LabError, match=r"exited 1 in lab guest p1fail: Call cib_create failed"):
        asyncio.run(form_cluster(plan, shells, lambda _: None, timeout=5))


def test_keepalived_settles_when_each_primary_holds_its_address() -> None:
    """keepalived everywhere, then ``ip addr`` until p1 holds .100; a stuck pair is named."""
    log: list[tuple[str, str]] = []
    addresses = {"p1": "2: eth0    inet 10.124.0.11/24 scope global eth0\n", "s1": ""}

    def answer_for(vm: str) -> Callable[[str], str]:
        return lambda command: addresses[vm] if command.startswith("ip ") else ""

    plan = plan_cluster(ClusterSpec("keepalived", advert_ms=100), "lsc", MEMBERS, PAIRS, SUBNET)
    shells = {m.name: Guest(m.name, log, answer_for(m.name)) for m in MEMBERS}
    with pytest.raises(LabError, match=r"10\.124\.0\.100 held by nobody \(p1 expected\)"):
        asyncio.run(form_cluster(plan, shells, lambda _: None, timeout=0.2))
    assert all("keepalived -n -l -D -G" in c for _, c in log[:2])
    addresses["p1"] += "2: eth0    inet 10.124.0.100/24 scope global secondary eth0\n"
    asyncio.run(form_cluster(plan, shells, lambda _: None, timeout=5))
    view = asyncio.run(read_view(plan, {"s1": shells["s1"], "p1": shells["p1"]}))
    assert view == {
        "kind": "keepalived",
        "vips": {"VI_1": {"vip": "10.124.0.100", "master": "p1", "holders": ["p1"]}},
    }


def test_the_view_names_a_guest_that_does_not_run() -> None:
    """crm_mon from every running guest; one without a channel (QEMU gone) has an error, not a wait."""
    log: list[tuple[str, str]] = []

    def answer(command: str) -> str:
        return crm_mon({"p1": False, "s1": True}, "s1", "s1")

    view = asyncio.run(read_view(pacemaker_plan(), {"s1": Guest("s1", log, answer)}))
    assert view["nodes"]["p1"] == {"error": "its QEMU does not run"}
    assert view["nodes"]["s1"]["resources"]["vip"] == {"role": "Started", "on": ["s1"]}
    assert view["nodes"]["s1"]["dc"] == "s1"


def test_kinds_and_timings_are_checked_before_anything_starts() -> None:
    """An unknown kind and an advert VRRPv3 cannot carry are refused by the plan."""
    with pytest.raises(LabError, match="no cluster kind 'heartbeat'"):
        plan_cluster(ClusterSpec("heartbeat"), "lsc", MEMBERS, PAIRS, SUBNET)
    with pytest.raises(LabError, match="multiple of 10 ms"):
        plan_cluster(ClusterSpec("keepalived", advert_ms=15), "lsc", MEMBERS, PAIRS, SUBNET)
