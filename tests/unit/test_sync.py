"""Adaptive clock sampling: it stops at the target bound, or at the time limit with the bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from lockstep.caller.clock import SyncPolicy
from lockstep.caller.sync import measure
from lockstep.execd.model import ProbeReply

OFFSET = -1.5


@dataclass
class ScriptedPath:
    """A probe path whose round trips take the scripted delays (s), then the last one forever."""

    delays: list[float]
    ignored: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    closed: bool = False

    @property
    def description(self) -> str:
        return "scripted"

    async def sample(self, timeout: float) -> tuple[float, ProbeReply, float] | None:
        delay = self.delays[min(self.sent, len(self.delays) - 1)]
        self.sent += 1
        await asyncio.sleep(0.001)  # a probe takes time, so limits are reached
        t0 = 1000.0 + self.sent
        t1 = t0 + delay / 2 + OFFSET
        return t0, ProbeReply(received=t1, sent=t1), t0 + delay

    def close(self) -> None:
        self.closed = True


@dataclass
class ScriptedLink:
    """An execd whose UDP path is ``path`` (None: it has none); gRPC probes take 2 ms."""

    path: ScriptedPath | None
    grpc_probes: int = 0

    async def probe(self, sent: float) -> ProbeReply:
        self.grpc_probes += 1
        return ProbeReply(received=sent + 0.001 + OFFSET, sent=sent + 0.001 + OFFSET)

    async def probe_path(self) -> ScriptedPath | None:
        return self.path


def _clock() -> Iterator[float]:
    t = 5000.0
    while True:
        yield t
        t += 0.002


def test_sampling_stops_once_the_bound_reaches_the_target() -> None:
    """Delays fall from 1 ms to 40 us: sampling stops at the first sample with bound <= 25 us."""
    path = ScriptedPath([0.001] * 10 + [0.00004] + [0.00001] * 100)
    est = asyncio.run(measure(ScriptedLink(path), SyncPolicy(target=25e-6, limit=5.0)))
    assert est.samples == 11
    assert est.error_bound == pytest.approx(20e-6)
    assert est.offset == pytest.approx(OFFSET)
    assert est.path == "udp" and est.note == ""
    assert path.closed


def test_at_least_min_samples_are_taken_even_if_the_first_is_good() -> None:
    """One lucky probe is not enough: the minimum number of samples is always taken."""
    path = ScriptedPath([0.00001])
    est = asyncio.run(measure(ScriptedLink(path), SyncPolicy(target=25e-6, min_samples=8)))
    assert est.samples == 8


def test_sampling_stops_at_the_time_limit_and_reports_the_bound_it_got() -> None:
    """A path that never gets below 0.3 ms stops at the limit, bound 0.15 ms, time spent."""
    path = ScriptedPath([0.0003])
    start = time.monotonic()
    est = asyncio.run(measure(ScriptedLink(path), SyncPolicy(target=25e-6, limit=0.2)))
    spent = time.monotonic() - start
    assert 0.2 <= est.elapsed <= spent
    assert est.error_bound == pytest.approx(0.00015)
    assert est.samples > 8


def test_grpc_fallback_samples_adaptively_too() -> None:
    """Without a UDP path, gRPC probes go on until the limit (2 ms never meets 25 us)."""
    link = ScriptedLink(None)
    clock = _clock()
    est = asyncio.run(measure(link, SyncPolicy(limit=0.05), clock=lambda: next(clock)))
    assert est.path == "grpc"
    assert est.samples == link.grpc_probes >= 8
    assert est.delay == pytest.approx(0.002)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"target": 0.0}, "sync target must be a positive time"),
        ({"limit": float("inf")}, "sync time limit must be a positive time"),
        ({"min_samples": 0}, "at least one clock sample"),
    ],
)
def test_policy_refuses_nonsense(kwargs: dict[str, float], fragment: str) -> None:
    """A policy that could never stop, or stop with nothing, is refused when made."""
    with pytest.raises(ValueError, match=fragment):
        SyncPolicy(**kwargs)  # type: ignore[arg-type]
