"""The lab's client: a machine outside the group, on the guests' L2 segment.

It stands for a router or a user's machine: it learns where an address lives
from ARP, and keeps what it learned in its cache. After a restore, its entry
for a virtual address must point at the VM that held the address at the save
(lockstep announces every restored NIC right after the resume).
"""

from __future__ import annotations

import json

from lockstep.errors import LabError
from lockstep.lab.topology import client_netns
from lockstep.proc import arun, which

__all__ = ["client_mac", "client_ping", "ping_argv"]


def ping_argv(address: str, *extra: str) -> list[str]:
    """A one-echo ping of ``address`` (2 s wait) with iputils ping, or busybox's.

    Raises:
        LabError: neither is installed.
    """
    if which("ping") is not None:
        return ["ping", "-c1", "-W2", *extra, address]
    if which("busybox") is not None:
        return ["busybox", "ping", "-c1", "-W2", *extra, address]
    raise LabError("no ping on this machine: install iputils-ping or busybox-static")


async def client_mac(lab: str, address: str) -> str | None:
    """The MAC lab ``lab``'s client sends ``address`` to now (None: no usable entry)."""
    out = await arun(["ip", "-j", "neigh", "show", address], netns=client_netns(lab), check=False)
    entries = json.loads(out.stdout or b"[]")
    return str(entries[0]["lladdr"]) if entries and "lladdr" in entries[0] else None


async def client_ping(lab: str, address: str) -> bool:
    """One echo from lab ``lab``'s client to ``address``: whether it was answered.

    Raises:
        LabError: there is no ping on this machine.
    """
    done = await arun(ping_argv(address), netns=client_netns(lab), check=False, timeout=10)
    return done.returncode == 0
