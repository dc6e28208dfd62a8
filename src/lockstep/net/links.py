"""Taps for VM NICs, on a host's VM bridge, through netlink (pyroute2).

Every link lockstep makes on a host has a name derived from the group, the VM
and the NIC index (:func:`tap_name`), so an execd can always find and remove its
own links, and never touches anyone else's. ``netns`` is only for running the
host service in-process against a lab host; a real execd runs inside its host.
"""

from __future__ import annotations

import errno
import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lockstep.errors import NetError

__all__ = [
    "OUR_LINK",
    "create_tap",
    "delete_link",
    "ensure_clsact",
    "link_exists",
    "list_links",
    "netlink",
    "set_master",
    "tap_name",
]

LINK_PREFIX = "ls"
# Every link lockstep makes for a VM: ls + 8 hex + kind (t tap, f/g freeze pair) + index.
OUR_LINK = re.compile(rf"^{LINK_PREFIX}[0-9a-f]{{8}}([tfg])(\d+)$")


def tap_name(group: str, vm: str, index: int, *, spare: bool = False) -> str:
    """The tap of NIC ``index`` of ``vm`` in ``group``: ``ls`` + 8 hex + ``t`` + index.

    ``spare`` names the other set a VM's NICs can have: a restore prepares the
    new VM on the set the running one does not use, so both exist at once.
    """
    key = f"{group}/{vm}/spare" if spare else f"{group}/{vm}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{LINK_PREFIX}{digest}t{index}"


@asynccontextmanager
async def netlink(netns: str | None = None) -> AsyncIterator[Any]:
    """An async netlink socket, in ``netns`` if given (never creating it).

    Raises:
        NetError: netlink (or the namespace) could not be opened.
    """
    ipr = AsyncIPRoute(netns=netns, flags=0) if netns else AsyncIPRoute()
    try:
        await ipr.setup_endpoint()
    except (OSError, NetlinkError, RuntimeError) as exc:  # pyroute2: "child process is dead"
        ipr.close()
        where = f"namespace {netns}" if netns else "this host"
        raise NetError(f"cannot open netlink in {where}: {exc}") from exc
    try:
        yield ipr
    finally:
        ipr.close()


def _where(name: str, netns: str | None) -> str:
    return f"{name}{' in namespace ' + netns if netns else ''}"


async def link_exists(name: str, *, netns: str | None = None) -> bool:
    """Whether a link called ``name`` exists.

    Raises:
        NetError: netlink could not be reached.
    """
    async with netlink(netns) as ipr:
        return bool(await ipr.link_lookup(ifname=name))


async def list_links(*, netns: str | None = None) -> list[str]:
    """Names of lockstep's own VM links (taps and freeze pairs), by :data:`OUR_LINK`.

    Raises:
        NetError: netlink could not be reached.
    """
    async with netlink(netns) as ipr:
        names = [str(link.get("ifname")) async for link in await ipr.get_links()]
    return sorted(n for n in names if OUR_LINK.match(n))


async def create_tap(name: str, bridge: str, *, netns: str | None = None) -> None:
    """Create persistent tap ``name`` with a ``clsact`` qdisc, enslave it to ``bridge``, set it up.

    An existing tap of that name is reused (an execd restarted mid-way). The
    clsact qdisc is the freeze's hook (:mod:`lockstep.net.freeze`). It comes
    with the tap, before any traffic, because adding or removing a qdisc on a
    running link makes the kernel swap in its drop-all qdisc for a moment
    (``dev_deactivate``): frames to the VM would be lost at every freeze.

    Raises:
        NetError: the bridge is missing or the tap could not be made.
    """
    async with netlink(netns) as ipr:
        br = await ipr.link_lookup(ifname=bridge)
        if not br:
            raise NetError(f"bridge {_where(bridge, netns)} does not exist (is the host set up?)")
        try:
            if not await ipr.link_lookup(ifname=name):
                await ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            index = (await ipr.link_lookup(ifname=name))[0]
            await ensure_clsact(ipr, index)
            await ipr.link("set", ifname=name, master=br[0], state="up")
        except NetlinkError as exc:
            raise NetError(f"cannot create tap {_where(name, netns)} on {bridge}: {exc}") from exc


async def set_master(name: str, bridge: str | None, *, netns: str | None = None) -> None:
    """Enslave link ``name`` to ``bridge``, or take it out of its bridge (None).

    Out of its bridge, a tap gets no frame; the bridge forgets the addresses it
    had learnt on it, so frames for them are flooded until learnt again.

    Raises:
        NetError: a link is missing or could not be changed.
    """
    async with netlink(netns) as ipr:
        try:
            if bridge is None:
                await ipr.link("set", ifname=name, master=0)
                return
            br = await ipr.link_lookup(ifname=bridge)
            if not br:
                raise NetError(f"bridge {_where(bridge, netns)} does not exist")
            await ipr.link("set", ifname=name, master=br[0])
        except NetlinkError as exc:
            where = _where(name, netns)
            raise NetError(
                f"cannot {'set the bridge of' if bridge else 'unbridge'} {where}: {exc}"
            ) from exc


async def ensure_clsact(ipr: Any, index: int) -> None:
    """Give link ``index`` a ``clsact`` qdisc unless it has one.

    Raises:
        NetlinkError: the qdisc could not be added.
    """
    try:
        await ipr.tc("add", "clsact", index=index)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


async def delete_link(name: str, *, netns: str | None = None) -> bool:
    """Delete link ``name`` if it exists; return whether it did.

    Raises:
        NetError: the link exists but could not be deleted.
    """
    async with netlink(netns) as ipr:
        if not await ipr.link_lookup(ifname=name):
            return False
        try:
            await ipr.link("del", ifname=name)
        except NetlinkError as exc:
            if exc.code == 19:  # ENODEV: gone meanwhile
                return False
            raise NetError(f"cannot delete link {_where(name, netns)}: {exc}") from exc
    return True
