"""lockstep.Group, the scripting interface, against stub hosts: synchronous calls that do what the commands do.

The group is two stub execds (:mod:`tests.helpers.hosts`) reached through
Group's ``connect``; each call runs its own event loop and its own caller, as
a script's calls would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import lockstep
from lockstep.api import Group
from lockstep.errors import ConfigError, LabError, LockstepError, OperationFailed
from tests.helpers.hosts import RUNNING, stub_api


def test_group_is_the_package_s_public_object() -> None:
    """``from lockstep import Group`` gives lockstep.api.Group."""
    assert lockstep.Group is Group


def test_save_then_restore_returns_their_reports() -> None:
    """save and restore do the group operation on every host and return its report.

    The saved state is then listed by ``states``; the restore replaces every VM
    (each stub's generation goes up) and its report has every VM's instants.
    """
    group, hosts = stub_api()
    saved = group.save("before")
    assert saved.operation == "save" and saved.state == "before"
    assert {v.name for v in saved.vms} == {"p1", "s1"}
    assert {s.name for s in group.states()} == {"before", "origin"}
    restored = group.restore("origin")
    assert restored.operation == "restore" and restored.resume_skew_ms is not None
    assert all(v.resumed_at is not None for v in restored.vms)
    assert hosts["h1"].generation["p1"] == 1 and hosts["h2"].generation["s1"] == 1
    status = group.status()
    assert sorted(status) == ["h1", "h2"]
    assert {s.name: s.runstate for ss in status.values() for s in ss} == {
        "p1": RUNNING,
        "s1": RUNNING,
    }


def test_a_host_s_failure_is_one_lockstep_error() -> None:
    """A restore that fails on a host raises OperationFailed naming it; the group runs on."""
    group, hosts = stub_api()
    hosts["h2"].fail("prepare_restore")
    with pytest.raises(OperationFailed, match="h2"):
        group.restore("origin")
    assert hosts["h1"].generation["p1"] == 0, "the running VMs were kept"
    assert all(state == RUNNING for h in hosts.values() for state in h.vms.values())


def test_status_names_the_host_that_cannot_say() -> None:
    """status raises OperationFailed naming the host whose execd failed, not a partial answer."""
    group, hosts = stub_api()
    hosts["h1"].fail("status")
    with pytest.raises(OperationFailed, match="h1"):
        group.status()


def test_faults_reach_the_hosts_concerned_and_are_listed_and_healed() -> None:
    """kill/freeze go to the VM's host only, partition to both sides' hosts; faults() lists them.

    heal() with no id drops every held fault on every host; a host that fails
    to list raises OperationFailed naming it.
    """
    group, hosts = stub_api()
    frozen = group.freeze("s1", 2.5)
    cut = group.partition("p1", "s1")
    assert frozen.startswith("freeze-") and cut.startswith("partition-")
    assert sorted(hosts["h1"].held_faults) == [cut]
    assert sorted(hosts["h2"].held_faults) == sorted([frozen, cut])
    listed = group.faults()
    assert {h: sorted(f.id for f in held) for h, held in listed.items()} == {
        "h1": [cut],
        "h2": sorted([frozen, cut]),
    }
    group.heal()
    assert hosts["h1"].held_faults == {} and hosts["h2"].held_faults == {}
    hosts["h2"].fail("inject_fault")
    with pytest.raises(OperationFailed, match="on host h2"):
        group.faults()


def test_delete_state_removes_it_everywhere() -> None:
    """delete_state removes the state from every host; a state no host has is an error."""
    group, hosts = stub_api(("origin", "old"))
    group.delete_state("old")
    assert all("old" not in h.saved for h in hosts.values())
    with pytest.raises(OperationFailed, match="on no host"):
        group.delete_state("old")


def test_lab_calls_refuse_a_group_that_is_not_the_lab() -> None:
    """verify, marks and console are the embedded lab's; another group gets a LabError saying so."""
    group, _ = stub_api()
    assert group.lab is None
    for call in (group.marks, group.verify, lambda: group.console({})):
        with pytest.raises(LabError, match="not the embedded lab"):
            call()


def test_a_call_from_async_code_is_refused_with_the_way_to_do_it() -> None:
    """Inside a running event loop, a call says to use the GroupCaller instead of blocking it."""
    group, _ = stub_api()

    async def inside() -> None:
        group.states()

    with pytest.raises(LockstepError, match="connected"):
        asyncio.run(inside())


def test_load_names_the_missing_file(tmp_path: Path) -> None:
    """Group.load of a missing file raises ConfigError naming it."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        Group.load(missing)
