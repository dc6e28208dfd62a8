"""The arithmetic of setting a guest's wall clock: which probe counts, what to send, the correction."""

from __future__ import annotations

import pytest

from lockstep.execd.guest_clock import (
    TimeProbe,
    best_probe,
    correction_ms,
    set_again,
    time_to_send,
)


def test_the_quickest_probe_counts() -> None:
    """Of several round trips the shortest says the most (least room for one-sided delay)."""
    probes = [
        TimeProbe(10.0, 5.0, 10.030),
        TimeProbe(11.0, 6.0, 11.004),
        TimeProbe(12.0, 7.0, 12.01),
    ]
    assert best_probe(probes) == probes[1]
    with pytest.raises(ValueError, match="no time probe"):
        best_probe([])


def test_the_time_sent_is_ahead_by_half_a_round_trip() -> None:
    """Sent now, the set reaches the guest half a round trip later: the time sent is that far ahead."""
    probe = TimeProbe(sent=100.0, guest=50.0, received=100.008)
    assert time_to_send(1_800_000_000.0, probe) == 1_800_000_000_004_000_000


def test_the_correction_is_how_far_behind_the_guest_was() -> None:
    """The guest read its clock half way through the probe; true time is this host's plus the shift.

    A guest ahead of true time gets a negative correction.
    """
    behind = TimeProbe(sent=1000.0, guest=940.0, received=1000.010)
    assert correction_ms(behind, shift=0.5) == pytest.approx(60_505.0)
    ahead = TimeProbe(sent=1000.0, guest=1002.0, received=1000.002)
    assert correction_ms(ahead, shift=0.0) == pytest.approx(-1999.0)


def test_a_clock_is_set_again_only_when_measurably_off() -> None:
    """Off by more than the tolerance and than half the probe's round trip: set again."""
    assert set_again(TimeProbe(sent=10.0, guest=9.995, received=10.002), shift=0.0)
    assert not set_again(TimeProbe(sent=10.0, guest=10.0005, received=10.001), shift=0.0)
    # 5 ms off, but the reading could be anywhere in a 20 ms round trip: no telling.
    assert not set_again(TimeProbe(sent=10.0, guest=10.005, received=10.020), shift=0.0)
