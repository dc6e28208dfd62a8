"""Faults planned: the caller's reading of names (a domain's MACs from a stub host), the hosts it asks, each host's drops."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from lockstep.caller.faults import (
    fault_id,
    hosts_for,
    kind_of,
    partition,
    side,
    with_domain_macs,
)
from lockstep.errors import ConfigError, OperationFailed, RpcError
from lockstep.execd.inject import drops
from lockstep.execd.model import (
    FaultVm,
    Freeze,
    Heal,
    Kill,
    ListFaults,
    Loss,
    Partition,
    VmStatus,
)
from lockstep.group import GroupSpec, parse_group
from lockstep.net.nft import Drop


def _group() -> GroupSpec:
    """p1, p2 on h1 (p2 with two NICs), s1, s2 on h2, h3 with no VM."""
    vms = {
        "p1": {"host": "h1", "nics": [{"network": "lan", "mac": "52:54:00:00:00:01"}]},
        "p2": {
            "host": "h1",
            "nics": [
                {"network": "lan", "mac": "52:54:00:00:00:02"},
                {"network": "lan", "mac": "52:54:00:00:01:02"},
            ],
        },
        "s1": {"host": "h2", "nics": [{"network": "lan", "mac": "52:54:00:00:00:03"}]},
        "s2": {"host": "h2", "nics": [{"network": "lan", "mac": "52:54:00:00:00:04"}]},
    }
    data = {
        "name": "lab",
        "hosts": {h: {"address": f"10.0.0.{i}:7443"} for i, h in enumerate(["h1", "h2", "h3"], 1)},
        "networks": {"lan": {"bridge": "br0"}},
        "vms": {n: {**v, "kernel": "/boot/vmlinuz"} for n, v in vms.items()},
    }
    return parse_group(data, "test", check_files=False)


# -- the caller: names, sides, hosts --------------------------------------------------


def test_a_side_is_vms_and_hosts_with_their_macs() -> None:
    """VM names stand for themselves, a host for its VMs; every NIC's MAC comes along, once."""
    group = _group()
    assert side(group, "s1") == (FaultVm("s1", ("52:54:00:00:00:03",)),)
    assert side(group, "h1, s2,p1") == (
        FaultVm("p1", ("52:54:00:00:00:01",)),
        FaultVm("p2", ("52:54:00:00:00:02", "52:54:00:00:01:02")),
        FaultVm("s2", ("52:54:00:00:00:04",)),
    )


def test_unknown_names_and_empty_sides_are_one_sentence() -> None:
    """A name that is no VM or host, or a host with no VM, is refused naming what there is."""
    group = _group()
    with pytest.raises(ConfigError, match=r"'q9' is no VM or host of group lab \(VMs: p1, p2"):
        side(group, "p1,q9")
    with pytest.raises(ConfigError, match="'h3' names no VM of group lab"):
        side(group, "h3")


def test_a_vm_on_both_sides_is_refused() -> None:
    """p1 named on one side and through its host on the other cannot be cut from itself."""
    with pytest.raises(ConfigError, match="VM p1 is on both sides"):
        partition(_group(), "p1", "h1")
    cut = partition(_group(), "h1", "h2")
    assert [v.name for v in cut.a] == ["p1", "p2"] and [v.name for v in cut.b] == ["s1", "s2"]


def _with_domain(group: GroupSpec, vm: str) -> GroupSpec:
    """``group`` with ``vm`` a libvirt domain (no MACs in the group file)."""
    db = group.vms[vm].model_copy(update={"driver": "libvirt", "kernel": None, "nics": []})
    return group.model_copy(update={"vms": {**group.vms, vm: db}})


_DOMAIN_XML = """<domain type='qemu'><name>s2</name><devices>
<interface type='bridge'><mac address='52:54:00:aa:00:01'/><target dev='vnet3'/></interface>
<interface type='bridge'><mac address='52:54:00:aa:00:02'/><target dev='vnet4'/></interface>
</devices></domain>"""


class _StatusLink:
    """A host that answers status only: its VMs, or an error."""

    def __init__(self, vms: list[VmStatus] | None) -> None:
        self.vms = vms
        self.asked = 0

    async def status(self) -> list[VmStatus]:
        self.asked += 1
        if self.vms is None:
            raise RpcError("host h2 is not answering")
        return self.vms


def _links(h2: _StatusLink) -> dict[str, Any]:
    return {"h2": h2}


def test_a_libvirt_domains_macs_come_from_its_live_xml_on_its_host() -> None:
    """A partition naming a libvirt domain asks its host for the domain's live XML, once.

    Every NIC's MAC of the domain goes on its side; VMs of the group file
    keep theirs and their hosts are not asked. A host that cannot say, or a
    domain that does not run, is one sentence naming it. Other faults are
    planned for a domain as for any VM.
    """
    group = _with_domain(_group(), "s2")
    cut = partition(group, "p1", "h2")
    assert cut.b == (FaultVm("s1", ("52:54:00:00:00:03",)), FaultVm("s2", ()))
    h2 = _StatusLink([VmStatus("s1", "running"), VmStatus("s2", "running", xml=_DOMAIN_XML)])
    h1 = _StatusLink([])
    links: dict[str, Any] = {"h1": h1, "h2": h2}
    filled = asyncio.run(with_domain_macs(group, links, cut))
    assert filled.a == cut.a
    assert filled.b == (
        FaultVm("s1", ("52:54:00:00:00:03",)),
        FaultVm("s2", ("52:54:00:aa:00:01", "52:54:00:aa:00:02")),
    )
    assert (h1.asked, h2.asked) == (0, 1)
    plain = partition(group, "p1", "s1")
    assert asyncio.run(with_domain_macs(group, links, plain)) is plain
    with pytest.raises(OperationFailed, match=r"^fault partition: VM s2 is no running libvirt"):
        asyncio.run(with_domain_macs(group, _links(_StatusLink([])), cut))
    with pytest.raises(OperationFailed, match=r"could not be read on host h2: .*not answering"):
        asyncio.run(with_domain_macs(group, _links(_StatusLink(None)), cut))
    assert hosts_for(group, Loss("s2", 10)) == ["h2"]
    assert hosts_for(group, Kill("s2")) == ["h2"]


def test_each_fault_goes_to_the_hosts_concerned_only() -> None:
    """Kill, freeze, loss: the VM's host; a partition: the hosts of its VMs; heal, list: all with VMs."""
    group = _group()
    assert hosts_for(group, Kill("s1")) == ["h2"]
    assert hosts_for(group, Freeze("p2", 1.0)) == ["h1"]
    assert hosts_for(group, Loss("s2", 10)) == ["h2"]
    assert hosts_for(group, partition(group, "p1", "p2")) == ["h1"]
    assert hosts_for(group, partition(group, "p1", "s1")) == ["h1", "h2"]
    assert hosts_for(group, Heal()) == ["h1", "h2"]
    assert hosts_for(group, ListFaults()) == ["h1", "h2"]
    with pytest.raises(ConfigError, match="group lab has no VM 'x1'"):
        hosts_for(group, Kill("x1"))


def test_fault_ids_name_their_kind() -> None:
    """A new fault's id is its kind and 6 hex digits, a valid name, fresh each time."""
    fid = fault_id(Loss("p1", 5))
    assert re.fullmatch(r"loss-[0-9a-f]{6}", fid)
    assert fault_id(Kill("p1")) != fault_id(Kill("p1"))
    assert [kind_of(a) for a in (Freeze("p1", 1), Heal(), ListFaults())] == [
        "freeze",
        "heal",
        "list",
    ]


# -- the execd: drops on its own VMs' taps ----------------------------------------------

P1, P2, S1 = FaultVm("p1", ("m:p1",)), FaultVm("p2", ("m:p2a", "m:p2b")), FaultVm("s1", ("m:s1",))


def test_a_partition_across_hosts_cuts_by_the_other_sides_macs() -> None:
    """On h1 (p1 only): frames out by p1's taps from s1's MAC; on h2 the mirror image."""
    cut = Partition((P1,), (S1,))
    assert drops([("c", cut)], {"p1": ["t-p1"]}) == [
        Drop("c partition", out_ports=("t-p1",), macs=("m:s1",))
    ]
    assert drops([("c", cut)], {"s1": ["t-s1"], "s2": ["t-s2"]}) == [
        Drop("c partition", out_ports=("t-s1",), macs=("m:p1",))
    ]


def test_a_partition_on_one_host_also_cuts_by_port() -> None:
    """With both sides here, frames between their taps go whatever their source MAC."""
    cut = Partition((P1,), (P2,))
    got = drops([("c", cut)], {"p1": ["t-p1"], "p2": ["t-p2a", "t-p2b"]})
    assert got == [
        Drop("c partition", out_ports=("t-p1",), macs=("m:p2a", "m:p2b")),
        Drop("c partition", out_ports=("t-p1",), in_ports=("t-p2a", "t-p2b")),
        Drop("c partition", out_ports=("t-p2a", "t-p2b"), macs=("m:p1",)),
        Drop("c partition", out_ports=("t-p2a", "t-p2b"), in_ports=("t-p1",)),
    ]


def test_a_loss_drops_its_share_both_ways_and_only_where_its_vm_runs() -> None:
    """A loss is two drops on its VM's taps (in and out); a host without the VM has none."""
    assert drops([("l", Loss("p1", 30))], {"p1": ["t-p1"]}) == [
        Drop("l loss", in_ports=("t-p1",), percent=30),
        Drop("l loss", out_ports=("t-p1",), percent=30),
    ]
    assert drops([("l", Loss("p1", 30)), ("c", Partition((P1,), (S1,)))], {"p2": ["t"]}) == []


def test_drops_come_in_fault_id_order() -> None:
    """Several faults make their drops in the order of their ids: the same faults, the same text."""
    faults: list[tuple[str, Partition | Loss]] = [
        ("z", Loss("p1", 5)),
        ("a", Partition((S1,), (P1,))),
    ]
    got = drops(faults, {"p1": ["t-p1"]})
    assert [d.comment for d in got] == ["a partition", "z loss", "z loss"]
