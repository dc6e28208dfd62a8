"""The dead-man's timer: operations whose caller went quiet end by themselves at their deadline.

A caller commits, aborts or extends an operation before its deadline; if none
of that came, the operation expires at the deadline (a common instant with the
other hosts, which got the same one): paused VMs resume with their frames, a
save's staging state is dropped, a restore's new VMs are discarded (or, once
switched over, kept). What expiry means is the operation's own business
(``Operation.expire``); this loop only keeps time, and never dies: an
operation that fails to expire is logged and closed, and the timer goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

__all__ = ["DeadMan", "Expirable"]

log = logging.getLogger(__name__)

_TICK = 0.05  # s: the longest the timer sleeps without looking
_EARLY = 0.01  # s: an operation this close to its deadline expires now


class Expirable(Protocol):
    """What the timer needs of an operation."""

    @property
    def id(self) -> str: ...

    @property
    def deadline(self) -> float: ...

    @property
    def due(self) -> bool:
        """Whether it may expire now (not ended, no step of it running)."""


class DeadMan:
    """Expires due operations; ``ops`` lists them, ``expire`` ends one, ``close`` forgets one."""

    def __init__(
        self,
        now: Callable[[], float],
        ops: Callable[[], Iterable[Expirable]],
        expire: Callable[[Expirable], Awaitable[None]],
        close: Callable[[Expirable], None],
    ) -> None:
        self._now = now
        self._ops = ops
        self._expire = expire
        self._close = close
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the timer in the running loop."""
        self._task = asyncio.create_task(self.run(), name="dead-man")

    async def stop(self) -> None:
        """Stop the timer."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def tick(self) -> None:
        """Expire every operation that is due now."""
        now = self._now()
        for op in [op for op in self._ops() if op.due and op.deadline - now < _EARLY]:
            log.warning("operation %s: no word from the caller by its deadline; ending it", op.id)
            try:
                await self._expire(op)
            except Exception:  # the safety net must outlive any one failure
                log.exception("operation %s could not expire cleanly; forgetting it", op.id)
                self._close(op)

    async def run(self) -> None:
        """Tick until cancelled, sleeping until the nearest deadline (at most a tick)."""
        while True:
            await self.tick()
            now = self._now()
            nearest = min((op.deadline for op in self._ops()), default=now + 1.0)
            await asyncio.sleep(min(_TICK, max(0.0, nearest - now - _EARLY)))
