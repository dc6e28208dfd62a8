"""Clock-offset estimation over a simulated channel, and the skew it predicts."""

from __future__ import annotations

import os
import random
import threading

import pytest

from lockstep.caller.clock import (
    ClockEstimate,
    Sample,
    estimate,
    predicted_skew,
    to_caller,
    to_host,
)
from lockstep.execd.clock import background


def _probe(offset: float, out: float, back: float, handling: float, t0: float) -> Sample:
    t1 = t0 + out + offset
    t2 = t1 + handling
    t3 = t2 - offset + back
    return Sample(t0, t1, t2, t3)


def test_symmetric_channel_gives_exact_offset() -> None:
    """With equal delays each way the offset is exact and the delay excludes handling time."""
    s = _probe(offset=2.5, out=0.001, back=0.001, handling=0.0005, t0=100.0)
    assert s.offset == pytest.approx(2.5, abs=1e-9)
    assert s.delay == pytest.approx(0.002, abs=1e-9)


def test_asymmetric_channel_error_within_half_delay() -> None:
    """An asymmetric path biases the offset, but never by more than half the delay."""
    rng = random.Random(7)
    for _ in range(500):
        out, back = rng.uniform(0, 0.01), rng.uniform(0, 0.01)
        s = _probe(offset=-1.25, out=out, back=back, handling=rng.uniform(0, 0.002), t0=50.0)
        assert abs(s.offset - -1.25) <= s.delay / 2 + 1e-12


def test_minimum_delay_sample_is_kept() -> None:
    """Of many noisy probes, the least-delayed one wins, so one fast probe suffices."""
    rng = random.Random(1)
    samples = [
        _probe(2.5, rng.uniform(0.002, 0.05), rng.uniform(0.0, 0.05), 0.0001, float(i))
        for i in range(8)
    ]
    samples.append(_probe(2.5, 0.0001, 0.0001, 0.0001, 9.0))
    est = estimate(samples)
    assert est.samples == 9
    assert est.delay == pytest.approx(0.0002, abs=1e-9)
    assert est.offset == pytest.approx(2.5, abs=1e-4)


def test_estimate_refuses_nonsense() -> None:
    """No samples, or a sample whose reply came before its request, is an error."""
    with pytest.raises(ValueError, match="no clock samples"):
        estimate([])
    with pytest.raises(ValueError, match="impossible"):
        estimate([Sample(10.0, 0.0, 0.0, 9.0)])


def test_scheduling_round_trip() -> None:
    """An instant converted to a host's clock and back is the same instant."""
    est = ClockEstimate(offset=2.5, delay=0.001, samples=8)
    assert to_host(100.0, est) == 102.5
    assert to_caller(to_host(100.0, est), est) == 100.0


def test_predicted_skew_two_largest_bounds() -> None:
    """Skew bound is the sum of the two largest half-delays; one host alone has none."""
    a = ClockEstimate(0.0, 0.002, 8)
    b = ClockEstimate(1.0, 0.004, 8)
    c = ClockEstimate(2.0, 0.0002, 8)
    assert predicted_skew({"a": a, "b": b, "c": c}) == pytest.approx(0.003)
    assert predicted_skew([a]) == 0.0


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a thread's priority back needs root")
def test_background_lowers_only_this_thread_then_restores_it() -> None:
    """Inside background() the calling thread runs at nice 19; after it, as before.

    Another thread keeps its own priority all along (a thread id's nice is its own).
    """
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    inside, looked = threading.Event(), threading.Event()
    seen: list[int] = []

    def look() -> None:
        inside.wait(5)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        looked.set()

    other = threading.Thread(target=look)
    other.start()
    with background():
        assert os.getpriority(os.PRIO_PROCESS, tid) == 19
        inside.set()
        looked.wait(5)
    other.join()
    assert seen == [before]
    assert os.getpriority(os.PRIO_PROCESS, tid) == before
