"""Small asyncio pieces shared by lockstep's clients."""

from __future__ import annotations

from typing import Self

__all__ = ["AsyncClosing"]


class AsyncClosing:
    """An object used with ``async with``: it is the context's value, and its close() ends it."""

    async def close(self) -> None:
        """Release what the object holds (subclasses say what); idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
