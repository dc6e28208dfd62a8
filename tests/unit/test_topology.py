"""The lab topology without a kernel: planning, step order, and up/down/status on a fake driver."""

from __future__ import annotations

import errno
import ipaddress
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lockstep.errors import ConfigError, LabError, NetError
from lockstep.lab.ledger import Entry, Ledger, LinkEntry, NetnsEntry, PathEntry, ProcessEntry
from lockstep.lab.topology import (
    AddAddress,
    AddBridge,
    AddVeth,
    AddVxlan,
    AppendFdb,
    CreateNetns,
    LinkState,
    NetlinkDriver,
    Op,
    SetMaster,
    SetUp,
    lab_down,
    lab_status,
    lab_up,
    plan_lab,
    plan_objects,
    plan_steps,
    vm_ip,
)

# ── a fake kernel ────────────────────────────────────────────────────────────


@dataclass
class FakeLink:
    """One link of the fake kernel."""

    kind: str
    mtu: int = 1500
    up: bool = False
    master: str | None = None
    peer: tuple[str | None, str] | None = None  # (netns, name) of a veth's other end
    addresses: list[str] = field(default_factory=list)
    flood_to: list[str] = field(default_factory=list)
    vxlan: dict[str, object] = field(default_factory=dict)


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so lab_up does not roll back."""


def _creates(op: Op) -> list[Entry]:
    """What an op brings into being, as ledger entries."""
    match op:
        case CreateNetns(name=name):
            return [NetnsEntry(name)]
        case AddVeth(name=name, peer=peer, peer_netns=pns, netns=ns):
            return [LinkEntry(name, ns), LinkEntry(peer, pns)]
        case AddBridge(name=name, netns=ns) | AddVxlan(name=name, netns=ns):
            return [LinkEntry(name, ns)]
    return []


class FakeKernel:
    """A LabDriver keeping namespaces and links in memory.

    With ``ledger`` set, every op that creates something first checks that the
    ledger *file* already lists it: the append-before-create rule.
    """

    def __init__(self, ledger: Ledger | None = None, routes: tuple[str, ...] = ()) -> None:
        self.namespaces: set[str] = set()
        self.links: dict[tuple[str | None, str], FakeLink] = {(None, "lo"): FakeLink("loopback")}
        self.routes = [ipaddress.IPv4Network(r) for r in routes]
        self.ledger = ledger
        self.applied: list[Op] = []
        self.deleted: list[str] = []
        self.fail_at: int | None = None  # 1-based index of the apply that fails
        self.failure: BaseException = NetError("the fake kernel refused")
        self.undeletable: set[str] = set()

    # LabDriver
    def ipv4_routes(self) -> list[ipaddress.IPv4Network]:
        """Routes as configured, plus the connected routes of addresses in the root."""
        connected = [
            ipaddress.IPv4Interface(a).network
            for (ns, _), link in self.links.items()
            if ns is None
            for a in link.addresses
        ]
        return [*self.routes, *connected]

    def netns_exists(self, name: str) -> bool:
        """Whether the fake namespace exists."""
        return name in self.namespaces

    def link(self, name: str, netns: str | None) -> LinkState | None:
        """A LinkState for the fake link, or None."""
        found = self.links.get((netns, name))
        if found is None:
            return None
        return LinkState(name, netns, found.kind, found.up, "UP", found.mtu, found.master)

    def apply(self, op: Op) -> None:
        """Mutate the fake kernel as the real one would, or fail as told."""
        self.applied.append(op)
        if self.fail_at == len(self.applied):
            raise self.failure
        if self.ledger is not None:
            on_disk = Ledger(self.ledger.path).entries()
            for entry in _creates(op):
                assert entry in on_disk, f"{entry} made before it was recorded"
        match op:
            case CreateNetns(name=name):
                self._absent(None, name, is_netns=True)
                self.namespaces.add(name)
                self.links[(name, "lo")] = FakeLink("loopback")
            case AddVeth(name=name, peer=peer, peer_netns=pns, mtu=mtu, netns=ns):
                self._need_ns(ns)
                self._need_ns(pns)
                self._absent(ns, name)
                self._absent(pns, peer)
                self.links[(ns, name)] = FakeLink("veth", mtu, peer=(pns, peer))
                self.links[(pns, peer)] = FakeLink("veth", mtu, peer=(ns, name))
            case AddBridge(name=name, netns=ns, mtu=mtu):
                self._need_ns(ns)
                self._absent(ns, name)
                self.links[(ns, name)] = FakeLink("bridge", mtu)
            case AddVxlan(name=name, netns=ns, mtu=mtu, dev=dev, vni=vni, local=local):
                self._need_ns(ns)
                self._absent(ns, name)
                assert self._get(ns, dev).mtu >= mtu + 50, "vxlan made on a link with a small MTU"
                self.links[(ns, name)] = FakeLink("vxlan", mtu, vxlan={"vni": vni, "local": local})
            case AddAddress(link=link, netns=ns, address=address, prefixlen=plen):
                self._get(ns, link).addresses.append(f"{address}/{plen}")
            case SetMaster(link=link, netns=ns, master=master):
                assert self._get(ns, master).kind == "bridge"
                self._get(ns, link).master = master
            case SetUp(link=link, netns=ns):
                self._get(ns, link).up = True
            case AppendFdb(link=link, netns=ns, dst=dst):
                self._get(ns, link).flood_to.append(dst)

    def delete_link(self, name: str, netns: str | None) -> bool:
        """Delete a fake link (and its veth peer); False if absent."""
        if name in self.undeletable:
            raise NetError(f"could not delete link {name}: Operation not permitted")
        link = self.links.pop((netns, name), None)
        if link is None:
            return False
        if link.peer is not None:
            self.links.pop(link.peer, None)
        self.deleted.append(f"link {name}@{netns}")
        return True

    def delete_netns(self, name: str) -> bool:
        """Delete a fake namespace and every link in it; False if absent."""
        if name not in self.namespaces:
            return False
        self.namespaces.remove(name)
        for key in [k for k in self.links if k[0] == name]:
            link = self.links.pop(key)
            if link.peer is not None:
                self.links.pop(link.peer, None)
        self.deleted.append(f"netns {name}")
        return True

    def close(self) -> None:
        """Nothing to release."""

    # helpers
    def _need_ns(self, ns: str | None) -> None:
        if ns is not None and ns not in self.namespaces:
            raise NetError(f"namespace {ns} does not exist")

    def _absent(self, ns: str | None, name: str, *, is_netns: bool = False) -> None:
        taken = name in self.namespaces if is_netns else (ns, name) in self.links
        if taken:
            err = FileExistsError(errno.EEXIST, "File exists")
            raise NetError(f"{name} exists") from err

    def _get(self, ns: str | None, name: str) -> FakeLink:
        self._need_ns(ns)
        link = self.links.get((ns, name))
        if link is None:
            raise NetError(f"link {name} does not exist in {ns}")
        return link

    def lab_leftovers(self, lab: str) -> list[str]:
        """Every namespace or root link whose name belongs to lab ``lab``."""
        return sorted(
            [n for n in self.namespaces if n.startswith(f"{lab}-")]
            + [name for (ns, name) in self.links if ns is None and name.startswith(f"{lab}-")]
        )


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    """A ledger under the test's own folder."""
    return Ledger(tmp_path / "lab" / "lslab" / "ledger.json")


@pytest.fixture
def kernel(ledger: Ledger) -> FakeKernel:
    """A fake kernel that checks the ledger before every creation, with a default route."""
    return FakeKernel(ledger, routes=("0.0.0.0/0", "192.0.2.0/24"))


# ── planning ─────────────────────────────────────────────────────────────────


def test_default_plan_names_and_addresses() -> None:
    """The default lab: 2 hosts, documented names, caller on .1, hosts on .11/.12, MTU 1550."""
    plan = plan_lab()
    assert plan.name == "lslab"
    assert plan.lan_bridge == "lslab-lan"
    assert plan.caller_ip == "10.123.0.1"
    assert plan.lan_subnet == "10.123.0.0/24"
    assert plan.vm_subnet == "10.124.0.0/24"
    assert (plan.vni, plan.vxlan_port, plan.mtu, plan.vm_mtu) == (4242, 4789, 1550, 1500)
    h1, h2 = plan.hosts
    assert (h1.name, h1.netns, h1.lan_ip, h1.root_veth) == (
        "h1",
        "lslab-h1",
        "10.123.0.11",
        "lslab-h1",
    )
    assert (h1.ns_veth, h1.vm_bridge, h1.vxlan) == ("lan0", "lsvm", "vx0")
    assert (h2.netns, h2.lan_ip) == ("lslab-h2", "10.123.0.12")
    assert plan.host("h2") is h2
    with pytest.raises(LabError, match="no host"):
        plan.host("h3")


@pytest.mark.parametrize("hosts", [1, 2, 7, 16])
@pytest.mark.parametrize("name", ["a", "lslab", "abcdefghijk"])
def test_link_names_fit_the_kernel_and_are_unique(hosts: int, name: str) -> None:
    """Every link name is at most 15 characters and unique where it lives; namespaces too."""
    plan = plan_lab(hosts, name=name)
    objects = plan_objects(plan)
    links = [e for e in objects if isinstance(e, LinkEntry)]
    assert all(len(e.name) <= 15 for e in links)
    assert len({(e.netns, e.name) for e in links}) == len(links)
    namespaces = [e.name for e in objects if isinstance(e, NetnsEntry)]
    assert len(set(namespaces)) == hosts + 1  # and the client
    assert all(n.startswith(f"{name}-") for n in namespaces)
    root_links = [e.name for e in links if e.netns is None]
    assert all(n.startswith(f"{name}-") for n in root_links)
    assert len({h.lan_ip for h in plan.hosts} | {plan.caller_ip}) == hosts + 1


def test_custom_subnets_and_prefix() -> None:
    """Addresses follow the given subnets and the LAN's prefix length."""
    plan = plan_lab(3, name="t", lan_subnet="172.30.5.0/27", vm_subnet="192.168.77.0/26")
    assert plan.caller_ip == "172.30.5.1"
    assert [h.lan_ip for h in plan.hosts] == ["172.30.5.11", "172.30.5.12", "172.30.5.13"]
    assert plan.prefixlen == 27
    adds = [s.op for s in plan_steps(plan) if isinstance(s.op, AddAddress)]
    assert {a.prefixlen for a in adds if a.link != "eth0"} == {27}
    assert (plan.client.ip, plan.client.prefixlen) == ("192.168.77.2", 26)
    assert [a.address for a in adds if a.link == "eth0"] == ["192.168.77.2"]


def test_the_client_is_outside_the_group_on_the_vm_segment() -> None:
    """The client: a namespace of its own at .2 of the VM subnet, cabled to h1's VM bridge.

    Neither end of its cable gets an IPv6 link-local address, so it puts no
    frame of its own on the guests' segment.
    """
    plan = plan_lab(3, name="t")
    c = plan.client
    assert (c.netns, c.ip, c.prefixlen, c.nic) == ("t-client", "10.124.0.2", 24, "eth0")
    assert (c.host_netns, c.host_link, c.bridge) == ("t-h1", "client0", "lsvm")
    cables = [s.op for s in plan_steps(plan) if isinstance(s.op, AddVeth) and s.op.quiet]
    assert cables == [AddVeth("client0", "eth0", "t-client", 1500, netns="t-h1", quiet=True)]
    assert SetMaster("client0", "t-h1", "lsvm") in [s.op for s in plan_steps(plan)]
    assert c.ip not in {vm_ip(plan, i) for i in range(8)}


def test_vm_ip_counts_from_11() -> None:
    """Guest i gets .11+i on the VM segment; an index outside the subnet is refused."""
    plan = plan_lab()
    assert vm_ip(plan, 0) == "10.124.0.11"
    assert vm_ip(plan, 3) == "10.124.0.14"
    assert vm_ip(plan, 243) == "10.124.0.254"
    for bad in (-1, 244):
        with pytest.raises(ConfigError, match="no address"):
            vm_ip(plan, bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hosts": 0}, "1 to 16 hosts"),
        ({"hosts": 17}, "1 to 16 hosts"),
        ({"hosts": True}, "1 to 16 hosts"),
        ({"name": ""}, "lab name"),
        ({"name": "Lab"}, "lab name"),
        ({"name": "1lab"}, "lab name"),
        ({"name": "my-lab"}, "lab name"),
        ({"name": "abcdefghijkl"}, "lab name"),
        ({"lan_subnet": "10.123.0.1/24"}, "not an IPv4 network"),
        ({"lan_subnet": "fd00::/64"}, "not an IPv4 network"),
        ({"lan_subnet": "8.8.8.0/24"}, "not a private range"),
        ({"lan_subnet": "10.123.0.0/29"}, "no room for 2 hosts"),
        ({"hosts": 16, "lan_subnet": "10.123.0.0/28"}, "no room for 16 hosts"),
        ({"vm_subnet": "10.124.0.0/29"}, "no room for guests"),
        ({"vm_subnet": "10.123.0.0/25"}, "overlap"),
    ],
)
def test_plan_validation(kwargs: dict[str, object], message: str) -> None:
    """Bad counts, names and subnets are refused with a ConfigError that says what is wrong."""
    with pytest.raises(ConfigError, match=message):
        plan_lab(**kwargs)  # type: ignore[arg-type]


def test_steps_record_objects_before_their_use() -> None:
    """Each object is created (and so recorded) before any step uses it; lan0 has MTU 1550 first."""
    plan = plan_lab(3)
    made: set[tuple[str | None, str]] = {(None, "lo")}
    namespaces: set[str] = set()
    for step in plan_steps(plan):
        op = step.op
        for entry in step.creates:
            if isinstance(entry, NetnsEntry):
                namespaces.add(entry.name)
            elif isinstance(entry, LinkEntry):
                assert entry.netns is None or entry.netns in namespaces
                made.add((entry.netns, entry.name))
        if isinstance(op, SetUp) and op.link == "lo":
            assert op.netns in namespaces
        elif isinstance(op, AddAddress | SetUp | AppendFdb):
            assert (op.netns, op.link) in made
        elif isinstance(op, SetMaster):
            assert {(op.netns, op.link), (op.netns, op.master)} <= made
        elif isinstance(op, AddVxlan):
            assert (op.netns, op.dev) in made
            assert op.mtu == plan.mtu - 50


def test_every_host_floods_to_every_other_host() -> None:
    """Head-end replication: each vx0 has one flood entry per other host, none to itself."""
    plan = plan_lab(4)
    fdb = [s.op for s in plan_steps(plan) if isinstance(s.op, AppendFdb)]
    assert len(fdb) == 4 * 3
    for h in plan.hosts:
        dsts = sorted(f.dst for f in fdb if f.netns == h.netns)
        assert dsts == sorted(o.lan_ip for o in plan.hosts if o is not h)


# ── up, down, status on the fake kernel ──────────────────────────────────────


def test_lab_up_builds_the_topology_recording_first(ledger: Ledger, kernel: FakeKernel) -> None:
    """lab_up makes the documented topology; the fake checks the file lists each object first."""
    plan = plan_lab(2)
    lab_up(plan, ledger, driver=kernel)
    assert kernel.namespaces == {"lslab-h1", "lslab-h2", "lslab-client"}
    lan = kernel.links[(None, "lslab-lan")]
    assert (lan.kind, lan.up, lan.mtu, lan.addresses) == ("bridge", True, 1550, ["10.123.0.1/24"])
    for h in plan.hosts:
        root_end = kernel.links[(None, h.root_veth)]
        assert (root_end.master, root_end.up, root_end.mtu) == ("lslab-lan", True, 1550)
        lan0 = kernel.links[(h.netns, "lan0")]
        assert (lan0.up, lan0.mtu, lan0.addresses) == (True, 1550, [f"{h.lan_ip}/24"])
        assert kernel.links[(h.netns, "lo")].up
        vx0 = kernel.links[(h.netns, "vx0")]
        assert (vx0.master, vx0.up, vx0.mtu) == ("lsvm", True, 1500)
        assert vx0.vxlan == {"vni": 4242, "local": h.lan_ip}
        assert vx0.flood_to == [o.lan_ip for o in plan.hosts if o is not h]
        assert kernel.links[(h.netns, "lsvm")].up
    cable = kernel.links[("lslab-h1", "client0")]
    assert (cable.master, cable.up, cable.peer) == ("lsvm", True, ("lslab-client", "eth0"))
    client = kernel.links[("lslab-client", "eth0")]
    assert (client.up, client.mtu, client.addresses) == (True, 1500, ["10.124.0.2/24"])
    assert kernel.links[("lslab-client", "lo")].up
    assert ledger.entries() == plan_objects(plan)
    assert lab_status(plan, driver=kernel).complete


def test_lab_up_refuses_an_existing_lab(ledger: Ledger, kernel: FakeKernel) -> None:
    """An object of the lab already there: refused, naming `lockstep lab down`; nothing touched."""
    kernel.links[(None, "lslab-lan")] = FakeLink("bridge")
    with pytest.raises(LabError, match=r"already exists.*lockstep lab down"):
        lab_up(plan_lab(), ledger, driver=kernel)
    assert kernel.applied == []
    assert not ledger.exists()


def test_lab_up_refuses_when_a_ledger_is_left(ledger: Ledger, kernel: FakeKernel) -> None:
    """A ledger from an earlier run means something may be left: refused before any change."""
    ledger.record(NetnsEntry("lslab-h1"))
    with pytest.raises(LabError, match=r"ledger from an earlier run.*lockstep lab down"):
        lab_up(plan_lab(), ledger, driver=kernel)
    assert kernel.applied == []
    assert ledger.entries() == [NetnsEntry("lslab-h1")]


@pytest.mark.parametrize(
    "route", ["10.0.0.0/8", "10.123.0.0/24", "10.123.0.128/25", "10.123.0.7/32"]
)
def test_lab_up_refuses_a_lan_that_overlaps_a_route(ledger: Ledger, route: str) -> None:
    """A LAN overlapping any non-default route of the machine is refused before any change."""
    kernel = FakeKernel(ledger, routes=("0.0.0.0/0", route))
    with pytest.raises(LabError, match=f"overlaps route {route}"):
        lab_up(plan_lab(), ledger, driver=kernel)
    assert kernel.applied == []


def test_second_lab_on_the_same_lan_is_refused(tmp_path: Path) -> None:
    """A second lab with the first one's LAN subnet overlaps the first's connected route."""
    kernel = FakeKernel()
    lab_up(plan_lab(name="one"), Ledger(tmp_path / "one.json"), driver=kernel)
    with pytest.raises(LabError, match="overlaps"):
        lab_up(plan_lab(name="two"), Ledger(tmp_path / "two.json"), driver=kernel)


def test_failed_step_rolls_everything_back(ledger: Ledger, kernel: FakeKernel) -> None:
    """A step the kernel refuses: lab_up removes what it made and the ledger, and says so."""
    kernel.fail_at = 12
    with pytest.raises(LabError, match=r"did not come up.*removed again") as info:
        lab_up(plan_lab(), ledger, driver=kernel)
    assert isinstance(info.value.__cause__, NetError)
    assert kernel.lab_leftovers("lslab") == []
    assert not ledger.exists()


def test_name_taken_meanwhile_is_not_removed(ledger: Ledger, kernel: FakeKernel) -> None:
    """A name taken by someone else after the check (EEXIST): that object is never removed."""
    real_apply = kernel.apply

    def race(op: Op) -> None:
        if isinstance(op, AddVeth) and op.name == "lslab-h2":
            kernel.links[(None, "lslab-h2")] = FakeLink("someone-elses")
        real_apply(op)

    kernel.apply = race  # type: ignore[method-assign]
    with pytest.raises(LabError, match="did not come up"):
        lab_up(plan_lab(), ledger, driver=kernel)
    assert kernel.lab_leftovers("lslab") == ["lslab-h2"]
    assert kernel.links[(None, "lslab-h2")].kind == "someone-elses"
    assert not ledger.exists()


def _step_count() -> int:
    return len(plan_steps(plan_lab(2)))


@pytest.mark.parametrize("crash_at", range(1, _step_count() + 1))
def test_lab_down_after_a_crash_at_any_step(
    ledger: Ledger, kernel: FakeKernel, crash_at: int
) -> None:
    """Dying before any step leaves a ledger from which lab_down removes everything made."""
    kernel.fail_at = crash_at
    kernel.failure = Crash()
    with pytest.raises(Crash):
        lab_up(plan_lab(2), ledger, driver=kernel)
    assert ledger.exists()
    lab_down(ledger, driver=kernel)
    assert kernel.lab_leftovers("lslab") == []
    assert set(kernel.links) == {(None, "lo")}
    assert not ledger.exists()


def test_lab_down_goes_in_reverse_and_reports(ledger: Ledger, kernel: FakeKernel) -> None:
    """lab_down removes newest first (links before their namespace, LAN bridge last)."""
    lab_up(plan_lab(2), ledger, driver=kernel)
    removed = lab_down(ledger, driver=kernel)
    assert kernel.deleted == [
        "link eth0@lslab-client",
        "netns lslab-client",
        "link vx0@lslab-h2",
        "link lsvm@lslab-h2",
        "link lan0@lslab-h2",
        "netns lslab-h2",
        "link vx0@lslab-h1",
        "link lsvm@lslab-h1",
        "link lan0@lslab-h1",
        "netns lslab-h1",
        "link lslab-lan@None",
    ]
    assert removed[0] == "link eth0 in namespace lslab-client"
    assert removed[-1] == "link lslab-lan in the root namespace"
    assert not ledger.exists()
    assert lab_status(plan_lab(2), driver=kernel).absent


def test_lab_down_skips_what_is_gone(ledger: Ledger, kernel: FakeKernel) -> None:
    """Entries whose objects never existed or are gone are skipped; the ledger is deleted."""
    for entry in plan_objects(plan_lab(2)):
        ledger.record(entry)
    assert lab_down(ledger, driver=kernel) == []
    assert not ledger.exists()
    assert lab_down(ledger, driver=kernel) == []  # no ledger: nothing to do


def test_lab_down_keeps_the_ledger_if_something_stays(ledger: Ledger, kernel: FakeKernel) -> None:
    """An object that cannot be removed is reported; all others are removed; the ledger stays."""
    lab_up(plan_lab(2), ledger, driver=kernel)
    kernel.undeletable = {"lslab-lan"}
    with pytest.raises(LabError, match=r"lslab-lan.*lockstep lab down"):
        lab_down(ledger, driver=kernel)
    assert kernel.lab_leftovers("lslab") == ["lslab-lan"]
    assert ledger.exists()
    kernel.undeletable = set()
    lab_down(ledger, driver=kernel)
    assert kernel.lab_leftovers("lslab") == []


def test_lab_status_from_ledger(ledger: Ledger, kernel: FakeKernel) -> None:
    """Status from a ledger lists its entries with exists/up; JSON-ready."""
    lab_up(plan_lab(1), ledger, driver=kernel)
    kernel.links[("lslab-h1", "vx0")].up = False
    status = lab_status(ledger, driver=kernel)
    assert not status.complete
    assert not status.absent
    down = [o for o in status.objects if not o.up]
    assert [(o.kind, o.name, o.netns, o.exists) for o in down] == [
        ("link", "vx0", "lslab-h1", True)
    ]
    doc = status.to_json()
    assert doc["complete"] is False
    assert {"kind": "netns", "name": "lslab-h1", "netns": None, "exists": True, "up": True} in doc[
        "objects"
    ]


# ── processes and paths ──────────────────────────────────────────────────────


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A sleeping child process, killed and reaped whatever the test does."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def test_lab_down_stops_a_recorded_process(ledger: Ledger, child: subprocess.Popen[bytes]) -> None:
    """A recorded process whose start time matches gets SIGTERM and is reported removed."""
    entry = ProcessEntry.of(child.pid, "sleeper")
    ledger.record(entry)
    removed = lab_down(ledger, driver=FakeKernel(), grace=5)
    assert child.wait(timeout=5) == -signal.SIGTERM
    assert removed == [f"process {child.pid} (sleeper)"]


def test_lab_down_spares_a_reused_pid(ledger: Ledger, child: subprocess.Popen[bytes]) -> None:
    """Same pid, other start time: another process now; never signalled, not reported."""
    entry = ProcessEntry.of(child.pid, "old")
    ledger.record(ProcessEntry(child.pid, entry.starttime - 1, "old"))
    assert lab_down(ledger, driver=FakeKernel(), grace=0.2) == []
    assert child.poll() is None
    assert not ledger.exists()


def test_lab_down_kills_a_process_that_ignores_sigterm(ledger: Ledger) -> None:
    """A process ignoring SIGTERM is SIGKILLed once the grace period is over."""
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print(1, flush=True); time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == b"1\n"
        ledger.record(ProcessEntry.of(p.pid, "stubborn"))
        lab_down(ledger, driver=FakeKernel(), grace=0.3)
        assert p.wait(timeout=5) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()


def test_lab_down_removes_recorded_paths(ledger: Ledger, tmp_path: Path) -> None:
    """Path entries: a file and a whole tree are deleted; a missing one is skipped."""
    tree = tmp_path / "run" / "h1"
    (tree / "deep").mkdir(parents=True)
    (tree / "deep" / "x").write_text("x")
    single = tmp_path / "group.toml"
    single.write_text("x")
    for p in (tree, single, tmp_path / "never"):
        ledger.record(PathEntry(str(p)))
    removed = lab_down(ledger, driver=FakeKernel())
    assert removed == [f"path {single}", f"path {tree}"]
    assert not tree.exists()
    assert not single.exists()
    assert (tmp_path / "run").exists()


def test_netlink_driver_refuses_a_running_event_loop() -> None:
    """pyroute2's sync API cannot run inside an asyncio loop: a clear RuntimeError, not a hang."""
    import asyncio

    async def inside() -> None:
        NetlinkDriver()

    with pytest.raises(RuntimeError, match=r"asyncio\.to_thread"):
        asyncio.run(inside())
    NetlinkDriver().close()  # outside a loop it is fine
