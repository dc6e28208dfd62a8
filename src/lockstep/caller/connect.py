"""A caller connected to a group's hosts: one mutual-TLS client per execd."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from lockstep.caller.orchestrator import GroupCaller
from lockstep.errors import ConfigError
from lockstep.group import GroupSpec
from lockstep.rpc import HostClient, Timeout, channel_credentials

__all__ = ["clients_for", "connected"]


def clients_for(
    group: GroupSpec, timeouts: Mapping[Timeout, float] | None = None
) -> dict[str, HostClient]:
    """One mutual-TLS client per host of ``group`` (``timeouts`` overrides the call table's).

    Raises:
        ConfigError: the group has no [tls] section, or its files are unusable.
    """
    if group.tls is None:
        raise ConfigError(
            f"the group file of {group.name} has no [tls] section: mutual TLS is mandatory"
            " (make certificates with `lockstep certs`)"
        )
    creds = channel_credentials(group.tls.ca, group.tls.cert, group.tls.key)
    return {
        name: HostClient(name, host.address, creds, target_name=name, timeouts=timeouts)
        for name, host in group.hosts.items()
    }


@asynccontextmanager
async def connected(group: GroupSpec, **options: Any) -> AsyncIterator[GroupCaller]:
    """A caller of ``group`` over one client per host; ``options`` go to GroupCaller.

    Raises:
        ConfigError: as :func:`clients_for`.
    """
    clients = clients_for(group)
    try:
        yield GroupCaller(group, clients, **options)
    finally:
        for c in clients.values():
            await c.close()
