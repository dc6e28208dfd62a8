"""Frames dropped on purpose on a host's bridges (``lockstep fault``), as nftables rules.

The kernels lockstep meets may lack netem and tc's ``gact`` action, but have
nftables' ``bridge`` family. A group's network faults on one host are one
table of lockstep's own in the host's namespace, ``bridge lockstep-<group>``,
with one chain on the bridge's forward hook. That hook sees every frame a
bridge forwards, once per output port (a broadcast once for each port it is
flooded to), with its input and output ports, before the output port's
qdisc: a dropped frame never reaches lockstep's freeze, which captures on the
tap's egress. A :class:`Drop` picks frames by output port, input port and
source MAC, and then all of them or a random share.

:func:`ruleset` is pure: the whole table as text for ``nft -f``, which swaps
the group's table in one transaction (declare it, delete it, declare it anew),
or removes it when no drop is left. :func:`apply` runs that text through
lockstep's command runner, in the host's namespace.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from lockstep.errors import CommandError, NetError
from lockstep.net.frames import mac_text
from lockstep.net.links import OUR_LINK
from lockstep.proc import arun

__all__ = ["TABLE_PREFIX", "Drop", "apply", "ruleset", "table_name"]

TABLE_PREFIX = "lockstep-"
_COMMENT = re.compile(r"[A-Za-z0-9_.:%|, -]{0,120}")
_NFT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Drop:
    """Frames to drop: those that match every field given (None: any), ``percent`` of them.

    ``out_ports``: the bridge port the frame leaves by; ``in_ports``: the one
    it came in by; ``macs``: its source MAC. Ports are VMs' taps (lockstep's
    own, or those libvirt made for a domain: :func:`ruleset`'s ``ports``). An
    empty tuple matches no frame (the drop is left out of the table); a drop
    must name ports, or it would cut every VM of the host.
    """

    comment: str
    out_ports: tuple[str, ...] | None = None
    in_ports: tuple[str, ...] | None = None
    macs: tuple[str, ...] | None = None
    percent: int = 100


def table_name(group: str) -> str:
    """The bridge table that holds ``group``'s faults on a host."""
    return f"{TABLE_PREFIX}{group}"


_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def _ports(ports: tuple[str, ...], allowed: Collection[str] | None) -> str:
    for port in ports:
        if allowed is None:
            m = OUR_LINK.fullmatch(port)
            if m is None or m.group(1) != "t":
                raise ValueError(f"{port!r} is not one of lockstep's taps; faults cut only those")
        elif port not in allowed or not _IFNAME.fullmatch(port):
            raise ValueError(f"{port!r} is not a tap of this host's VMs; faults cut only those")
    return "{ " + ", ".join(f'"{p}"' for p in sorted(set(ports))) + " }"


def _mac(mac: str) -> str:
    """``mac`` as nft reads it; only what :func:`mac_text` writes reaches the rules."""
    parts = mac.split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError(mac)
        return mac_text(bytes.fromhex("".join(parts)))
    except ValueError:
        raise ValueError(f"{mac!r} is not a MAC address") from None


def _macs(macs: tuple[str, ...]) -> str:
    return "{ " + ", ".join(sorted({_mac(m) for m in macs})) + " }"


def _rule(drop: Drop, allowed: Collection[str] | None) -> str | None:
    """One drop as an nft rule; None if it can match no frame."""
    if drop.out_ports is None and drop.in_ports is None:
        raise ValueError(f"drop {drop.comment!r} names no port: it would cut every VM here")
    if not 1 <= drop.percent <= 100:
        raise ValueError(f"drop {drop.comment!r}: {drop.percent} % is not within 1..100")
    if not _COMMENT.fullmatch(drop.comment):
        raise ValueError(f"{drop.comment!r} cannot be an nft comment")
    if any(part == () for part in (drop.out_ports, drop.in_ports, drop.macs)):
        return None
    match = []
    if drop.in_ports is not None:
        match.append(f"iifname {_ports(drop.in_ports, allowed)}")
    if drop.out_ports is not None:
        match.append(f"oifname {_ports(drop.out_ports, allowed)}")
    if drop.macs is not None:
        match.append(f"ether saddr {_macs(drop.macs)}")
    if drop.percent < 100:
        match.append(f"numgen random mod 100 < {drop.percent}")
    return " ".join([*match, "counter", "drop", f'comment "{drop.comment}"'])


def ruleset(group: str, drops: Sequence[Drop], *, ports: Collection[str] | None = None) -> str:
    """``nft -f`` input that makes ``group``'s table hold exactly ``drops`` (none: no table).

    ``ports``: the taps of the host's VMs, the only ports a drop may name
    (None: lockstep's own taps, by their names).

    Raises:
        ValueError: a drop names no port, a port not allowed, a bad MAC, a
            share outside 1..100 %, or a comment nft cannot take.
    """
    table = f"bridge {table_name(group)}"
    # Declaring the table first makes the delete succeed when there is none.
    head = [f"table {table}", f"delete table {table}"]
    rules = [rule for drop in drops if (rule := _rule(drop, ports)) is not None]
    if not rules:
        return "\n".join(head) + "\n"
    body = [
        f"table {table} {{",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        *(f"\t\t{rule}" for rule in rules),
        "\t}",
        "}",
    ]
    return "\n".join(head + body) + "\n"


async def apply(
    group: str,
    drops: Sequence[Drop],
    *,
    ports: Collection[str] | None = None,
    netns: str | None = None,
) -> None:
    """Make ``group``'s fault table on this host hold exactly ``drops`` (none: remove it).

    Raises:
        ValueError: as :func:`ruleset` (``ports`` as there).
        NetError: nft is missing or refused the rules (its own words follow).
    """
    text = ruleset(group, drops, ports=ports)
    try:
        await arun(["nft", "-f", "-"], input=text.encode(), netns=netns, timeout=_NFT_TIMEOUT)
    except CommandError as exc:
        raise NetError(
            f"cannot set the fault rules of group {group} ({table_name(group)}): {exc}"
        ) from exc
