"""The execd's clock and waiting for an absolute instant on it.

The execd's clock is the host's wall clock plus ``--clock-offset`` (tests make
it wrong on purpose; the caller's sync must compensate). Waiting is done on the
monotonic clock: sleep until shortly before the instant, then spin, so a VM
action starts within microseconds of it even on a busy host.
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["SPIN_SECONDS", "ExecdClock"]

SPIN_SECONDS = 0.003


class ExecdClock:
    """Wall clock plus a fixed offset; converts its instants to monotonic time."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def now(self) -> float:
        """Seconds on this execd's clock."""
        return time.time() + self.offset

    def from_wall(self, wall: float) -> float:
        """A host wall-clock instant (as QEMU stamps its events) on this clock."""
        return wall + self.offset

    async def wait_until(self, at: float) -> float:
        """Return at instant ``at`` (this clock); returns how late we are (s, >= 0)."""
        target = time.monotonic() + (at - self.now())
        coarse = target - time.monotonic() - SPIN_SECONDS
        if coarse > 0:
            await asyncio.sleep(coarse)
        while time.monotonic() < target:
            pass
        return max(0.0, time.monotonic() - target)
