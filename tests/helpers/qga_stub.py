"""A QEMU guest agent (qemu-ga) a test can script, on a unix socket, in the test's event loop.

It answers as qemu-ga does, one command at a time and in order: the reply to
``guest-sync-delimited`` starts with a 0xFF byte, ``guest-get-time`` returns its
guest's wall clock in ns, ``guest-set-time`` sets it. The guest's clock is the
host's wall clock plus :attr:`QgaStub.offset` (``behind`` seconds behind at
first). Each command takes ``leg`` seconds to arrive and its reply as long to
come back, as a busy guest's virtio-serial port makes them, and the n-th
``guest-set-time`` takes ``late_sets[n]`` seconds more to take effect (a guest
whose vCPU waits for a core); a new client first gets ``stale`` bytes (what an earlier client left unread); commands named in
``refuse`` are refused with that text, those in ``hang`` never answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["QgaStub"]


@dataclass
class QgaStub:
    """A scripted guest agent; :meth:`serving` runs it on a socket for the block's duration."""

    behind: float = 0.0
    leg: float = 0.0
    stale: bytes = b""
    refuse: Mapping[str, str] = field(default_factory=dict)
    hang: frozenset[str] = frozenset()
    late_sets: tuple[float, ...] = ()
    offset: float = 0.0
    received: list[str] = field(default_factory=list)
    set_to: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offset = -self.behind

    def guest_now(self) -> float:
        """The guest's wall clock now, s."""
        return time.time() + self.offset

    @contextlib.asynccontextmanager
    async def serving(self, path: Path) -> AsyncIterator[QgaStub]:
        """Serve on unix socket ``path`` until the block ends."""
        server = await asyncio.start_unix_server(self._session, path)
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.stale)
        try:
            while line := await reader.readline():
                try:
                    command = json.loads(line.lstrip(b"\xff"))
                except ValueError:
                    continue  # what a 0xFF made the agent drop
                reply = await self._answer(command)
                if reply is None:
                    await asyncio.Event().wait()  # hang: never set, until cancelled
                    return
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(self, command: dict[str, Any]) -> bytes | None:
        name = str(command.get("execute"))
        args: dict[str, Any] = command.get("arguments") or {}
        self.received.append(name)
        await asyncio.sleep(self.leg)
        if name in self.hang:
            return None
        body: dict[str, Any]
        prefix = b""
        if name in self.refuse:
            body = {"error": {"class": "GenericError", "desc": self.refuse[name]}}
        elif name == "guest-sync-delimited":
            prefix, body = b"\xff", {"return": args["id"]}
        elif name == "guest-get-time":
            body = {"return": round(self.guest_now() * 1e9)}
        elif name == "guest-set-time":
            if len(self.set_to) < len(self.late_sets):
                await asyncio.sleep(self.late_sets[len(self.set_to)])
            self.offset = int(args["time"]) / 1e9 - time.time()
            self.set_to.append(int(args["time"]))
            body = {"return": {}}
        else:
            body = {"error": {"class": "CommandNotFound", "desc": f"{name} not found"}}
        await asyncio.sleep(self.leg)
        return prefix + json.dumps(body).encode() + b"\n"
