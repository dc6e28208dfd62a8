"""The lab's network: hosts as network namespaces on one LAN, their VM bridges on one L2 segment.

::

    root namespace                        host namespace <lab>-hN (one per host)
    ──────────────                        ─────────────────────────────────────
    <lab>-lan  bridge, caller_ip/24       lo            up
      ├── <lab>-h1 ── veth ──────────────  lan0         lan_ip/24, MTU 1550
      └── <lab>-h2 ── veth ── ...          vx0          VXLAN vni 4242 over lan0 ─┐
                                           lsvm         the VM bridge, vx0 in it  │
                                                                                  │
    every vx0 floods to every other host's lan_ip (head-end replication) ◄───────┘

    client namespace <lab>-client: a machine outside the group on the guests' segment
      eth0  client_ip (.2 of the VM subnet) ── veth ── client0 in the VM bridge of h1

The caller (root namespace) reaches every host's execd over the LAN bridge. The
VM bridges of all hosts form one L2 segment over VXLAN, so guests on different
hosts share a LAN as if on one switch; the LAN MTU is 1550 so that segment
carries 1500-byte guest frames. Nothing is routed to the machine's real network:
no default route, no forwarding, no NAT. The VM bridge and vx0 get no IPv6
link-local address, so the hosts themselves put no frame on the guests' segment.

The client stands for what talks to a cluster from outside it (a router, a
user): it is in no group, so a save or restore never touches it, and its ARP
cache (``ip -n <lab>-client neigh``) shows which MAC it sends each address to.
It too has no IPv6 link-local address: it sends only what it is told to.

Shape of the code: :func:`plan_lab` and :func:`plan_steps` are pure (names,
addresses, the ordered list of changes); :func:`lab_up` records each object in
the :class:`~lockstep.lab.ledger.Ledger` *before* a :class:`LabDriver` makes it,
so :func:`lab_down` can remove everything after a crash at any point. The real
driver, :class:`NetlinkDriver`, speaks netlink through pyroute2; tests use fakes.

pyroute2's synchronous ``IPRoute`` runs its own event loop, so these functions
must not be called from a coroutine: use ``asyncio.to_thread`` there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import re
import select
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from lockstep.errors import ConfigError, LabError, LockstepError, NetError
from lockstep.lab.ledger import (
    Entry,
    Ledger,
    LinkEntry,
    NetnsEntry,
    PathEntry,
    ProcessEntry,
    process_starttime,
)

__all__ = [
    "DEFAULT_LAB_NAME",
    "LAN_MTU",
    "MAX_HOSTS",
    "VM_BRIDGE",
    "VXLAN_PORT",
    "AddAddress",
    "AddBridge",
    "AddVeth",
    "AddVxlan",
    "AppendFdb",
    "ClientPlan",
    "CreateNetns",
    "HostPlan",
    "LabDriver",
    "LabPlan",
    "LabStatus",
    "LinkState",
    "NetlinkDriver",
    "ObjectStatus",
    "client_netns",
    "Op",
    "SetMaster",
    "SetUp",
    "Step",
    "lab_down",
    "lab_status",
    "lab_up",
    "plan_lab",
    "plan_objects",
    "client_steps",
    "plan_steps",
    "vm_ip",
]

DEFAULT_LAB_NAME = "lslab"
MAX_HOSTS = 16
LAN_MTU = 1550
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
VXLAN_PORT = 4789
VNI = 4242
VM_BRIDGE = "lsvm"
VXLAN_LINK = "vx0"
NS_VETH = "lan0"
HOST_OFFSET = 10  # host i (from 1) is .10+i on the LAN
GUEST_OFFSET = 11  # guest i (from 0) is .11+i on the VM segment
CLIENT_OFFSET = 2  # the client outside the group is .2 on the VM segment
CLIENT_LINK = "client0"  # the client's cable, at the first host's VM bridge
CLIENT_NIC = "eth0"  # the client's cable, in the client
MAX_LINK_NAME = 15  # the kernel's IFNAMSIZ (16) less the closing NUL
DEFAULT_GRACE = 5.0  # seconds a recorded process gets between SIGTERM and SIGKILL

# Letters and digits only: "-" separates the parts of every name the lab makes,
# so lab "a" host "h1" can never be mistaken for part of a lab named "a-h1".
_NAME = re.compile(r"[a-z][a-z0-9]*\Z")
_MAX_NAME = MAX_LINK_NAME - len(f"-h{MAX_HOSTS}")


# ── the plan (pure) ──────────────────────────────────────────────────────────


@dataclass(frozen=True)
class HostPlan:
    """One lab host: its namespace, LAN address and the names of its links."""

    name: str  # "h1"
    netns: str  # "lslab-h1"
    lan_ip: str  # "10.123.0.11"
    root_veth: str  # root namespace end of its LAN cable, "lslab-h1"
    ns_veth: str  # the host's end, "lan0"
    vm_bridge: str  # "lsvm": VM taps are added to it
    vxlan: str  # "vx0", enslaved to vm_bridge


def client_netns(lab: str) -> str:
    """The namespace of lab ``lab``'s client, the machine outside the group."""
    return f"{lab}-client"


@dataclass(frozen=True)
class ClientPlan:
    """The machine outside the group: a namespace cabled to the first host's VM bridge."""

    netns: str  # "lslab-client"
    ip: str  # "10.124.0.2", on the VM segment
    prefixlen: int  # the VM subnet's
    nic: str  # "eth0", in netns
    host_netns: str  # "lslab-h1": whose VM bridge its cable joins
    host_link: str  # "client0": the cable's end there
    bridge: str  # "lsvm"


@dataclass(frozen=True)
class LabPlan:
    """Everything the lab's network is, as names and addresses; made by :func:`plan_lab`."""

    name: str  # "lslab": prefix of every namespace and root-namespace link
    hosts: list[HostPlan]
    lan_bridge: str  # "lslab-lan", in the root namespace, carrying caller_ip
    caller_ip: str  # "10.123.0.1": where the caller reaches every execd from
    lan_subnet: str  # "10.123.0.0/24"
    vm_subnet: str  # "10.124.0.0/24": guests only, on no host interface
    vni: int  # 4242
    mtu: int  # 1550 on the LAN, so the VXLAN segment carries 1500-byte frames
    client: ClientPlan
    vxlan_port: int = VXLAN_PORT  # 4789

    @property
    def prefixlen(self) -> int:
        """Prefix length of the LAN, for the addresses on it."""
        return ipaddress.IPv4Network(self.lan_subnet).prefixlen

    @property
    def vm_mtu(self) -> int:
        """MTU of the VM segment: what a VXLAN frame leaves of the LAN MTU (1500)."""
        return self.mtu - VXLAN_OVERHEAD

    def host(self, name: str) -> HostPlan:
        """The host called ``name``.

        Raises:
            LabError: the lab has no such host.
        """
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"lab {self.name} has no host {name!r}")


def plan_lab(
    hosts: int = 2,
    *,
    name: str = DEFAULT_LAB_NAME,
    lan_subnet: str = "10.123.0.0/24",
    vm_subnet: str = "10.124.0.0/24",
) -> LabPlan:
    """Name and address every object of a lab of ``hosts`` hosts; no I/O.

    Raises:
        ConfigError: a value is out of range: 1..16 hosts, a name of 1..11 lower-case
            letters and digits starting with a letter, private IPv4 subnets given as
            networks (host bits zero) that do not overlap, a LAN with room for every
            host and a VM segment with room for a guest.
    """
    if isinstance(hosts, bool) or not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
        raise ConfigError(f"a lab has 1 to {MAX_HOSTS} hosts, not {hosts!r}")
    if not _NAME.match(name) or len(name) > _MAX_NAME:
        raise ConfigError(
            f"lab name {name!r} must be 1 to {_MAX_NAME} lower-case letters and digits, "
            "starting with a letter (it prefixes link names, which the kernel caps at 15)"
        )
    lan = _subnet("LAN", lan_subnet)
    vms = _subnet("VM", vm_subnet)
    if lan.overlaps(vms):
        raise ConfigError(f"the LAN subnet {lan} and the VM subnet {vms} overlap")
    if HOST_OFFSET + hosts >= lan.num_addresses - 1:
        raise ConfigError(f"the LAN subnet {lan} has no room for {hosts} hosts at .11 and up")
    if vms.num_addresses - 1 <= GUEST_OFFSET:
        raise ConfigError(f"the VM subnet {vms} has no room for guests at .11 and up")
    client = ClientPlan(
        netns=client_netns(name),
        ip=str(vms[CLIENT_OFFSET]),
        prefixlen=vms.prefixlen,
        nic=CLIENT_NIC,
        host_netns=f"{name}-h1",
        host_link=CLIENT_LINK,
        bridge=VM_BRIDGE,
    )
    host_plans = [
        HostPlan(
            name=f"h{i}",
            netns=f"{name}-h{i}",
            lan_ip=str(lan[HOST_OFFSET + i]),
            root_veth=f"{name}-h{i}",
            ns_veth=NS_VETH,
            vm_bridge=VM_BRIDGE,
            vxlan=VXLAN_LINK,
        )
        for i in range(1, hosts + 1)
    ]
    return LabPlan(
        name=name,
        hosts=host_plans,
        lan_bridge=f"{name}-lan",
        caller_ip=str(lan[1]),
        lan_subnet=str(lan),
        vm_subnet=str(vms),
        vni=VNI,
        mtu=LAN_MTU,
        client=client,
    )


def _subnet(what: str, text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise ConfigError(f"the {what} subnet {text!r} is not an IPv4 network: {exc}") from exc
    if not net.is_private:
        raise ConfigError(
            f"the {what} subnet {net} is not a private range; the lab must never "
            "shadow a real address"
        )
    return net


def vm_ip(plan: LabPlan, index: int) -> str:
    """Address of the ``index``-th guest (from 0) on the VM segment: .11, .12, ...

    Raises:
        ConfigError: the VM subnet has no address for that index.
    """
    net = ipaddress.IPv4Network(plan.vm_subnet)
    if index < 0 or GUEST_OFFSET + index >= net.num_addresses - 1:
        raise ConfigError(f"the VM subnet {net} has no address for guest number {index}")
    return str(net[GUEST_OFFSET + index])


# ── the steps (pure) ─────────────────────────────────────────────────────────


def _where(netns: str | None) -> str:
    return "the root namespace" if netns is None else f"namespace {netns}"


@dataclass(frozen=True)
class CreateNetns:
    """Create named network namespace ``name``."""

    name: str

    def describe(self) -> str:
        """Say what this does, for error messages."""
        return f"create namespace {self.name}"


@dataclass(frozen=True)
class AddVeth:
    """Create a veth pair: ``name`` in ``netns`` (None: root), ``peer`` in ``peer_netns``.

    ``quiet``: neither end gets an IPv6 link-local address (the client's cable:
    it sends nothing of its own accord).
    """

    name: str
    peer: str
    peer_netns: str
    mtu: int
    netns: str | None = None
    quiet: bool = False

    def describe(self) -> str:
        """Say what this does, for error messages."""
        return (
            f"create veth {self.name} in {_where(self.netns)}"
            f" (peer {self.peer} in namespace {self.peer_netns})"
        )


@dataclass(frozen=True)
class AddBridge:
    """Create a bridge.

    ``quiet`` is for the VM bridge: no IPv6 link-local address, so the host puts
    no frame of its own on the guests' segment, and no multicast snooping, so the
    guests' multicast (VRRP, corosync) floods as on a plain switch.
    """

    name: str
    netns: str | None
    mtu: int
    quiet: bool = False

    def describe(self) -> str:
        """Say what this does, for error messages."""
        return f"create bridge {self.name} in {_where(self.netns)}"


@dataclass(frozen=True)
class AddVxlan:
    """Create a VXLAN link over ``dev`` from ``local``, learning on, no IPv6 address."""

    name: str
    netns: str
    vni: int
    port: int
    local: str
    dev: str
    mtu: int

    def describe(self) -> str:
        """Say what this does, for error messages."""
        return f"create vxlan {self.name} (vni {self.vni}) in {_where(self.netns)}"


@dataclass(frozen=True)
class AddAddress:
    """Put ``address``/``prefixlen`` on link ``link``."""

    link: str
    netns: str | None
    address: str
    prefixlen: int

    def describe(self) -> str:
        """Say what this does, for error messages."""
        return f"add {self.address}/{self.prefixlen} to {self.link} in {_where(self.netns)}"


@dataclass(frozen=True)
class SetMaster:
    """Enslave ``link`` to bridge ``master`` (same namespace)."""

    link: str
    netns: str | None
    master: str

    def describe(self) -> str:
        """Say what this does, for error messages."""
        return f"attach {self.link} to {self.master} in {_where(self.netns)}"


@dataclass(frozen=True)
class SetUp:
    """Bring link ``link`` up."""

    link: str
    netns: str | None

    def describe(self) -> str:
        """Say what this does, for error messages."""
        return f"bring up {self.link} in {_where(self.netns)}"


@dataclass(frozen=True)
class AppendFdb:
    """Flood unknown and broadcast frames of vxlan ``link`` to ``dst`` too (all-zero MAC)."""

    link: str
    netns: str
    dst: str

    def describe(self) -> str:
        """Say what this does, for error messages."""
        return f"add a flood entry to {self.dst} on {self.link} in {_where(self.netns)}"


Op = CreateNetns | AddVeth | AddBridge | AddVxlan | AddAddress | SetMaster | SetUp | AppendFdb


@dataclass(frozen=True)
class Step:
    """One change of :func:`lab_up`; ``creates`` goes into the ledger before ``op`` runs."""

    op: Op
    creates: tuple[Entry, ...] = ()


def plan_steps(plan: LabPlan) -> list[Step]:
    """Every change that brings ``plan``'s network up, in order; no I/O.

    The LAN bridge comes first and so, taken down in reverse, goes last. In each
    host, lan0 gets its MTU before vx0 is made on it, so vx0 can carry 1500 bytes.
    """
    root = None
    steps = [
        Step(AddBridge(plan.lan_bridge, root, plan.mtu), (LinkEntry(plan.lan_bridge, root),)),
        Step(AddAddress(plan.lan_bridge, root, plan.caller_ip, plan.prefixlen)),
        Step(SetUp(plan.lan_bridge, root)),
    ]
    for h in plan.hosts:
        ns = h.netns
        steps += [
            Step(CreateNetns(ns), (NetnsEntry(ns),)),
            Step(SetUp("lo", ns)),
            Step(
                AddVeth(h.root_veth, h.ns_veth, ns, plan.mtu),
                (LinkEntry(h.root_veth, root), LinkEntry(h.ns_veth, ns)),
            ),
            Step(SetMaster(h.root_veth, root, plan.lan_bridge)),
            Step(SetUp(h.root_veth, root)),
            Step(AddAddress(h.ns_veth, ns, h.lan_ip, plan.prefixlen)),
            Step(SetUp(h.ns_veth, ns)),
            Step(
                AddBridge(h.vm_bridge, ns, plan.vm_mtu, quiet=True), (LinkEntry(h.vm_bridge, ns),)
            ),
            Step(
                AddVxlan(h.vxlan, ns, plan.vni, plan.vxlan_port, h.lan_ip, h.ns_veth, plan.vm_mtu),
                (LinkEntry(h.vxlan, ns),),
            ),
            Step(SetMaster(h.vxlan, ns, h.vm_bridge)),
            *(Step(AppendFdb(h.vxlan, ns, o.lan_ip)) for o in plan.hosts if o is not h),
            Step(SetUp(h.vm_bridge, ns)),
            Step(SetUp(h.vxlan, ns)),
        ]
    return steps + client_steps(plan.client, plan.vm_mtu)


def client_steps(client: ClientPlan, mtu: int) -> list[Step]:
    """The changes that cable the client to the first host's VM bridge and address it."""
    ns, host = client.netns, client.host_netns
    return [
        Step(CreateNetns(ns), (NetnsEntry(ns),)),
        Step(SetUp("lo", ns)),
        Step(
            AddVeth(client.host_link, client.nic, ns, mtu, netns=host, quiet=True),
            (LinkEntry(client.host_link, host), LinkEntry(client.nic, ns)),
        ),
        Step(SetMaster(client.host_link, host, client.bridge)),
        Step(SetUp(client.host_link, host)),
        Step(AddAddress(client.nic, ns, client.ip, client.prefixlen)),
        Step(SetUp(client.nic, ns)),
    ]


def plan_objects(plan: LabPlan) -> list[Entry]:
    """Every object ``plan``'s network consists of, in the order lab_up makes them."""
    return [entry for step in plan_steps(plan) for entry in step.creates]


# ── the driver: what touches the kernel ──────────────────────────────────────


@dataclass(frozen=True)
class LinkState:
    """What the kernel says about one link."""

    name: str
    netns: str | None
    kind: str | None  # "bridge", "veth", "vxlan", ...; None for lo
    up: bool  # administratively up (IFF_UP)
    operstate: str
    mtu: int
    master: str | None


class LabDriver(Protocol):
    """The few kernel operations the lab needs; :class:`NetlinkDriver` is the real one."""

    def ipv4_routes(self) -> list[ipaddress.IPv4Network]:
        """Destinations of every IPv4 route of the root namespace, all tables."""
        ...

    def netns_exists(self, name: str) -> bool:
        """Whether named namespace ``name`` exists."""
        ...

    def link(self, name: str, netns: str | None) -> LinkState | None:
        """Link ``name`` in ``netns`` (None: root), or None if it or the namespace is absent."""
        ...

    def apply(self, op: Op) -> None:
        """Make one change; raises NetError (cause kept) if the kernel refuses."""
        ...

    def delete_link(self, name: str, netns: str | None) -> bool:
        """Delete a link; False if it (or its namespace) was already gone."""
        ...

    def delete_netns(self, name: str) -> bool:
        """Delete a named namespace; False if it was already gone."""
        ...

    def close(self) -> None:
        """Release whatever the driver holds (sockets)."""
        ...


_IFF_UP = 0x1
_ZERO_MAC = "00:00:00:00:00:00"
_NO_LINKLOCAL = {"attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", 1]]}]]}


def _reason(exc: BaseException) -> str:
    code = getattr(exc, "code", None)  # pyroute2's NetlinkError
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _errno(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    return exc.errno if isinstance(exc, OSError) else None


class NetlinkDriver:
    """:class:`LabDriver` over pyroute2: one netlink socket per namespace, opened on first use.

    Namespaces are only ever opened, never created, by a socket (pyroute2 would
    create a missing one by default); :class:`CreateNetns` is the only creator.
    """

    def __init__(self) -> None:
        """Prepare; no socket is opened yet.

        Raises:
            RuntimeError: called inside a running asyncio loop, where pyroute2's
                synchronous API cannot work (use ``asyncio.to_thread``).
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no loop running in this thread: good
        else:
            raise RuntimeError(
                "the lab's netlink driver cannot run inside an asyncio loop; "
                "call it through asyncio.to_thread"
            )
        self._sockets: dict[str | None, Any] = {}

    def __enter__(self) -> NetlinkDriver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every socket this driver opened."""
        for netns in list(self._sockets):
            self._close(netns)

    def _close(self, netns: str | None) -> None:
        sock = self._sockets.pop(netns, None)
        if sock is not None:
            with contextlib.suppress(Exception):
                sock.close()

    def _ipr(self, netns: str | None) -> Any:
        sock = self._sockets.get(netns)
        if sock is None:
            from pyroute2 import IPRoute

            try:
                sock = IPRoute() if netns is None else IPRoute(netns=netns, flags=0)
            except FileNotFoundError as exc:
                raise NetError(f"namespace {netns} does not exist") from exc
            except OSError as exc:
                raise NetError(
                    f"cannot open a netlink socket in {_where(netns)}: {_reason(exc)}"
                ) from exc
            self._sockets[netns] = sock
        return sock

    def _index(self, netns: str | None, name: str) -> int:
        found = self._ipr(netns).link_lookup(ifname=name)
        if not found:
            raise NetError(f"link {name} does not exist in {_where(netns)}")
        return int(found[0])

    def ipv4_routes(self) -> list[ipaddress.IPv4Network]:
        """Destinations of every IPv4 route of the root namespace, all tables.

        Raises:
            NetError: the routes cannot be read.
        """
        import socket

        try:
            msgs = self._ipr(None).route("dump", family=socket.AF_INET)
            return [
                ipaddress.IPv4Network((m.get("dst") or 0, m["dst_len"]), strict=False) for m in msgs
            ]
        except Exception as exc:  # pyroute2's NetlinkError is not an OSError
            raise NetError(f"cannot read the routes of this machine: {_reason(exc)}") from exc

    def netns_exists(self, name: str) -> bool:
        """Whether named namespace ``name`` exists (``/run/netns/<name>``)."""
        from pyroute2 import netns

        return name in netns.listnetns()

    def link(self, name: str, netns: str | None) -> LinkState | None:
        """Link ``name`` in ``netns``, or None if it or its namespace is absent.

        Raises:
            NetError: the kernel cannot be asked.
        """
        if netns is not None and not self.netns_exists(netns):
            return None
        try:
            ipr = self._ipr(netns)
            found = ipr.link_lookup(ifname=name)
            if not found:
                return None
            msg = ipr.link("get", index=found[0])[0]
            master_index = msg.get("master")
            master = None
            if master_index:
                master = str(ipr.link("get", index=master_index)[0].get("ifname"))
        except NetError:
            raise
        except Exception as exc:
            if _errno(exc) == errno.ENODEV:
                return None
            raise NetError(
                f"cannot inspect link {name} in {_where(netns)}: {_reason(exc)}"
            ) from exc
        kind = msg.get(("linkinfo", "kind"))
        return LinkState(
            name=name,
            netns=netns,
            kind=None if kind is None else str(kind),
            up=bool(int(msg["flags"]) & _IFF_UP),
            operstate=str(msg.get("operstate") or "UNKNOWN"),
            mtu=int(msg.get("mtu") or 0),
            master=master,
        )

    def apply(self, op: Op) -> None:
        """Make one change.

        Raises:
            NetError: the kernel refused; the cause (NetlinkError or OSError) is kept.
        """
        try:
            self._apply(op)
        except NetError:
            raise
        except Exception as exc:
            raise NetError(f"could not {op.describe()}: {_reason(exc)}") from exc

    def _apply(self, op: Op) -> None:
        match op:
            case CreateNetns(name=name):
                from pyroute2 import netns

                netns.create(name)
            case AddVeth(
                name=name, peer=peer, peer_netns=peer_netns, mtu=mtu, netns=ns, quiet=quiet
            ):
                ipr = self._ipr(ns)
                ipr.link(
                    "add",
                    ifname=name,
                    kind="veth",
                    mtu=mtu,
                    peer={"ifname": peer, "net_ns_fd": peer_netns, "mtu": mtu},
                )
                if quiet:
                    ipr.link("set", index=self._index(ns, name), IFLA_AF_SPEC=_NO_LINKLOCAL)
                    self._ipr(peer_netns).link(
                        "set", index=self._index(peer_netns, peer), IFLA_AF_SPEC=_NO_LINKLOCAL
                    )
            case AddBridge(name=name, netns=ns, mtu=mtu, quiet=quiet):
                ipr = self._ipr(ns)
                if quiet:
                    ipr.link("add", ifname=name, kind="bridge", mtu=mtu, br_mcast_snooping=0)
                    ipr.link("set", index=self._index(ns, name), IFLA_AF_SPEC=_NO_LINKLOCAL)
                else:
                    ipr.link("add", ifname=name, kind="bridge", mtu=mtu)
            case AddVxlan(name=name, netns=ns, vni=vni, port=port, local=local, dev=dev, mtu=mtu):
                ipr = self._ipr(ns)
                ipr.link(
                    "add",
                    ifname=name,
                    kind="vxlan",
                    vxlan_id=vni,
                    vxlan_port=port,
                    vxlan_local=local,
                    vxlan_link=self._index(ns, dev),
                    vxlan_learning=1,
                    mtu=mtu,
                )
                ipr.link("set", index=self._index(ns, name), IFLA_AF_SPEC=_NO_LINKLOCAL)
            case AddAddress(link=link, netns=ns, address=address, prefixlen=prefixlen):
                self._ipr(ns).addr(
                    "add", index=self._index(ns, link), address=address, prefixlen=prefixlen
                )
            case SetMaster(link=link, netns=ns, master=master):
                self._ipr(ns).link(
                    "set", index=self._index(ns, link), master=self._index(ns, master)
                )
            case SetUp(link=link, netns=ns):
                self._ipr(ns).link("set", index=self._index(ns, link), state="up")
            case AppendFdb(link=link, netns=ns, dst=dst):
                self._ipr(ns).fdb(
                    "append", ifindex=self._index(ns, link), lladdr=_ZERO_MAC, dst=dst
                )

    def delete_link(self, name: str, netns: str | None) -> bool:
        """Delete link ``name`` in ``netns``; False if it or its namespace was already gone.

        Raises:
            NetError: the kernel refused.
        """
        if netns is not None and not self.netns_exists(netns):
            return False
        try:
            ipr = self._ipr(netns)
            found = ipr.link_lookup(ifname=name)
            if not found:
                return False
            ipr.link("del", index=found[0])
        except NetError:
            raise
        except Exception as exc:
            if _errno(exc) == errno.ENODEV:  # went away meanwhile (its veth peer was deleted)
                return False
            raise NetError(
                f"could not delete link {name} in {_where(netns)}: {_reason(exc)}"
            ) from exc
        return True

    def delete_netns(self, name: str) -> bool:
        """Delete named namespace ``name``; False if it was already gone.

        Raises:
            NetError: it could not be unmounted or unlinked.
        """
        from pyroute2 import netns

        self._close(name)  # an open socket would keep the namespace alive
        if not self.netns_exists(name):
            return False
        try:
            netns.remove(name)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise NetError(f"could not delete namespace {name}: {_reason(exc)}") from exc
        return True


@contextlib.contextmanager
def _using(driver: LabDriver | None) -> Iterator[LabDriver]:
    """The given driver, or a NetlinkDriver that is closed afterwards."""
    if driver is not None:
        yield driver
        return
    own = NetlinkDriver()
    try:
        yield own
    finally:
        own.close()


# ── up ───────────────────────────────────────────────────────────────────────


def lab_up(plan: LabPlan, ledger: Ledger, *, driver: LabDriver | None = None) -> None:
    """Build ``plan``'s network, recording every object in ``ledger`` before making it.

    If a step fails, everything made so far is removed again (from the ledger)
    before the error is raised. If the process dies instead, ``lab_down(ledger)``
    removes what it left.

    Raises:
        LabError: the lab (or a ledger of it) already exists, the LAN subnet
            overlaps a route of this machine, or a step failed (the message says
            which; the cause is kept).
    """
    with _using(driver) as drv:
        try:
            _refuse_if_present(plan, ledger, drv)
            _refuse_if_overlapping(plan, drv)
        except NetError as exc:
            raise LabError(f"cannot check whether lab {plan.name} can come up: {exc}") from exc
        for step in plan_steps(plan):
            try:
                for entry in step.creates:
                    ledger.record(entry)
                drv.apply(step.op)
            except Exception as exc:
                if _errno(exc.__cause__ or exc) == errno.EEXIST:
                    # Someone else's object holds the name: it is not ours to remove.
                    for entry in step.creates:
                        with contextlib.suppress(LabError):
                            ledger.forget(entry)
                raise _rolled_back(plan, ledger, drv, exc) from exc


def _rolled_back(plan: LabPlan, ledger: Ledger, drv: LabDriver, exc: Exception) -> LabError:
    """Take down what lab_up made so far; return the error to raise for ``exc``."""
    what = str(exc) if isinstance(exc, LockstepError) else _reason(exc)
    try:
        lab_down(ledger, driver=drv)
    except LabError as down_exc:
        return LabError(
            f"lab {plan.name} did not come up ({what}), and removing what was made "
            f"failed too ({down_exc})"
        )
    return LabError(f"lab {plan.name} did not come up ({what}); what was made is removed again")


def _refuse_if_present(plan: LabPlan, ledger: Ledger, drv: LabDriver) -> None:
    found = [
        entry.describe()
        for entry in plan_objects(plan)
        if (isinstance(entry, NetnsEntry) and drv.netns_exists(entry.name))
        or (isinstance(entry, LinkEntry) and entry.netns is None and drv.link(entry.name, None))
    ]
    if found:
        raise LabError(
            f"lab {plan.name} already exists here ({', '.join(found)}); "
            "run `lockstep lab down` first"
        )
    if ledger.exists():
        raise LabError(
            f"lab {plan.name} has a ledger from an earlier run at {ledger.path}; "
            "run `lockstep lab down` first"
        )


def _refuse_if_overlapping(plan: LabPlan, drv: LabDriver) -> None:
    lan = ipaddress.IPv4Network(plan.lan_subnet)
    # A default route covers everything and says nothing about which addresses are in use.
    clashes = sorted({str(r) for r in drv.ipv4_routes() if r.prefixlen > 0 and r.overlaps(lan)})
    if clashes:
        raise LabError(
            f"the lab's LAN subnet {lan} overlaps route {', '.join(clashes)} of this machine; "
            "pick another LAN subnet"
        )


# ── down ─────────────────────────────────────────────────────────────────────


def lab_down(
    ledger: Ledger, *, driver: LabDriver | None = None, grace: float = DEFAULT_GRACE
) -> list[str]:
    """Remove exactly what ``ledger`` lists, newest first, then the ledger itself.

    What is already gone is skipped. A recorded process is signalled only if its
    start time still matches (a reused pid is left alone): SIGTERM, then SIGKILL
    after ``grace`` seconds; consecutive process entries are stopped together.
    Links inside a namespace are deleted before the namespace, so nothing is
    left behind even if a process still holds the namespace open.

    Returns:
        What was removed, one description per object ("link vx0 in namespace ...").

    Raises:
        LabError: the ledger is unreadable, or some objects could not be removed
            (all others are; the ledger is kept so the command can be run again).
    """
    entries = ledger.entries()
    removed: list[str] = []
    failed: list[str] = []
    with _using(driver) as drv:
        pending: list[ProcessEntry] = []
        for entry in reversed(entries):
            if isinstance(entry, ProcessEntry):
                pending.append(entry)
                continue
            if pending:
                _stop_processes(pending, grace, removed, failed)
                pending = []
            try:
                if _remove(entry, drv):
                    removed.append(entry.describe())
            except (LockstepError, OSError) as exc:
                failed.append(
                    f"{entry.describe()}: {_reason(exc) if isinstance(exc, OSError) else exc}"
                )
        if pending:
            _stop_processes(pending, grace, removed, failed)
    if failed:
        raise LabError(
            f"could not remove {'; '.join(failed)}; the ledger {ledger.path} is kept, "
            "run `lockstep lab down` again once that is fixed"
        )
    ledger.remove()
    return removed


def _remove(entry: Entry, drv: LabDriver) -> bool:
    match entry:
        case LinkEntry(name=name, netns=ns):
            return drv.delete_link(name, ns)
        case NetnsEntry(name=name):
            return drv.delete_netns(name)
        case PathEntry(path=path):
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                return False
            return True
        case ProcessEntry():
            raise AssertionError("processes are stopped by _stop_processes")


def _stop_processes(
    entries: Sequence[ProcessEntry], grace: float, removed: list[str], failed: list[str]
) -> None:
    """SIGTERM every still-running recorded process, SIGKILL those alive after ``grace``.

    A pidfd pins the process between the start-time check and the signal, so a
    pid reused meanwhile is never hit.
    """
    held: list[tuple[ProcessEntry, int]] = []
    refused: dict[int, str] = {}  # pidfd -> why it could not be signalled
    try:
        for entry in entries:
            try:
                fd = os.pidfd_open(entry.pid)
            except ProcessLookupError:
                continue
            except OSError as exc:
                failed.append(f"{entry.describe()}: {_reason(exc)}")
                continue
            if process_starttime(entry.pid) != entry.starttime:
                os.close(fd)  # the pid now belongs to another process
                continue
            held.append((entry, fd))
        running = held
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for _, fd in running:
                try:
                    signal.pidfd_send_signal(fd, sig)
                except ProcessLookupError:
                    pass  # exited already; _wait_exit sees it at once
                except OSError as exc:
                    refused[fd] = _reason(exc)
            running = _wait_exit([(e, fd) for e, fd in running if fd not in refused], grace)
        still = {fd for _, fd in running}
        for entry, fd in held:
            if fd in refused:
                failed.append(f"{entry.describe()}: {refused[fd]}")
            elif fd in still:
                failed.append(f"{entry.describe()}: still running after SIGKILL")
            else:
                removed.append(entry.describe())
    finally:
        for _, fd in held:
            os.close(fd)


def _wait_exit(
    held: list[tuple[ProcessEntry, int]], timeout: float
) -> list[tuple[ProcessEntry, int]]:
    """Wait until every pidfd is readable (its process exited) or ``timeout``; return the rest."""
    deadline = time.monotonic() + timeout
    left = list(held)
    while left:
        poller = select.poll()
        for _, fd in left:
            poller.register(fd, select.POLLIN)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready = {fd for fd, _ in poller.poll(remaining * 1000)}
        left = [(e, fd) for e, fd in left if fd not in ready]
    return left


# ── status ───────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class ObjectStatus:
    """One object of the lab and whether it is there (and up, for links)."""

    kind: str  # "netns", "link", "process", "path"
    name: str
    netns: str | None = None
    exists: bool = False
    up: bool = False  # links: administratively up; others: same as exists


@dataclass(frozen=True)
class LabStatus:
    """Which objects of a lab exist and are up."""

    objects: list[ObjectStatus] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every object exists and is up."""
        return bool(self.objects) and all(o.up for o in self.objects)

    @property
    def absent(self) -> bool:
        """No object exists."""
        return not any(o.exists for o in self.objects)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view, for ``lockstep lab status --json``."""
        return {
            "complete": self.complete,
            "absent": self.absent,
            "objects": [asdict(o) for o in self.objects],
        }


def lab_status(source: LabPlan | Ledger, *, driver: LabDriver | None = None) -> LabStatus:
    """Which of the objects of a plan (or those a ledger lists) exist and are up.

    Raises:
        LabError: the ledger is unreadable, or the kernel cannot be asked.
    """
    entries = plan_objects(source) if isinstance(source, LabPlan) else source.entries()
    objects = []
    with _using(driver) as drv:
        for entry in entries:
            try:
                objects.append(_status(entry, drv))
            except NetError as exc:
                raise LabError(f"cannot tell the lab's state: {exc}") from exc
    return LabStatus(objects)


def _status(entry: Entry, drv: LabDriver) -> ObjectStatus:
    match entry:
        case NetnsEntry(name=name):
            there = drv.netns_exists(name)
            return ObjectStatus("netns", name, None, there, there)
        case LinkEntry(name=name, netns=ns):
            state = drv.link(name, ns)
            return ObjectStatus("link", name, ns, state is not None, bool(state and state.up))
        case ProcessEntry(pid=pid, what=what):
            alive = entry.alive()
            return ObjectStatus("process", f"{pid} ({what})", None, alive, alive)
        case PathEntry(path=path):
            there = os.path.lexists(path)
            return ObjectStatus("path", path, None, there, there)
