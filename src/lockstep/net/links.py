"""Taps for VM NICs, on a host's VM bridge, through netlink (pyroute2).

Every link lockstep makes on a host has a name derived from the group, the VM
and the NIC index (:func:`tap_name`), so an execd can always find and remove its
own links, and never touches anyone else's. ``netns`` is only for running the
host service in-process against a lab host; a real execd runs inside its host.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lockstep.errors import NetError

__all__ = ["create_tap", "delete_link", "link_exists", "list_links", "tap_name"]

LINK_PREFIX = "ls"


def tap_name(group: str, vm: str, index: int) -> str:
    """The tap of NIC ``index`` of ``vm`` in ``group``: ``ls`` + 8 hex + ``t`` + index."""
    digest = hashlib.sha256(f"{group}/{vm}".encode()).hexdigest()[:8]
    return f"{LINK_PREFIX}{digest}t{index}"


@contextmanager
def _ipr(netns: str | None) -> Iterator[Any]:
    try:
        ipr = IPRoute(netns=netns) if netns else IPRoute()
    except (OSError, NetlinkError) as exc:
        where = f"namespace {netns}" if netns else "this host"
        raise NetError(f"cannot open netlink in {where}: {exc}") from exc
    try:
        yield ipr
    finally:
        ipr.close()


def _where(name: str, netns: str | None) -> str:
    return f"{name}{' in namespace ' + netns if netns else ''}"


def link_exists(name: str, *, netns: str | None = None) -> bool:
    """Whether a link called ``name`` exists.

    Raises:
        NetError: netlink could not be reached.
    """
    with _ipr(netns) as ipr:
        return bool(ipr.link_lookup(ifname=name))


def list_links(prefix: str = LINK_PREFIX, *, netns: str | None = None) -> list[str]:
    """Names of the links starting with ``prefix`` (lockstep's own).

    Raises:
        NetError: netlink could not be reached.
    """
    with _ipr(netns) as ipr:
        names = [str(link.get("ifname")) for link in ipr.get_links()]
    return sorted(n for n in names if n.startswith(prefix))


def create_tap(name: str, bridge: str, *, netns: str | None = None) -> None:
    """Create persistent tap ``name``, enslave it to ``bridge`` and set it up.

    An existing tap of that name is reused (an execd restarted mid-way).

    Raises:
        NetError: the bridge is missing or the tap could not be made.
    """
    with _ipr(netns) as ipr:
        br = ipr.link_lookup(ifname=bridge)
        if not br:
            raise NetError(f"bridge {_where(bridge, netns)} does not exist (is the host set up?)")
        try:
            if not ipr.link_lookup(ifname=name):
                ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            ipr.link("set", ifname=name, master=br[0], state="up")
        except NetlinkError as exc:
            raise NetError(f"cannot create tap {_where(name, netns)} on {bridge}: {exc}") from exc


def delete_link(name: str, *, netns: str | None = None) -> bool:
    """Delete link ``name`` if it exists; return whether it did.

    Raises:
        NetError: the link exists but could not be deleted.
    """
    with _ipr(netns) as ipr:
        if not ipr.link_lookup(ifname=name):
            return False
        try:
            ipr.link("del", ifname=name)
        except NetlinkError as exc:
            if exc.code == 19:  # ENODEV: gone meanwhile
                return False
            raise NetError(f"cannot delete link {_where(name, netns)}: {exc}") from exc
    return True
