"""Clock sync over the RPC channel, NTP style; no host clock is ever changed.

For one probe the caller stamps ``t0`` (sent) and ``t3`` (reply received) on its
clock, the execd ``t1`` (received) and ``t2`` (replied) on its own. Then::

    delay  = (t3 - t0) - (t2 - t1)
    offset = ((t1 - t0) + (t2 - t3)) / 2     # execd clock minus caller clock

The offset of the minimum-delay sample is kept; its error is at most half that
delay (whatever the asymmetry of the path), which bounds the skew we predict.

Sampling is adaptive (:class:`SyncPolicy`): probes go on until that bound
reaches a target, or a time limit is spent. The I/O lives in
:mod:`lockstep.caller.sync`; everything here is pure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "MIN_SAMPLES",
    "ClockEstimate",
    "Sample",
    "SyncPolicy",
    "estimate",
    "predicted_skew",
    "to_caller",
    "to_host",
]

MIN_SAMPLES = 8


@dataclass(frozen=True)
class Sample:
    """The four timestamps of one probe (t0, t3: caller clock; t1, t2: execd clock)."""

    t0: float
    t1: float
    t2: float
    t3: float

    @property
    def delay(self) -> float:
        """Round trip minus the execd's own handling time."""
        return (self.t3 - self.t0) - (self.t2 - self.t1)

    @property
    def offset(self) -> float:
        """Execd clock minus caller clock, assuming a symmetric path."""
        return ((self.t1 - self.t0) + (self.t2 - self.t3)) / 2


@dataclass(frozen=True)
class ClockEstimate:
    """One host's clock as the caller sees it: ``host = caller + offset`` (± delay/2).

    Besides the figures, how they were got: the probe ``path`` ("udp", the
    light path, or "grpc"), a ``note`` saying why gRPC was used when it was,
    probes ``lost`` (no reply in time), replies the caller ``ignored`` (not
    verifying, or late), what the execd reported it ``refused`` on its UDP
    path since it started (forged, replayed, stale) and the seconds spent.
    """

    offset: float
    delay: float
    samples: int
    path: str = "grpc"
    note: str = ""
    lost: int = 0
    ignored: int = 0
    refused: Mapping[str, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def error_bound(self) -> float:
        """The most the offset can be wrong by."""
        return self.delay / 2


@dataclass(frozen=True)
class SyncPolicy:
    """When a host's clock sampling stops.

    Probes go on until the error bound (half the least delay seen) is at most
    ``target`` seconds with at least ``min_samples`` taken, or ``limit``
    seconds are spent. A probe unanswered after ``probe_timeout`` s is lost;
    ``blocked_after`` lost in a row before any answer means the UDP path is
    blocked, and gRPC probes are used instead (with a limit of their own).
    """

    target: float = 25e-6
    limit: float = 1.0
    min_samples: int = MIN_SAMPLES
    probe_timeout: float = 0.1
    blocked_after: int = 3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target) and self.target > 0):
            raise ValueError(f"the sync target must be a positive time, not {self.target}")
        if not (math.isfinite(self.limit) and self.limit > 0):
            raise ValueError(f"the sync time limit must be a positive time, not {self.limit}")
        if self.min_samples < 1:
            raise ValueError(f"at least one clock sample is needed, not {self.min_samples}")

    def done(self, bound: float | None, samples: int, elapsed: float) -> bool:
        """Whether sampling stops at error ``bound`` after ``samples`` in ``elapsed`` s."""
        if elapsed >= self.limit:
            return True
        return samples >= self.min_samples and bound is not None and bound <= self.target


def estimate(samples: Iterable[Sample]) -> ClockEstimate:
    """The estimate from the minimum-delay sample.

    Raises:
        ValueError: no samples, or a sample with a negative or non-finite delay.
    """
    kept = list(samples)
    if not kept:
        raise ValueError("no clock samples")
    for s in kept:
        if not math.isfinite(s.delay) or s.delay < 0:
            raise ValueError(f"impossible clock sample (delay {s.delay})")
    best = min(kept, key=lambda s: s.delay)
    return ClockEstimate(offset=best.offset, delay=best.delay, samples=len(kept))


def predicted_skew(estimates: Mapping[str, ClockEstimate] | Sequence[ClockEstimate]) -> float:
    """Worst-case skew (s) that clock error alone can cause between two hosts.

    Two hosts' conversions can be wrong in opposite directions, so it is the
    sum of the two largest error bounds (the single bound's double for one
    host is not a skew: one host is consistent with itself, so it is 0).
    """
    values = list(estimates.values()) if isinstance(estimates, Mapping) else list(estimates)
    bounds = sorted((e.error_bound for e in values), reverse=True)
    if len(bounds) < 2:
        return 0.0
    return bounds[0] + bounds[1]


def to_host(caller_time: float, est: ClockEstimate) -> float:
    """A caller-clock instant on the host's clock."""
    return caller_time + est.offset


def to_caller(host_time: float, est: ClockEstimate) -> float:
    """A host-clock instant on the caller's clock."""
    return host_time - est.offset
