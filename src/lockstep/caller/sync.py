"""Clock sync with one host: adaptive sampling over the light path, gRPC as the fallback.

The caller asks the host's execd for a probe key over mutual TLS and probes
its UDP path (:mod:`lockstep.rpc.probe`) until :class:`SyncPolicy` says stop.
If the execd offers no UDP path, or the path answers nothing at first (a
firewall), it probes over gRPC instead, and the estimate says so in its ``note``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Protocol

from lockstep.caller.clock import ClockEstimate, Sample, SyncPolicy, estimate
from lockstep.errors import ClockError
from lockstep.execd.model import ProbeReply

__all__ = ["ProbeLink", "ProbePath", "measure"]


class ProbePath(Protocol):
    """The light probe path to one execd, under one key (``lockstep.rpc.UdpProbePath``)."""

    @property
    def ignored(self) -> int:
        """Replies ignored so far (not verifying, or late)."""

    @property
    def refused(self) -> dict[str, int]:
        """What the execd's end had ignored when the key was issued, by reason."""

    @property
    def description(self) -> str:
        """Where the probes go, for reports."""

    async def sample(self, timeout: float) -> tuple[float, ProbeReply, float] | None:
        """One probe: (sent, the execd's stamps, received); None if no reply in time."""

    def close(self) -> None:
        """Release the path."""


class ProbeLink(Protocol):
    """What clock sync needs of one execd."""

    async def probe(self, sent: float) -> ProbeReply: ...
    async def probe_path(self) -> ProbePath | None: ...


class _Sampler:
    """Samples kept so far, and the least delay among them."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.best: float | None = None

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        if self.best is None or sample.delay < self.best:
            self.best = sample.delay

    @property
    def bound(self) -> float | None:
        return None if self.best is None else self.best / 2


async def _over_udp(path: ProbePath, policy: SyncPolicy) -> tuple[_Sampler, int, str]:
    """Sample over ``path``; (samples, probes lost, why it was given up: "" if it was not)."""
    kept = _Sampler()
    lost = 0
    start = time.monotonic()
    while not policy.done(kept.bound, len(kept.samples), time.monotonic() - start):
        got = await path.sample(policy.probe_timeout)
        if got is None:
            lost += 1
            if not kept.samples and lost >= policy.blocked_after:
                return (
                    kept,
                    lost,
                    (
                        f"no answer from {path.description} to {lost} probes (a firewall?);"
                        " probed over gRPC instead"
                    ),
                )
            continue
        sent, reply, received = got
        kept.add(Sample(sent, reply.received, reply.sent, received))
    return kept, lost, ""


async def _over_grpc(link: ProbeLink, policy: SyncPolicy, clock: Callable[[], float]) -> _Sampler:
    kept = _Sampler()
    start = time.monotonic()
    while not policy.done(kept.bound, len(kept.samples), time.monotonic() - start):
        t0 = clock()
        reply = await link.probe(t0)
        kept.add(Sample(t0, reply.received, reply.sent, clock()))
    return kept


async def measure(
    link: ProbeLink, policy: SyncPolicy, clock: Callable[[], float] = time.time
) -> ClockEstimate:
    """One host's clock offset and delay, sampled as ``policy`` says.

    Raises:
        RpcError: the host could not be reached (key call or gRPC probes).
        ClockError: no usable sample.
    """
    start = time.monotonic()
    path = await link.probe_path()
    lost, ignored, refused = 0, 0, {}
    if path is None:
        note = "the execd offers no UDP probe path; probed over gRPC"
    else:
        try:
            kept, lost, note = await _over_udp(path, policy)
            ignored, refused = path.ignored, dict(path.refused)
        finally:
            path.close()
    if path is None or note:
        kept = await _over_grpc(link, policy, clock)
    try:
        est = estimate(kept.samples)
    except ValueError as exc:
        raise ClockError(f"clock sync: {exc}") from exc
    return dataclasses.replace(
        est,
        path="grpc" if path is None or note else "udp",
        note=note,
        lost=lost,
        ignored=ignored,
        refused=refused,
        elapsed=time.monotonic() - start,
    )
