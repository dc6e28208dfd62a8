"""The lab's network on the real kernel: namespaces, LAN, VXLAN segment, exact teardown.

Every test works on a lab with a random name ("lst" + 3 characters) and random
test-only subnets, so it never meets a user's lab; its fixture deletes that
lab's namespaces and links by name afterwards, whatever happened. Traffic only
flows between the namespaces (and the LAN bridge) the test made.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import string
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lockstep.errors import LabError
from lockstep.lab.ledger import Ledger, LinkEntry
from lockstep.lab.topology import (
    AddVeth,
    LabPlan,
    NetlinkDriver,
    lab_down,
    lab_status,
    lab_up,
    plan_lab,
    plan_steps,
    vm_ip,
)
from lockstep.proc import run, which
from tests.helpers.net import ping_argv

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(which("ip") is None, reason="needs iproute2's ip to inspect the lab"),
]


# ── helpers ──────────────────────────────────────────────────────────────────


def ping(address: str, netns: str | None, *extra: str) -> None:
    """Ping once from ``netns`` (None: root namespace); CommandError if no answer."""
    run(ping_argv(address, *extra), netns=netns, timeout=10)


def root_links() -> set[str]:
    """Names of every link in the root namespace (``ip -o link``)."""
    return {
        line.split(":")[1].strip().split("@")[0]
        for line in run(["ip", "-o", "link"]).text.splitlines()
        if line.strip()
    }


def namespaces() -> set[str]:
    """Names of every named namespace (``ip netns list``)."""
    return {line.split()[0] for line in run(["ip", "netns", "list"]).text.splitlines() if line}


def lab_objects(lab: str) -> set[str]:
    """Every namespace and root-namespace link whose name belongs to lab ``lab``.

    Links inside a lab namespace vanish with it, so these are all a lab can leave.
    Other sessions may share this machine, so only the lab's own names are compared.
    """
    prefix = f"{lab}-"
    return {f"netns {n}" for n in namespaces() if n.startswith(prefix)} | {
        f"link {n}" for n in root_links() if n.startswith(prefix)
    }


def link_json(name: str, netns: str | None, *flags: str) -> dict[str, Any]:
    """``ip -j <flags> link show <name>`` as a dict."""
    out = run(["ip", "-j", *flags, "link", "show", name], netns=netns).text
    found: list[dict[str, Any]] = json.loads(out)
    return found[0]


def packets(name: str, netns: str, direction: str) -> int:
    """Packets counted by link ``name`` in ``direction`` ("tx" or "rx")."""
    return int(link_json(name, netns, "-s")["stats64"][direction]["packets"])


def scrub(plan: LabPlan) -> None:
    """Delete the lab's root links and namespaces by name, if they exist; never anything else."""
    present = root_links()
    for name in [plan.lan_bridge, *(h.root_veth for h in plan.hosts)]:
        if name in present:
            run(["ip", "link", "del", name], check=False)
    existing = namespaces()
    for netns in [plan.client.netns, *(h.netns for h in plan.hosts)]:
        if netns in existing:
            run(["ip", "netns", "del", netns], check=False)


def free_subnets() -> tuple[str, str]:
    """Two adjacent /24s in 10.200-250.x that no route of this machine touches."""
    with NetlinkDriver() as drv:
        routes = [r for r in drv.ipv4_routes() if r.prefixlen > 0]
    for _ in range(100):
        second, third = random.randint(200, 250), random.randrange(0, 254, 2)
        lan = ipaddress.IPv4Network(f"10.{second}.{third}.0/24")
        vms = ipaddress.IPv4Network(f"10.{second}.{third + 1}.0/24")
        if not any(r.overlaps(lan) or r.overlaps(vms) for r in routes):
            return str(lan), str(vms)
    pytest.skip("found no free test subnet in 10.200.0.0-10.250.255.255")


def unused_lab_name() -> str:
    """A test lab name, "lst" + 3 random characters, that no namespace or link uses yet."""
    for _ in range(50):
        name = "lst" + "".join(random.choices(string.ascii_lowercase + string.digits, k=3))
        if not lab_objects(name):
            return name
    pytest.skip("found no unused test lab name")


# ── fixtures ─────────────────────────────────────────────────────────────────


@pytest.fixture
def plan() -> Iterator[LabPlan]:
    """A 2-host plan with a unique name and free subnets; its objects are scrubbed afterwards."""
    name = unused_lab_name()
    lan, vms = free_subnets()
    made = plan_lab(2, name=name, lan_subnet=lan, vm_subnet=vms)
    yield made
    scrub(made)
    assert not lab_objects(name), "the fixture could not scrub the test lab"


@pytest.fixture
def ledger(tmp_path: Path, plan: LabPlan) -> Ledger:
    """The test lab's ledger, under the test's own folder."""
    return Ledger(tmp_path / "lab" / plan.name / "ledger.json")


@pytest.fixture
def lab(plan: LabPlan, ledger: Ledger) -> Iterator[LabPlan]:
    """The test lab, up; taken down from its ledger afterwards (the plan fixture scrubs too)."""
    lab_up(plan, ledger)
    yield plan
    if ledger.exists():
        lab_down(ledger)


# ── tests ────────────────────────────────────────────────────────────────────


def test_up_then_down_leaves_nothing(plan: LabPlan, ledger: Ledger) -> None:
    """lab_up makes the namespaces and links; lab_down removes exactly those, ledger included."""
    assert lab_objects(plan.name) == set()
    before_links, before_ns = root_links(), namespaces()

    t0 = time.monotonic()
    lab_up(plan, ledger)
    up_s = time.monotonic() - t0
    expected = {f"netns {n}" for n in [plan.client.netns, *(h.netns for h in plan.hosts)]} | {
        f"link {n}" for n in [plan.lan_bridge, *(h.root_veth for h in plan.hosts)]
    }
    assert lab_objects(plan.name) == expected
    assert lab_status(plan).complete
    assert lab_status(ledger).complete

    t0 = time.monotonic()
    removed = lab_down(ledger)
    down_s = time.monotonic() - t0
    print(f"\nlab_up {up_s * 1000:.0f} ms, lab_down {down_s * 1000:.0f} ms (2 hosts)")

    assert lab_objects(plan.name) == set()
    assert not ledger.exists()
    assert f"namespace {plan.hosts[0].netns}" in removed
    assert f"link {plan.lan_bridge} in the root namespace" in removed
    # Nothing the lab made is left, and nothing that was there before was touched.
    assert {n for n in root_links() - before_links if n.startswith(plan.name)} == set()
    assert {n for n in namespaces() - before_ns if n.startswith(plan.name)} == set()
    assert lab_status(plan).absent


def test_kernel_objects_match_the_plan(lab: LabPlan) -> None:
    """MTUs, addresses, enslavement, VXLAN settings, flood entries, no routes out, no forwarding."""
    lan = link_json(lab.lan_bridge, None, "-d")
    assert lan["mtu"] == 1550
    assert "UP" in lan["flags"]
    addrs = json.loads(run(["ip", "-j", "addr", "show", lab.lan_bridge]).text)[0]["addr_info"]
    assert {(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"} == {
        (lab.caller_ip, 24)
    }
    for h in lab.hosts:
        root_end = link_json(h.root_veth, None, "-d")
        assert (root_end["mtu"], root_end.get("master")) == (1550, lab.lan_bridge)
        lan0 = link_json(h.ns_veth, h.netns)
        assert lan0["mtu"] == 1550
        assert "UP" in lan0["flags"]
        assert "UP" in link_json("lo", h.netns)["flags"]
        vx = link_json(h.vxlan, h.netns, "-d")
        data = vx["linkinfo"]["info_data"]
        assert (data["id"], data["port"], data["local"], data["learning"]) == (
            lab.vni,
            4789,
            h.lan_ip,
            True,
        )
        assert (vx["mtu"], vx.get("master")) == (1500, h.vm_bridge)
        assert "UP" in link_json(h.vm_bridge, h.netns)["flags"]
        fdb = run(["bridge", "fdb", "show", "dev", h.vxlan], netns=h.netns).text
        flood = sorted(
            line.split()[2] for line in fdb.splitlines() if line.startswith("00:00:00:00:00:00")
        )
        assert flood == sorted(o.lan_ip for o in lab.hosts if o is not h)
        routes = json.loads(run(["ip", "-j", "route", "show"], netns=h.netns).text)
        assert [r["dst"] for r in routes] == [lab.lan_subnet]  # no default route
        forwarding = run(["cat", "/proc/sys/net/ipv4/ip_forward"], netns=h.netns).text.strip()
        assert forwarding == "0"
        vm_side = json.loads(run(["ip", "-j", "addr", "show", h.vm_bridge], netns=h.netns).text)
        assert vm_side[0]["addr_info"] == []  # the host puts nothing on the guests' segment
    c = lab.client
    cable = link_json(c.host_link, c.host_netns, "-d")
    assert (cable["mtu"], cable.get("master")) == (1500, c.bridge)
    nic = json.loads(run(["ip", "-j", "addr", "show", c.nic], netns=c.netns).text)[0]
    # Its address on the VM segment, and no IPv6 link-local: it sends only what it is told to.
    assert [(a["family"], a["local"], a["prefixlen"]) for a in nic["addr_info"]] == [
        ("inet", c.ip, 24)
    ]
    cable_addrs = json.loads(
        run(["ip", "-j", "addr", "show", c.host_link], netns=c.host_netns).text
    )
    assert cable_addrs[0]["addr_info"] == []


def test_hosts_reach_each_other_and_the_caller(lab: LabPlan) -> None:
    """Over the LAN: host to host both ways, and the caller (root namespace) to every host."""
    h1, h2 = lab.hosts
    ping(h2.lan_ip, h1.netns)
    ping(h1.lan_ip, h2.netns)
    ping(lab.caller_ip, h1.netns)
    for h in lab.hosts:
        ping(h.lan_ip, None)


def test_vm_bridges_form_one_segment_over_vxlan(lab: LabPlan) -> None:
    """A stand-in guest on each host's VM bridge reaches the other across vx0, 1500-byte frames too.

    The client outside the group reaches them too.
    """
    for i, h in enumerate(lab.hosts):
        ns = h.netns
        run(["ip", "link", "add", "tguest", "type", "veth", "peer", "name", "tport"], netns=ns)
        run(["ip", "link", "set", "tport", "master", h.vm_bridge, "up"], netns=ns)
        run(["ip", "addr", "add", f"{vm_ip(lab, i)}/24", "dev", "tguest"], netns=ns)
        run(["ip", "link", "set", "tguest", "up"], netns=ns)
    h1, h2 = lab.hosts
    sent = packets(h1.vxlan, h1.netns, "tx")
    got = packets(h2.vxlan, h2.netns, "rx")
    for _ in range(3):
        ping(vm_ip(lab, 1), h1.netns)
    ping(vm_ip(lab, 0), h2.netns)
    ping(vm_ip(lab, 1), h1.netns, "-s", "1472")  # a 1500-byte IP packet
    ping(vm_ip(lab, 1), lab.client.netns)  # the client, cabled to h1, reaches h2's stand-in
    # ARP + 4 echo requests at least went h1 -> vx0 -> LAN -> h2's vx0.
    assert packets(h1.vxlan, h1.netns, "tx") - sent >= 5
    assert packets(h2.vxlan, h2.netns, "rx") - got >= 5


def test_second_up_is_refused(lab: LabPlan, tmp_path: Path) -> None:
    """lab_up on a lab that exists is refused, naming `lockstep lab down`; the lab is untouched."""
    other = Ledger(tmp_path / "other.json")
    with pytest.raises(LabError, match=r"already exists.*lockstep lab down"):
        lab_up(lab, other)
    assert not other.exists()
    assert lab_status(lab).complete


def test_lan_overlapping_a_route_is_refused(lab: LabPlan, tmp_path: Path) -> None:
    """A second lab on the first one's LAN subnet overlaps its route and is refused up front."""
    name = unused_lab_name()
    twin = plan_lab(1, name=name, lan_subnet=lab.lan_subnet, vm_subnet=lab.vm_subnet)
    twin_ledger = Ledger(tmp_path / "twin.json")
    try:
        with pytest.raises(LabError, match=f"overlaps route {lab.lan_subnet}"):
            lab_up(twin, twin_ledger)
        assert lab_objects(name) == set()
        assert not twin_ledger.exists()
    finally:
        if twin_ledger.exists():  # only if it wrongly came up: remove what it made, no more
            lab_down(twin_ledger)


def test_crash_halfway_then_down_from_ledger_alone(plan: LabPlan, ledger: Ledger) -> None:
    """lab_up SIGKILLed midway (after recording an object, before making it): lab_down cleans all."""
    steps = plan_steps(plan)
    h2 = plan.hosts[1]
    crash_at = next(
        i for i, s in enumerate(steps, 1) if isinstance(s.op, AddVeth) and s.op.name == h2.root_veth
    )
    script = f"""
import os, signal
from lockstep.lab import topology
from lockstep.lab.ledger import Ledger

plan = topology.plan_lab(2, name={plan.name!r}, lan_subnet={plan.lan_subnet!r},
                         vm_subnet={plan.vm_subnet!r})
calls = 0
real_apply = topology.NetlinkDriver.apply

def dying_apply(self, op):
    global calls
    calls += 1
    if calls == {crash_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    real_apply(self, op)

topology.NetlinkDriver.apply = dying_apply
topology.lab_up(plan, Ledger({str(ledger.path)!r}))
"""
    done = run([sys.executable, "-c", script], check=False, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()

    # Half a lab: host 1 complete, host 2's namespace made, its cable recorded but not made.
    assert ledger.exists()
    assert LinkEntry(h2.root_veth, None) in ledger.entries()
    assert lab_objects(plan.name) == {
        f"netns {plan.hosts[0].netns}",
        f"netns {h2.netns}",
        f"link {plan.lan_bridge}",
        f"link {plan.hosts[0].root_veth}",
    }

    removed = lab_down(ledger)
    assert lab_objects(plan.name) == set()
    assert not ledger.exists()
    assert f"namespace {h2.netns}" in removed


def test_failed_step_rolls_back_on_the_real_kernel(
    plan: LabPlan, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step failing for real (a bad VXLAN device) leaves no namespace, link or ledger behind."""
    import lockstep.lab.topology as topology

    real = topology.plan_steps

    def broken(p: LabPlan) -> list[topology.Step]:
        steps = real(p)
        return [
            topology.Step(
                topology.AddVxlan(
                    s.op.name, s.op.netns, s.op.vni, s.op.port, s.op.local, "nosuchdev", s.op.mtu
                ),
                s.creates,
            )
            if isinstance(s.op, topology.AddVxlan) and s.op.netns == p.hosts[1].netns
            else s
            for s in steps
        ]

    monkeypatch.setattr(topology, "plan_steps", broken)
    with pytest.raises(LabError, match=r"did not come up.*nosuchdev.*removed again"):
        lab_up(plan, ledger)
    assert lab_objects(plan.name) == set()
    assert not ledger.exists()
