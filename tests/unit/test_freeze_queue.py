"""The freeze's frame queue: memory first, then a spill file, always in arrival order."""

from __future__ import annotations

from pathlib import Path

from lockstep.net.freeze import _FrameQueue


def test_frames_spill_to_disk_past_the_bound_and_keep_their_order(tmp_path: Path) -> None:
    """Past ``in_memory`` frames go to a spill file; reading gives all in order, twice.

    Frames appended after a read are read after the earlier ones; clear() empties all.
    """
    q = _FrameQueue(2, tmp_path / "spill")
    frames = [(float(i), bytes([i]) * (60 + i)) for i in range(5)]
    for f in frames:
        q.append(f)
    assert (len(q), len(q.memory), q.spilled) == (5, 2, 3)
    assert list(q) == frames
    q.append((5.0, b"late" * 20))
    assert list(q) == [*frames, (5.0, b"late" * 20)]
    q.clear()
    assert (len(q), list(q)) == (0, [])
