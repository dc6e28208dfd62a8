"""Watching the event loop: how long a coroutine kept it from running anything else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["longest_stall"]

T = TypeVar("T")
TICK = 0.01  # s between the watcher's looks


async def longest_stall(work: Awaitable[T]) -> tuple[T, float]:
    """Await ``work`` while a task ticks every 10 ms; its result and the longest gap (s).

    A step that blocks the loop (a long write, an fsync) shows as a gap far
    above the tick; one done on a worker thread does not.
    """
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        result = await work
    finally:
        ticker.cancel()
    return result, max(gaps, default=0.0)
