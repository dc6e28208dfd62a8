"""The caller's fan-out of faults (``lockstep fault``) against stub hosts.

Three stub execds (:mod:`tests.helpers.hosts`): p1 and p2 on h1, s1 on h2, w1
on h3. Each test checks which hosts got what, and what the caller made of
their answers: a new fault that failed somewhere is healed where it took.
"""

from __future__ import annotations

import pytest

from lockstep.caller.faults import partition
from lockstep.caller.orchestrator import GroupCaller
from lockstep.errors import ConfigError, HostUnreachable, OperationFailed
from lockstep.execd.model import FaultVm, Heal, Kill, ListFaults, Partition
from lockstep.group import GroupSpec, parse_group
from tests.helpers.hosts import FakeClock, StubHost, stub_hosts
from tests.helpers.rpc import run

PLACEMENT = {"h1": ["p1", "p2"], "h2": ["s1"], "h3": ["w1"]}
MACS = {"p1": "52:54:00:00:00:01", "p2": "52:54:00:00:00:02", "s1": "52:54:00:00:00:03"}
MACS["w1"] = "52:54:00:00:00:04"
UNREACHABLE = HostUnreachable("host h2 (10.0.0.2:7443) is unreachable: connection refused")


def _group() -> GroupSpec:
    vms = {
        vm: {"host": h, "kernel": "/k", "nics": [{"network": "lan", "mac": MACS[vm]}]}
        for h, names in PLACEMENT.items()
        for vm in names
    }
    hosts = {h: {"address": f"10.0.0.{i}:7443"} for i, h in enumerate(PLACEMENT, 1)}
    data = {"name": "g", "hosts": hosts, "networks": {"lan": {"bridge": "br0"}}, "vms": vms}
    return parse_group(data, "g.toml", check_files=False)


def _rig() -> tuple[dict[str, StubHost], GroupCaller]:
    hosts = stub_hosts(PLACEMENT, FakeClock())
    return hosts, GroupCaller(_group(), hosts)


def _faults(hosts: dict[str, StubHost]) -> dict[str, list[str]]:
    return {h: sorted(stub.held_faults) for h, stub in hosts.items()}


def test_a_partition_reaches_the_hosts_of_both_sides_with_every_mac() -> None:
    """p1 | s1: h1 and h2 get the same id and both sides with MACs; h3 is not asked."""
    hosts, caller = _rig()
    cut = partition(caller.group, "p1", "h2")
    fid, results = run(caller.fault(cut))
    assert fid.startswith("partition-")
    assert sorted(results) == ["h1", "h2"] and all(r.ok for r in results.values())
    expected = Partition((FaultVm("p1", (MACS["p1"],)),), (FaultVm("s1", (MACS["s1"],)),))
    for h in ("h1", "h2"):
        assert hosts[h].args("inject_fault") == [
            {"group": "g", "fault_id": fid, "action": expected}
        ]
    assert hosts["h3"].called() == []


def test_a_partition_that_fails_on_one_host_is_healed_on_the_others() -> None:
    """h2 unreachable: h1, where the cut took, heals that id; one sentence says both."""
    hosts, caller = _rig()
    hosts["h2"].fail("inject_fault", UNREACHABLE)
    with pytest.raises(OperationFailed) as info:
        run(caller.fault(partition(caller.group, "p1", "s1")))
    message = str(info.value)
    assert message.startswith("fault partition failed on host h2: host h2 (10.0.0.2:7443)")
    assert message.endswith("; it was healed on host h1")
    fid = hosts["h1"].args("inject_fault")[0]["fault_id"]
    assert hosts["h1"].args("inject_fault")[1]["action"] == Heal((fid,))
    assert _faults(hosts) == {"h1": [], "h2": [], "h3": []}


def test_a_kill_goes_to_its_vms_host_alone() -> None:
    """Killing s1 asks h2 only; an unknown VM is refused before any host is asked."""
    hosts, caller = _rig()
    fid, results = run(caller.fault(Kill("s1")))
    assert list(results) == ["h2"] and fid.startswith("kill-")
    assert [h for h, stub in hosts.items() if stub.called()] == ["h2"]
    with pytest.raises(ConfigError, match="group g has no VM 'x9'"):
        run(caller.fault(Kill("x9")))
    assert [len(stub.called()) for stub in hosts.values()] == [0, 1, 0]


def test_heal_and_list_ask_every_host_and_report_each() -> None:
    """Heal goes to every host with VMs; one that fails is in its result, the others heal."""
    hosts, caller = _rig()
    fid, _ = run(caller.fault(partition(caller.group, "p1", "s1,w1")))
    hosts["h3"].fail("inject_fault", UNREACHABLE)
    _, listed = run(caller.fault(ListFaults()))
    assert [r.value.held[0].id for h, r in listed.items() if r.value] == [fid, fid]
    assert listed["h3"].error is UNREACHABLE
    healed_id, healed = run(caller.fault(Heal()))
    assert healed_id == ""
    assert [h for h, r in healed.items() if r.ok] == ["h1", "h2"]
    assert _faults(hosts) == {"h1": [], "h2": [], "h3": [fid]}


def test_a_bad_fault_id_to_heal_is_refused_at_once() -> None:
    """`fault heal ../x` is one sentence from the caller; no host is asked."""
    hosts, caller = _rig()
    with pytest.raises(ConfigError, match=r"fault name '\.\./x' is not allowed"):
        run(caller.fault(Heal(("../x",))))
    assert all(stub.called() == [] for stub in hosts.values())
