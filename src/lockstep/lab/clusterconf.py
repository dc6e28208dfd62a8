"""What the lab's cluster middleware runs with: Corosync, Pacemaker and keepalived configs.

``lockstep lab up --cluster pacemaker|keepalived`` writes these, never a
person: each generator here is a pure function of the lab's placement and the
timings asked for, so its output is unit-tested as text.

* **pacemaker**: one Corosync 3 cluster (knet) of all the lab's VMs, two_node
  when there are two; Pacemaker on top with one resource group: a virtual
  address (``ocf:heartbeat:IPaddr2``) and a small HTTP service on it
  (``ocf:heartbeat:anything`` running ``python3 -m http.server``). There is no
  fencing in the lab (``stonith-enabled=false``): a lost node is taken as down.
* **keepalived**: one VRRPv3 instance per primary/standby pair, the primary
  MASTER with the higher priority, each pair with a virtual address of its own.

Timings follow the manuals: Corosync's consensus defaults to 1.2 x token and
knet pings every token/4 and gives a link up after token/2 (knet_pong_count
2); the token coefficient is 0 here, so the token is what was asked whatever
the node count. VRRPv3 counts its advert interval in centiseconds (RFC 5798:
12 bits, so 10 ms to 40.95 s in 10 ms steps).
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from lockstep.errors import LabError

__all__ = [
    "MIDDLEWARE_PACKAGES",
    "PACEMAKER_MIN_MEMORY",
    "ClusterKind",
    "ClusterSpec",
    "Member",
    "PacemakerService",
    "Totem",
    "VrrpPeer",
    "cib_commands",
    "cib_seed",
    "corosync_conf",
    "corosync_start",
    "keepalived_conf",
    "keepalived_start",
    "pacemaker_service",
    "pacemaker_start",
    "start_daemon",
    "totem_timings",
    "vrrp_advert_ms",
    "vrrp_peers",
    "write_file",
]


class ClusterKind(enum.StrEnum):
    """What a lab's guests run as their cluster."""

    AGENT = "agent"  # lockstep's own cluster agent only (lab/guest/lsagent.py)
    PACEMAKER = "pacemaker"  # Corosync + Pacemaker, beside the agent
    KEEPALIVED = "keepalived"  # VRRP pairs, beside the agent


MIDDLEWARE_PACKAGES = (
    "corosync",
    "keepalived",
    "pacemaker",
    "pacemaker-cli-utils",
    "resource-agents",
)
"""Debian packages of the middleware labs: one image serves both kinds (built once, cached).

``pacemaker-cli-utils`` (crm_mon, cibadmin) is only a Recommends of pacemaker,
which debootstrap does not follow.
"""

PACEMAKER_MIN_MEMORY = 512 << 20
"""Corosync and Pacemaker's seven daemons want this much per guest (measured in the lab)."""

DEFAULT_TOKEN_MS = 3000  # Corosync's own default since 3.1
DEFAULT_ADVERT_MS = 1000  # keepalived's own default
KNET_PONG_COUNT = 2  # Corosync's default: the knet ping defaults divide the token by it
MIN_TOKEN_MS = 127  # token / (token_retransmits_before_loss_const 4 + 0.2) must exceed 30 ms
JOIN_MS = 50  # Corosync's join timeout (default); a two-node consensus must exceed it
VIP_OFFSET = 100  # virtual addresses are .100, .101, ... of the VM subnet
VRID_BASE = 50  # pair k's VRRP router id is 50 + k
SERVICE_PORT = 80


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster a lab runs, and its timings as asked (None: derived or the default)."""

    kind: str = ClusterKind.AGENT.value
    token_ms: int | None = None
    consensus_ms: int | None = None
    knet_ping_interval_ms: int | None = None
    knet_ping_timeout_ms: int | None = None
    advert_ms: int | None = None


@dataclass(frozen=True)
class Totem:
    """Corosync's timings as written to corosync.conf, in ms."""

    token_ms: int
    consensus_ms: int
    knet_ping_interval_ms: int
    knet_ping_timeout_ms: int


def totem_timings(spec: ClusterSpec, nodes: int) -> Totem:
    """The totem timings for ``nodes`` nodes: what ``spec`` gives, the rest derived.

    Raises:
        LabError: a timing Corosync would refuse or misbehave with.
    """
    token = DEFAULT_TOKEN_MS if spec.token_ms is None else spec.token_ms
    if token < MIN_TOKEN_MS:
        raise LabError(
            f"a Corosync token of {token} ms is too short: it needs at least {MIN_TOKEN_MS} ms"
            " (token / 4.2 must exceed its 30 ms minimum retransmit time)"
        )
    consensus = round(1.2 * token) if spec.consensus_ms is None else spec.consensus_ms
    if nodes > 2 and consensus < 1.2 * token:
        raise LabError(
            f"a Corosync consensus of {consensus} ms is under 1.2 x the token ({token} ms),"
            f" which its manual forbids for {nodes} nodes"
        )
    if consensus <= JOIN_MS:
        raise LabError(
            f"a Corosync consensus of {consensus} ms must exceed the join timeout ({JOIN_MS} ms)"
        )
    interval, timeout = spec.knet_ping_interval_ms, spec.knet_ping_timeout_ms
    interval = token // (2 * KNET_PONG_COUNT) if interval is None else interval
    timeout = token // KNET_PONG_COUNT if timeout is None else timeout
    if not 0 < interval < timeout:
        raise LabError(
            f"the knet ping interval ({interval} ms) must be positive and shorter than"
            f" the knet ping timeout ({timeout} ms)"
        )
    return Totem(token, consensus, interval, timeout)


def vrrp_advert_ms(spec: ClusterSpec) -> int:
    """The VRRP advert interval in ms (keepalived's 1 s unless given).

    Raises:
        LabError: VRRPv3 cannot carry it (not a multiple of 10 ms, or outside 10 ms-40.95 s).
    """
    advert = DEFAULT_ADVERT_MS if spec.advert_ms is None else spec.advert_ms
    if advert % 10 or not 10 <= advert <= 40950:
        raise LabError(
            f"VRRPv3 cannot advertise every {advert} ms: it counts centiseconds, so the"
            " interval must be a multiple of 10 ms from 10 ms to 40950 ms"
        )
    return advert


@dataclass(frozen=True)
class Member:
    """A lab VM as a cluster member."""

    name: str
    ip: str


def corosync_conf(cluster: str, members: Sequence[Member], totem: Totem) -> str:
    """corosync.conf for ``members`` (node ids 1, 2, ... in order), knet, no encryption.

    It logs to stderr only (the lab starts Corosync in the foreground with its
    stderr on the serial console), with high-resolution timestamps.
    """
    nodes = "".join(
        f"    node {{\n        name: {m.name}\n        nodeid: {i}\n"
        f"        ring0_addr: {m.ip}\n    }}\n"
        for i, m in enumerate(members, start=1)
    )
    quorum = "    two_node: 1\n" if len(members) == 2 else ""
    return (
        f"# Written by lockstep for the lab cluster {cluster}: knet, no encryption (a lab).\n"
        "totem {\n"
        "    version: 2\n"
        f"    cluster_name: {cluster}\n"
        "    transport: knet\n"
        "    crypto_cipher: none\n"
        "    crypto_hash: none\n"
        f"    token: {totem.token_ms}\n"
        "    token_coefficient: 0\n"
        f"    consensus: {totem.consensus_ms}\n"
        "    interface {\n"
        "        linknumber: 0\n"
        f"        knet_ping_interval: {totem.knet_ping_interval_ms}\n"
        f"        knet_ping_timeout: {totem.knet_ping_timeout_ms}\n"
        "    }\n"
        "}\n"
        f"nodelist {{\n{nodes}}}\n"
        f"quorum {{\n    provider: corosync_votequorum\n{quorum}}}\n"
        "logging {\n"
        "    to_stderr: yes\n"
        "    to_logfile: no\n"
        "    to_syslog: no\n"
        "    timestamp: hires\n"
        "}\n"
    )


@dataclass(frozen=True)
class PacemakerService:
    """The lab's Pacemaker resource group: a virtual address and an HTTP service on it."""

    group: str
    vip: str
    prefix: int
    nic: str
    port: int
    preferred: str  # the node the group starts on

    @property
    def resources(self) -> tuple[str, str]:
        """The group's primitives, in start order."""
        return ("vip", "web")


def pacemaker_service(vm_subnet: str, members: Sequence[Member]) -> PacemakerService:
    """The resource group of a lab on ``vm_subnet``: address .100, first member preferred.

    Raises:
        LabError: the subnet has no room for the virtual address.
    """
    return PacemakerService(
        group="service",
        vip=_virtual_ip(vm_subnet, 0),
        prefix=ipaddress.IPv4Network(vm_subnet).prefixlen,
        nic="eth0",
        port=SERVICE_PORT,
        preferred=members[0].name,
    )


CIB_XML = "/var/lib/pacemaker/cib/cib.xml"


def cib_seed(service: PacemakerService) -> str:
    """A guest shell command that writes the lab's whole CIB before Pacemaker starts.

    cibadmin builds it offline (``CIB_file``) from an empty one with
    :func:`cib_commands`; it is put where Pacemaker's CIB manager reads it at
    start, as its own. Every node gets the same: the cluster starts
    configured, and its first transition starts the group.
    """
    draft = "/run/lockstep-cib.xml"
    return " && ".join(
        [
            f"cibadmin --empty > {draft}",
            *(f"CIB_file={draft} {command}" for command in cib_commands(service)),
            f"install -o hacluster -g haclient -m 600 {draft} {CIB_XML}",
            f"rm -f {draft}",
        ]
    )


def _nvpairs(owner: str, pairs: Sequence[tuple[str, str]]) -> str:
    return "".join(
        f"<nvpair id={quoteattr(f'{owner}-{name}')} name={quoteattr(name)} value={quoteattr(v)}/>"
        for name, v in pairs
    )


def cib_commands(service: PacemakerService) -> list[str]:
    """Shell commands (Pacemaker's cibadmin) that configure the lab cluster (:func:`cib_seed`).

    Cluster options: no fencing (a lab has none; a lost node is taken as down),
    no periodic re-check (an idle cluster then computes no transition at all),
    a DC elected 5 s after start-up (Pacemaker's default waits 20 s for one;
    the lab's nodes all start together).
    The group: the address, then the service bound to it; it prefers
    ``service.preferred`` (score 50) but stays where it runs (stickiness 100),
    so a node coming back does not pull it back.
    """
    options = _nvpairs(
        "cib-bootstrap-options",
        [("stonith-enabled", "false"), ("cluster-recheck-interval", "0"), ("dc-deadtime", "5s")],
    )
    crm_config = (
        f'<crm_config><cluster_property_set id="cib-bootstrap-options">{options}'
        "</cluster_property_set></crm_config>"
    )
    vip = _nvpairs(
        "vip",
        [("ip", service.vip), ("cidr_netmask", str(service.prefix)), ("nic", service.nic)],
    )
    web = _nvpairs(
        "web",
        [
            ("binfile", "/usr/bin/python3"),
            ("cmdline_options", f"-m http.server --bind {service.vip} {service.port}"),
        ],
    )
    stick = _nvpairs(f"{service.group}-meta", [("resource-stickiness", "100")])
    group = (
        f"<group id={quoteattr(service.group)}>"
        '<primitive id="vip" class="ocf" provider="heartbeat" type="IPaddr2">'
        f'<instance_attributes id="vip-params">{vip}</instance_attributes>'
        '<operations><op id="vip-monitor" name="monitor" interval="10s"/></operations>'
        "</primitive>"
        '<primitive id="web" class="ocf" provider="heartbeat" type="anything">'
        f'<instance_attributes id="web-params">{web}</instance_attributes>'
        '<operations><op id="web-monitor" name="monitor" interval="10s"/></operations>'
        "</primitive>"
        f"<meta_attributes id={quoteattr(f'{service.group}-meta')}>{stick}</meta_attributes>"
        "</group>"
    )
    location = (
        f"<rsc_location id={quoteattr(f'{service.group}-prefers-{service.preferred}')}"
        f' rsc={quoteattr(service.group)} node={quoteattr(service.preferred)} score="50"/>'
    )
    return [
        f"cibadmin --modify --scope crm_config --xml-text {shlex.quote(crm_config)}",
        f"cibadmin --create --scope resources --xml-text {shlex.quote(group)}",
        f"cibadmin --create --scope constraints --xml-text {shlex.quote(location)}",
    ]


@dataclass(frozen=True)
class VrrpPeer:
    """One side of a lab VRRP pair."""

    vm: str
    instance: str  # VI_<k>
    router_id: int
    master: bool
    vip: str
    prefix: int


def vrrp_peers(vm_subnet: str, pairs: Sequence[tuple[str, str]]) -> list[VrrpPeer]:
    """Both sides of every (primary, standby) pair; pair k has address .(99+k), router id 50+k.

    Raises:
        LabError: the subnet has no room for the virtual addresses.
    """
    prefix = ipaddress.IPv4Network(vm_subnet).prefixlen
    out = []
    for k, (primary, standby) in enumerate(pairs, start=1):
        vip = _virtual_ip(vm_subnet, k - 1)
        for vm, master in ((primary, True), (standby, False)):
            out.append(VrrpPeer(vm, f"VI_{k}", VRID_BASE + k, master, vip, prefix))
    return out


def keepalived_conf(peer: VrrpPeer, advert_ms: int, nic: str = "eth0") -> str:
    """keepalived.conf of one side of a VRRPv3 pair (MASTER priority 150, BACKUP 100)."""
    return (
        f"# Written by lockstep: VRRPv3 instance {peer.instance}, advert {advert_ms} ms.\n"
        "global_defs {\n"
        f"    router_id {peer.vm}\n"
        "    vrrp_version 3\n"
        "}\n"
        f"vrrp_instance {peer.instance} {{\n"
        f"    state {'MASTER' if peer.master else 'BACKUP'}\n"
        f"    interface {nic}\n"
        f"    virtual_router_id {peer.router_id}\n"
        f"    priority {150 if peer.master else 100}\n"
        f"    advert_int {advert_ms / 1000:.2f}\n"
        "    virtual_ipaddress {\n"
        f"        {peer.vip}/{peer.prefix} dev {nic}\n"
        "    }\n"
        "}\n"
    )


def _virtual_ip(vm_subnet: str, index: int) -> str:
    net = ipaddress.IPv4Network(vm_subnet)
    if VIP_OFFSET + index >= net.num_addresses - 1:
        raise LabError(f"the VM subnet {net} has no room for virtual address number {index + 1}")
    return str(net[VIP_OFFSET + index])


def write_file(path: str, content: str) -> str:
    """A guest shell command that writes ``content`` to ``path`` (base64: no quoting trouble)."""
    data = base64.b64encode(content.encode()).decode("ascii")
    folder = path.rsplit("/", 1)[0] or "/"
    return f"mkdir -p {shlex.quote(folder)} && printf %s {data} | base64 -d > {shlex.quote(path)}"


CONSOLE = "/dev/console"


def start_daemon(
    argv: Sequence[str], env: Sequence[tuple[str, str]] = (), output: str = CONSOLE
) -> str:
    """A guest shell command that starts a foreground daemon detached, its output to ``output``.

    The control channel's command returns at once; the daemon outlives it in a
    session of its own, and writes to the serial console (``lab verify`` reads it).
    """
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env)
    command = " ".join(shlex.quote(a) for a in argv)
    prefix = f"env {assignments} " if assignments else ""
    return f"{prefix}setsid -f {command} </dev/null >{shlex.quote(output)} 2>&1"


def corosync_start() -> str:
    """Start Corosync in the foreground; it logs to stderr, the console."""
    return start_daemon(["corosync", "-f"])


def pacemaker_start() -> str:
    """Start pacemakerd in the foreground; every daemon writes its detail log to the console.

    Their stderr goes nowhere: on the console (a tty) each line would show twice.
    """
    return start_daemon(["pacemakerd", "-f"], [("PCMK_logfile", CONSOLE)], output="/dev/null")


def keepalived_start(conf: str) -> str:
    """Start keepalived in the foreground, logging to the console only.

    ``-G``: no syslog, which glibc would also write to the console (there is no
    syslog daemon in a lab guest), in another format, so each line twice.
    """
    return start_daemon(["keepalived", "-n", "-l", "-D", "-G", "-f", conf])
