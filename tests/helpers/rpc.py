"""Real certificates and a real execd gRPC server on 127.0.0.1, for protocol and fuzz tests.

:func:`make_pki` issues the group's CA and certificates plus the bad ones the
refusal tests need (another CA's, expired ones); :func:`serving` runs the real
server (:func:`lockstep.rpc.start_server`) with mutual TLS on a free loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from lockstep.execd.api import ExecdApi
from lockstep.rpc import (
    CaFiles,
    CertFiles,
    channel_credentials,
    issue,
    make_ca,
    server_credentials,
    start_server,
)

__all__ = ["LOOPBACK", "Pki", "free_port", "make_pki", "run", "serving"]

T = TypeVar("T")
LOOPBACK = "127.0.0.1"


def run(coro: Coroutine[Any, Any, T], limit: float = 60.0) -> T:
    """Run one test's coroutine in a fresh event loop, with a hard bound."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, limit)

    return asyncio.run(bounded())


def free_port() -> int:
    """A loopback TCP port nobody listens on (just now)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Pki:
    """The group's CA and certs, plus foreign and expired ones for the refusal tests."""

    ca: CaFiles
    server: CertFiles
    client: CertFiles
    other_ca: CaFiles
    foreign_client: CertFiles
    expired_client: CertFiles
    expired_server: CertFiles
    server_named_only: CertFiles  # SAN holds "h1" but not 127.0.0.1
    foreign_server: CertFiles

    def client_creds(self) -> grpc.ChannelCredentials:
        """Good caller credentials."""
        return channel_credentials(self.ca.cert, self.client.cert, self.client.key)

    def raw_creds(self, cert: CertFiles | None) -> grpc.ChannelCredentials:
        """Caller credentials built without lockstep's checks (so expired certs can be tried)."""
        if cert is None:
            return grpc.ssl_channel_credentials(root_certificates=self.ca.cert.read_bytes())
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.cert.read_bytes(),
            private_key=cert.key.read_bytes(),
            certificate_chain=cert.cert.read_bytes(),
        )

    def raw_server_creds(self, cert: CertFiles) -> grpc.ServerCredentials:
        """Server credentials built without lockstep's checks (so an expired cert can serve)."""
        return grpc.ssl_server_credentials(
            [(cert.key.read_bytes(), cert.cert.read_bytes())],
            root_certificates=self.ca.cert.read_bytes(),
            require_client_auth=True,
        )


def make_pki(root: Path) -> Pki:
    """Issue every certificate of a :class:`Pki` under ``root``."""
    ca = make_ca(root / "ca")
    other = make_ca(root / "other", name="someone else's CA")
    return Pki(
        ca=ca,
        server=issue(ca, root / "ca", "h1", kind="server", hosts=[LOOPBACK]),
        client=issue(ca, root / "ca", "caller", kind="client"),
        other_ca=other,
        foreign_client=issue(other, root / "other", "caller", kind="client"),
        expired_client=issue(ca, root / "ca", "old-caller", kind="client", days=-1),
        expired_server=issue(ca, root / "expired", "h1", kind="server", hosts=[LOOPBACK], days=-1),
        server_named_only=issue(ca, root / "named", "h1", kind="server"),
        foreign_server=issue(other, root / "other", "h1", kind="server", hosts=[LOOPBACK]),
    )


@contextlib.asynccontextmanager
async def serving(
    api: ExecdApi,
    pki: Pki,
    server_cert: CertFiles | None = None,
    *,
    creds: grpc.ServerCredentials | None = None,
) -> AsyncIterator[str]:
    """Serve ``api`` on a free loopback port with mutual TLS; yield its address.

    ``creds`` replaces the credentials made from ``server_cert`` (default: the
    group's good server certificate).
    """
    if creds is None:
        cert = server_cert or pki.server
        creds = server_credentials(pki.ca.cert, cert.cert, cert.key)
    server, port = await start_server(api, f"{LOOPBACK}:0", creds)
    try:
        yield f"{LOOPBACK}:{port}"
    finally:
        await server.stop(None)
