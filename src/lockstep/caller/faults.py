"""Faults to inject into a group (``lockstep fault``): which hosts are asked what, and the fan-out.

A fault is named as a user names it, from the group file (VMs, hosts); the
pure part here turns it into the execd's terms and picks the hosts concerned:

- kill, freeze, loss: the host of the VM;
- partition: every host that runs a VM of either side, each given both sides'
  VMs with their MACs (a host cuts at its own VMs' taps: frames of another
  host's VMs are told apart by their source MAC). A libvirt domain's MACs
  are in its live XML, not the group file: its host is asked for them first
  (:func:`with_domain_macs`);
- heal, list: every host that runs a VM of the group.

:func:`inject` asks them all at once and gets one result per host (Ganeti
style). A new fault that failed on some host is healed on the hosts where it
took, so none of it is left half made.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from lockstep.caller.links import HostLink, HostResult, failures, fanout
from lockstep.errors import ConfigError, OperationFailed
from lockstep.execd.model import (
    FaultAction,
    FaultReply,
    FaultVm,
    Freeze,
    Heal,
    Kill,
    ListFaults,
    Loss,
    Partition,
)
from lockstep.group import GroupSpec, validate_name
from lockstep.vm import domainxml

__all__ = [
    "fault_id",
    "hosts_for",
    "inject",
    "kind_of",
    "partition",
    "side",
    "with_domain_macs",
]


def kind_of(action: FaultAction) -> str:
    """The fault's kind as the CLI names it: kill, freeze, partition, loss, heal, list."""
    return {
        Kill: "kill",
        Freeze: "freeze",
        Partition: "partition",
        Loss: "loss",
        Heal: "heal",
        ListFaults: "list",
    }[type(action)]


def fault_id(action: FaultAction) -> str:
    """A new fault's id, the same on every host: its kind and 6 random hex digits."""
    return f"{kind_of(action)}-{secrets.token_hex(3)}"


def side(group: GroupSpec, text: str) -> tuple[FaultVm, ...]:
    """The VMs ``text`` names, with their MACs: comma-separated VM or host names.

    A host means every VM the group places on it; a name that is both a VM
    and a host means the VM.

    Raises:
        ConfigError: a name is neither a VM nor a host of the group, or
            ``text`` names no VM.
    """
    names: list[str] = []
    for word in (w.strip() for w in text.split(",")):
        if word in group.vms:
            names.append(word)
        elif word in group.hosts:
            names += [vm.name for vm in group.vms_on(word)]
        else:
            raise ConfigError(
                f"{word!r} is no VM or host of group {group.name}"
                f" (VMs: {', '.join(sorted(group.vms))}; hosts: {', '.join(sorted(group.hosts))})"
            )
    if not names:
        raise ConfigError(f"{text!r} names no VM of group {group.name}")
    unique = dict.fromkeys(names)
    return tuple(FaultVm(n, tuple(nic.mac for nic in group.vms[n].nics)) for n in unique)


def partition(group: GroupSpec, a: str, b: str) -> Partition:
    """The partition between the VMs ``a`` names and those ``b`` names (see :func:`side`).

    A libvirt domain's side has no MACs yet (see :func:`with_domain_macs`).

    Raises:
        ConfigError: as :func:`side`, or a VM is on both sides.
    """
    side_a, side_b = side(group, a), side(group, b)
    both = sorted({v.name for v in side_a} & {v.name for v in side_b})
    if both:
        raise ConfigError(f"VM {', '.join(both)} is on both sides of the partition")
    return Partition(side_a, side_b)


async def with_domain_macs(
    group: GroupSpec, links: Mapping[str, HostLink], cut: Partition
) -> Partition:
    """``cut`` with each libvirt domain's MACs, as its live XML has them on its host.

    Raises:
        OperationFailed: a domain's host could not say, or the domain is not running.
    """
    domains = [v.name for v in (*cut.a, *cut.b) if group.vms[v.name].driver == "libvirt"]
    if not domains:
        return cut
    hosts = {group.vms[n].host for n in domains}
    results = await fanout({h: links[h] for h in hosts}, lambda _h, link: link.status())
    failed = failures(results)
    if failed:
        said = "; ".join(f"on host {r.host}: {r.error}" for r in failed)
        raise OperationFailed(f"fault partition: the domains' MACs could not be read {said}")
    xml = {s.name: s.xml for r in results.values() for s in r.value or [] if s.xml}
    missing = sorted(n for n in domains if n not in xml)
    if missing:
        raise OperationFailed(
            f"fault partition: VM {', '.join(missing)} is no running libvirt domain on its host"
            " (its MACs are read from its live XML); `lockstep up` it first"
        )

    def filled(vms: tuple[FaultVm, ...]) -> tuple[FaultVm, ...]:
        return tuple(
            FaultVm(v.name, tuple(nic.mac for nic in domainxml.nics(xml[v.name])))
            if v.name in xml
            else v
            for v in vms
        )

    return Partition(filled(cut.a), filled(cut.b))


def hosts_for(group: GroupSpec, action: FaultAction) -> list[str]:
    """The hosts that act on ``action``, in the group file's order.

    Raises:
        ConfigError: a VM named is not one of the group's.
    """
    if isinstance(action, Kill | Freeze | Loss):
        return [group.vm(action.vm).host]
    if isinstance(action, Partition):
        names = {v.name for v in action.a + action.b}
        used = {group.vm(n).host for n in names}
    else:
        used = {vm.host for vm in group.vms.values()}
    return [h for h in group.hosts if h in used]


async def inject(
    group: GroupSpec, links: Mapping[str, HostLink], action: FaultAction
) -> tuple[str, dict[str, HostResult[FaultReply]]]:
    """Inject ``action`` on every host concerned at once: its id and one result per host.

    Heal and list never raise: a host that failed has its error in its result.

    Raises:
        ConfigError: a VM named is not one of the group's, or a fault id
            to heal is not a valid name.
        OperationFailed: a new fault failed on some host; it was healed on
            the hosts where it took (the sentence says where and why).
    """
    if isinstance(action, Heal):
        for name in action.ids:
            validate_name("fault", name)
    if isinstance(action, Partition):
        action = await with_domain_macs(group, links, action)
    hosts = {h: links[h] for h in hosts_for(group, action)}
    new = not isinstance(action, Heal | ListFaults)
    fid = fault_id(action) if new else ""
    results = await fanout(hosts, lambda _h, link: link.inject_fault(group.name, fid, action))
    failed = failures(results)
    if new and failed:
        took = {h: hosts[h] for h, r in results.items() if r.ok}
        undone = await fanout(
            took, lambda _h, link: link.inject_fault(group.name, "", Heal((fid,)))
        )
        raise OperationFailed(_failed_sentence(kind_of(action), failed, undone))
    return fid, results


def _failed_sentence(
    kind: str,
    failed: Sequence[HostResult[FaultReply]],
    undone: Mapping[str, HostResult[FaultReply]],
) -> str:
    said = "; ".join(f"on host {r.host}: {r.error}" for r in failed)
    healed = sorted(h for h, r in undone.items() if r.ok)
    stuck = sorted(h for h, r in undone.items() if not r.ok)
    tail = f"; it was healed on host {', '.join(healed)}" if healed else ""
    if stuck:
        tail += f"; it could not be healed on host {', '.join(stuck)} (`lockstep fault heal`)"
    return f"fault {kind} failed {said}{tail}"
