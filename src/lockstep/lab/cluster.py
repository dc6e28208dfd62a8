"""Bring a lab's cluster middleware up in its running guests, and ask it what it sees.

Why through the control channel: the guests' kernel command line (the only
thing a lab guest gets at boot) is too short for whole configurations, and
the daemons must start after the network is up anyway. So once every guest's
control agent answers, ``lab up --cluster`` writes each configuration
(:mod:`lockstep.lab.clusterconf`) and starts each daemon in the foreground of a
session of its own, with its output on the serial console, where ``lab
verify`` reads what it logged.

Forming is bounded: each step polls until it holds or the deadline passes, and
the error names what did not come up, in the middleware's own terms (crm_mon's
view of the nodes and resources, or who holds each virtual address).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lockstep.errors import LabError
from lockstep.lab.clusterconf import (
    ClusterKind,
    ClusterSpec,
    Member,
    PacemakerService,
    VrrpPeer,
    cib_seed,
    corosync_conf,
    corosync_start,
    keepalived_conf,
    keepalived_start,
    pacemaker_service,
    pacemaker_start,
    totem_timings,
    vrrp_advert_ms,
    vrrp_peers,
    write_file,
)
from lockstep.lab.middleware import CrmStatus, eth_addresses, parse_crm_mon

__all__ = [
    "ClusterPlan",
    "Shell",
    "form_cluster",
    "plan_cluster",
    "read_view",
]

COROSYNC_CONF = "/etc/corosync/corosync.conf"
KEEPALIVED_CONF = "/etc/keepalived/keepalived.conf"
# crm_mon's view, then the local CIB's root element: its version (admin_epoch.
# epoch.num_updates) changes with every write, a transition's results included.
CRM_MON = "crm_mon --output-as=xml; cibadmin --query --local 2>/dev/null | head -n 1"
ADDRESSES = "ip -4 -o addr show dev eth0"
POLL_S = 2.0  # between looks at a forming cluster (each look costs the guests CPU under TCG)
STEP_TIMEOUT_S = 60.0  # one command in a guest (crm_mon under TCG takes about a second)
VIEW_TIMEOUT_S = 15.0  # one guest's view for verify: a dead guest must not hold it up long


class Shell(Protocol):
    """A way to run a shell command in one guest (lockstep.lab.guestctl.GuestControl)."""

    async def run(self, command: str, *, timeout: float = 30.0) -> tuple[int, str]:
        """Run ``command``; its exit status and output."""
        ...


Say = Callable[[str], None]


@dataclass(frozen=True)
class ClusterPlan:
    """What a lab's middleware runs with, derived from its placement (see :func:`plan_cluster`)."""

    kind: ClusterKind
    name: str
    members: tuple[Member, ...]
    pairs: tuple[tuple[str, str], ...]
    vm_subnet: str
    spec: ClusterSpec

    def service(self) -> PacemakerService:
        """The Pacemaker resource group of this lab."""
        return pacemaker_service(self.vm_subnet, self.members)

    def peers(self) -> list[VrrpPeer]:
        """Both sides of every VRRP pair of this lab."""
        return vrrp_peers(self.vm_subnet, self.pairs)

    def describe(self) -> str:
        """The cluster and its timings in a few words, for progress lines."""
        if self.kind is ClusterKind.PACEMAKER:
            t = totem_timings(self.spec, len(self.members))
            return (
                f"Corosync + Pacemaker on {len(self.members)} VMs (token {t.token_ms} ms,"
                f" consensus {t.consensus_ms} ms, knet ping {t.knet_ping_interval_ms}/"
                f"{t.knet_ping_timeout_ms} ms; no fencing); group {self.service().group}"
                f" at {self.service().vip}"
            )
        if self.kind is ClusterKind.KEEPALIVED:
            vips = ", ".join(f"{p.vm} {p.vip}" for p in self.peers() if p.master)
            pairs = f"{len(self.pairs)} pair{'s' if len(self.pairs) > 1 else ''}"
            advert = vrrp_advert_ms(self.spec)
            return f"keepalived VRRPv3 in {pairs} (advert {advert} ms): {vips}"
        return "lockstep's cluster agent"


def plan_cluster(
    spec: ClusterSpec,
    name: str,
    members: Sequence[Member],
    pairs: Sequence[tuple[str, str]],
    vm_subnet: str,
) -> ClusterPlan:
    """The plan of a lab's cluster; every timing is checked here, before anything starts.

    Raises:
        LabError: the kind is unknown, or a timing or address cannot be used.
    """
    try:
        kind = ClusterKind(spec.kind)
    except ValueError:
        known = ", ".join(k.value for k in ClusterKind)
        raise LabError(f"there is no cluster kind {spec.kind!r} (known: {known})") from None
    plan = ClusterPlan(kind, name, tuple(members), tuple(pairs), vm_subnet, spec)
    if kind is ClusterKind.PACEMAKER:
        totem_timings(spec, len(members))
        plan.service()
    elif kind is ClusterKind.KEEPALIVED:
        vrrp_advert_ms(spec)
        plan.peers()
    return plan


async def form_cluster(
    plan: ClusterPlan, shells: Mapping[str, Shell], say: Say, timeout: float = 300.0
) -> float:
    """Configure and start the middleware in every guest; wait until it has formed.

    Returns the seconds it took. ``shells`` has a way into every member.

    Raises:
        LabError: a command failed in a guest, or the cluster did not form in
            ``timeout`` seconds (the message says what it shows instead).
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    if plan.kind is ClusterKind.PACEMAKER:
        await _form_pacemaker(plan, shells, say, deadline, timeout)
    elif plan.kind is ClusterKind.KEEPALIVED:
        await _form_keepalived(plan, shells, say, deadline, timeout)
    return time.monotonic() - t0


async def _sh(shells: Mapping[str, Shell], vm: str, command: str) -> str:
    """Run ``command`` in ``vm``; its output.

    Raises:
        LabError: it exited non-zero (its output is in the message).
    """
    rc, out = await shells[vm].run(command, timeout=STEP_TIMEOUT_S)
    if rc != 0:
        last = " / ".join(out.strip().splitlines()[-3:]) or "no output"
        raise LabError(f"`{command[:60]}` exited {rc} in lab guest {vm}: {last}")
    return out


async def _everywhere(shells: Mapping[str, Shell], vms: Sequence[str], command: str) -> None:
    await asyncio.gather(*(_sh(shells, vm, command) for vm in vms))


async def _form_pacemaker(
    plan: ClusterPlan, shells: Mapping[str, Shell], say: Say, deadline: float, timeout: float
) -> None:
    names = [m.name for m in plan.members]
    conf = corosync_conf(plan.name, plan.members, totem_timings(plan.spec, len(names)))
    say(f"cluster: {plan.describe()}")
    await _everywhere(shells, names, f"{write_file(COROSYNC_CONF, conf)} && {corosync_start()}")
    await _until(
        deadline,
        lambda: _all_ok(shells, names, "corosync-cfgtool -s"),
        lambda: f"Corosync did not answer in every guest within {timeout:g} s",
    )
    say("cluster: Corosync runs in every guest; starting Pacemaker, configured")
    service = plan.service()
    await _everywhere(shells, names, f"{cib_seed(service)} && {pacemaker_start()}")
    first = names[0]
    last: list[CrmStatus | str] = ["crm_mon never answered"]

    async def members_online() -> bool:
        last[0] = await _crm_status(shells[first])
        status = last[0]
        return isinstance(status, CrmStatus) and status.formed(names)

    await _until(
        deadline,
        members_online,
        lambda: f"the Pacemaker cluster did not form within {timeout:g} s: {_said(first, last[0])}",
    )
    say(f"cluster: every node online, DC {_dc(last[0])}; starting the resource group")

    async def group_started() -> bool:
        last[0] = await _crm_status(shells[first])
        status = last[0]
        return isinstance(status, CrmStatus) and status.group_on(service.resources) is not None

    await _until(
        deadline,
        group_started,
        lambda: (
            f"the Pacemaker group {service.group} did not start within {timeout:g} s:"
            f" {_said(first, last[0])}"
        ),
    )


def _dc(status: CrmStatus | str) -> str:
    return (status.dc or "none") if isinstance(status, CrmStatus) else "unknown"


def _said(vm: str, status: CrmStatus | str) -> str:
    what = status.describe() if isinstance(status, CrmStatus) else status
    return f"crm_mon on {vm} shows {what}"


async def _crm_status(shell: Shell) -> CrmStatus | str:
    """crm_mon's view from one guest, or why there is none."""
    try:
        rc, out = await shell.run(CRM_MON, timeout=STEP_TIMEOUT_S)
    except LabError as exc:
        return str(exc)
    try:
        return parse_crm_mon(out)
    except ValueError as exc:
        return f"no view (crm_mon exited {rc}: {exc})"


async def _all_ok(shells: Mapping[str, Shell], vms: Sequence[str], command: str) -> bool:
    results = await asyncio.gather(*(shells[vm].run(command, timeout=STEP_TIMEOUT_S) for vm in vms))
    return all(rc == 0 for rc, _ in results)


async def _until(
    deadline: float, check: Callable[[], Awaitable[bool]], failure: Callable[[], str]
) -> None:
    """Poll ``check`` (an async predicate) every POLL_S until it holds.

    Raises:
        LabError: it did not hold by ``deadline`` (``failure`` makes the message).
    """
    while True:
        if await check():
            return
        if time.monotonic() + POLL_S > deadline:
            raise LabError(failure())
        await asyncio.sleep(POLL_S)


async def _form_keepalived(
    plan: ClusterPlan, shells: Mapping[str, Shell], say: Say, deadline: float, timeout: float
) -> None:
    say(f"cluster: {plan.describe()}")
    advert = vrrp_advert_ms(plan.spec)
    peers = plan.peers()
    await asyncio.gather(
        *(
            _sh(
                shells,
                p.vm,
                f"{write_file(KEEPALIVED_CONF, keepalived_conf(p, advert))} && "
                + keepalived_start(KEEPALIVED_CONF),
            )
            for p in peers
        )
    )
    vms = [p.vm for p in peers]
    last: list[dict[str, list[str]]] = [{}]

    async def settled() -> bool:
        last[0] = await _vip_holders(shells, vms, [p.vip for p in peers])
        return all(last[0].get(p.vip) == [p.vm] for p in peers if p.master)

    def failure() -> str:
        wrong = [
            f"{p.vip} held by {', '.join(last[0].get(p.vip, [])) or 'nobody'} ({p.vm} expected)"
            for p in peers
            if p.master and last[0].get(p.vip) != [p.vm]
        ]
        return f"the VRRP pairs did not settle within {timeout:g} s: {'; '.join(wrong)}"

    await _until(deadline, settled, failure)


async def _vip_holders(
    shells: Mapping[str, Shell], vms: Sequence[str], vips: Sequence[str]
) -> dict[str, list[str]]:
    """Which guests hold each of ``vips`` now (a guest that does not answer holds none)."""
    answers = await asyncio.gather(
        *(shells[vm].run(ADDRESSES, timeout=VIEW_TIMEOUT_S) for vm in vms), return_exceptions=True
    )
    holders: dict[str, list[str]] = {vip: [] for vip in vips}
    for vm, answer in zip(vms, answers, strict=True):
        if isinstance(answer, BaseException):
            if not isinstance(answer, LabError):
                raise answer
            continue
        for address in eth_addresses(answer[1]):
            if address in holders:
                holders[address].append(vm)
    return holders


async def read_view(plan: ClusterPlan, shells: Mapping[str, Shell]) -> dict[str, Any]:
    """What the middleware says now, asked in every guest at once (JSON-ready).

    pacemaker: crm_mon's view from each guest (``nodes``: VM -> view or error);
    keepalived: which guests hold each pair's virtual address (``vips``:
    instance -> address, its configured MASTER, its holders now). A guest
    missing from ``shells`` (its QEMU does not run) holds nothing and has no
    view; one that does not answer within VIEW_TIMEOUT_S is named, not waited for.
    """
    vms = [m.name for m in plan.members if m.name in shells]
    if plan.kind is ClusterKind.PACEMAKER:

        async def one(vm: str) -> dict[str, Any]:
            if vm not in shells:
                return {"error": "its QEMU does not run"}
            try:
                _, out = await shells[vm].run(CRM_MON, timeout=VIEW_TIMEOUT_S)
                return parse_crm_mon(out).to_json()
            except (LabError, ValueError) as exc:
                return {"error": str(exc)}

        every = [m.name for m in plan.members]
        views = await asyncio.gather(*(one(vm) for vm in every))
        return {"kind": plan.kind.value, "nodes": dict(zip(every, views, strict=True))}
    if plan.kind is ClusterKind.KEEPALIVED:
        peers = plan.peers()
        holders = await _vip_holders(shells, vms, [p.vip for p in peers])
        return {
            "kind": plan.kind.value,
            "vips": {
                p.instance: {"vip": p.vip, "master": p.vm, "holders": holders[p.vip]}
                for p in peers
                if p.master
            },
        }
    return {"kind": plan.kind.value}
