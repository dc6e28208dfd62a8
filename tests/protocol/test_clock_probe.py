"""The UDP clock-probe path: the real responder and client on 127.0.0.1, keys over real mTLS.

What only a caller of the group can do (probe with a key it got over mutual
TLS) is answered; forged, replayed and stale probes are ignored and counted,
and so are replies the caller cannot verify. A path that answers nothing
falls back to gRPC probes, and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import pytest

from lockstep.caller.clock import SyncPolicy
from lockstep.caller.sync import measure
from lockstep.execd.api import ExecdApi
from lockstep.execd.model import ProbeReply
from lockstep.rpc import (
    ExecdServer,
    HostClient,
    ProbeKey,
    ProbeResponder,
    UdpProbePath,
    server_credentials,
    start_server,
)
from lockstep.rpc.probe import encode_probe, encode_reply
from tests.helpers.rpc import LOOPBACK, Pki, run

OFFSET = 2.5  # the execd's clock runs this far ahead of the wall clock


@dataclass
class ClockApi:
    """The part of an ExecdApi that clock sync uses: an execd clock OFFSET ahead."""

    def probe(self) -> ProbeReply:
        now = time.time() + OFFSET
        return ProbeReply(received=now, sent=now)

    def from_wall(self, wall: float) -> float:
        return wall + OFFSET


@contextlib.asynccontextmanager
async def execd(pki: Pki, *, udp: bool = True) -> AsyncIterator[tuple[ExecdServer, HostClient]]:
    """A served ClockApi (UDP path on unless ``udp`` is False) and a client for it."""
    creds = server_credentials(pki.ca.cert, pki.server.cert, pki.server.key)
    api = cast(ExecdApi, ClockApi())
    server, port = await start_server(api, f"{LOOPBACK}:0", creds, udp_probes=udp)
    client = HostClient("h1", f"{LOOPBACK}:{port}", pki.client_creds())
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop(None)


def _exchange(port: int, datagram: bytes, wait: float = 0.3) -> bytes | None:
    """Send one datagram to the responder; its answer, or None if none came."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(wait)
        sock.sendto(datagram, (LOOPBACK, port))
        try:
            return sock.recv(512)
        except TimeoutError:
            return None


def test_keyed_probes_are_answered_with_the_execd_clock(pki: Pki) -> None:
    """A key from ProbeKey (over mTLS) opens the UDP path; sync over it finds the offset.

    The kernel stamps each arrival, so the delay left is the network's: on
    loopback well under a millisecond, and the offset within half of it.
    """

    async def body() -> None:
        async with execd(pki) as (server, client):
            est = await measure(client, SyncPolicy(target=1e-9, limit=0.3, min_samples=8))
            assert server.probes is not None
            assert est.path == "udp" and est.note == ""
            assert est.samples >= 8
            assert est.delay < 0.001
            assert abs(est.offset - OFFSET) <= est.error_bound + 1e-6
            assert server.probes.counts.answered == est.samples
            assert (est.lost, est.ignored) == (0, 0)

    run(body())


def test_forged_replayed_and_stale_probes_are_ignored_and_counted(pki: Pki) -> None:
    """Only a probe MAC'd under a live key, with a new sequence number, gets an answer."""

    async def body() -> None:
        async with execd(pki) as (server, client):
            key = await client.probe_key()
            probes = server.probes
            assert probes is not None and key.port == probes.port
            good = encode_probe(key.key_id, key.key, 1)
            assert await asyncio.to_thread(_exchange, key.port, good) is not None
            # replayed: the very same datagram again, then an older sequence number
            assert await asyncio.to_thread(_exchange, key.port, good) is None
            # forged: a key of our own making, an unknown key id, garbage
            forged = encode_probe(key.key_id, b"x" * 32, 2)
            unknown = encode_probe(b"12345678", key.key, 3)
            for datagram in (forged, unknown, b"hello"):
                assert await asyncio.to_thread(_exchange, key.port, datagram) is None
            # stale: a valid probe under a key whose life has ended
            old = await client.probe_key()
            probes.now = lambda: time.monotonic() + 2 * old.valid_for  # its life passes
            stale = encode_probe(old.key_id, old.key, 1)
            assert await asyncio.to_thread(_exchange, key.port, stale) is None
            counts = probes.counts
            assert (counts.answered, counts.forged, counts.replayed, counts.stale) == (1, 3, 1, 1)
            # the execd hands its counts to the next caller that asks for a key
            later = await client.probe_key()
            assert later.counts is not None and later.counts.stale == 1

    run(body())


def test_replies_the_caller_cannot_verify_are_ignored(pki: Pki) -> None:
    """A reply under another key, or to another probe, does not count as the answer."""

    async def body() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fake:
            fake.bind((LOOPBACK, 0))
            port = int(fake.getsockname()[1])
            key = ProbeKey(port, b"k" * 8, b"s" * 32, 60.0)
            path = UdpProbePath("h1", (LOOPBACK, port), key)

            def answer_badly() -> None:
                data, peer = fake.recvfrom(512)
                seq = int.from_bytes(data[13:21], "big")
                fake.sendto(encode_reply(key.key_id, b"t" * 32, seq, 1.0, 2.0), peer)  # bad MAC
                fake.sendto(encode_reply(key.key_id, key.key, seq + 7, 1.0, 2.0), peer)  # other

            try:
                helper = asyncio.create_task(asyncio.to_thread(answer_badly))
                assert await path.sample(0.3) is None
                await helper
                assert path.ignored == 2
            finally:
                path.close()

    run(body())


def test_a_path_that_answers_nothing_falls_back_to_grpc_and_says_so(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probes dropped on the way (a firewall) end in gRPC probes, with the reason given.

    The responder swallows every datagram, as a DROP rule would (the lab test
    uses a real nftables rule); sync still finds the offset, over gRPC.
    """

    async def body() -> None:
        async with execd(pki) as (server, client):
            probes = server.probes
            assert probes is not None
            port = probes.port
            monkeypatch.setattr(probes, "answer", lambda _data, _received: None)
            policy = SyncPolicy(target=1e-9, limit=0.3, probe_timeout=0.05)
            est = await measure(client, policy)
            assert est.path == "grpc"
            assert f"no answer from udp {LOOPBACK}:{port} to 3 probes" in est.note
            assert "gRPC" in est.note
            assert est.lost == 3
            assert abs(est.offset - OFFSET) <= est.error_bound + 1e-6

    run(body())


def test_an_execd_without_the_path_is_probed_over_grpc(pki: Pki) -> None:
    """An execd that offers no UDP path (port 0 in its key reply) is probed over gRPC."""

    async def body() -> None:
        async with execd(pki, udp=False) as (_server, client):
            assert (await client.probe_key()).port == 0
            est = await measure(client, SyncPolicy(target=1e-9, limit=0.2))
            assert est.path == "grpc"
            assert "offers no UDP probe path" in est.note
            assert est.samples >= 8

    run(body())


def test_a_taken_udp_port_leaves_the_execd_serving(pki: Pki) -> None:
    """If the UDP port is taken, the execd serves gRPC anyway and offers no UDP path."""

    async def body() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind((LOOPBACK, 0))
            port = int(taken.getsockname()[1])
            creds = server_credentials(pki.ca.cert, pki.server.cert, pki.server.key)
            server, bound = await start_server(
                cast(ExecdApi, ClockApi()), f"{LOOPBACK}:{port}", creds
            )
            client = HostClient("h1", f"{LOOPBACK}:{bound}", pki.client_creds())
            try:
                assert server.probes is None
                assert await client.probe_path() is None
            finally:
                await client.close()
                await server.stop(None)

    run(body())


@pytest.mark.parametrize("life", [0.0, 60.0])
def test_responder_answer_is_pure_enough_to_reason_about(life: float) -> None:
    """``answer`` alone (no socket): a live key answers once per sequence number."""
    responder = ProbeResponder((LOOPBACK, 0), lambda wall: wall + OFFSET, key_life=life)
    key = responder.issue_key()
    first = responder.answer(encode_probe(key.key_id, key.key, 5), received=100.0)
    again = responder.answer(encode_probe(key.key_id, key.key, 5), received=100.0)
    if life:
        assert first is not None and again is None
        assert responder.counts.replayed == 1
    else:
        assert first is None and again is None
        assert responder.counts.stale == 2
