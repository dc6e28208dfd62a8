"""Client of the QEMU guest agent (qemu-ga) in a VM, over its virtio-serial port's socket.

The agent speaks QMP's JSON (``{"execute": ...}`` in, ``{"return": ...}`` or
``{"error": ...}`` out, one reply per command, in order) but has no greeting
and no ids: a reply is matched to its command by order alone. So the stream is
synchronised first, as QEMU's documentation prescribes: a 0xFF byte (it makes
the agent drop any half-read command of an earlier client), then
``guest-sync-delimited`` with a random id, whose reply the agent starts with a
0xFF byte; everything before that reply is stale and skipped. A command that
times out leaves the stream out of step: the client closes it.

QEMU serves the socket to one client at a time: use one GuestAgent per VM, and
close it when done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from pathlib import Path
from typing import Any

from lockstep.aio import AsyncClosing
from lockstep.errors import GuestAgentError

__all__ = ["GuestAgent"]

_SENTINEL = b"\xff"
_LIMIT = 1 << 20  # bytes of one reply


class GuestAgent(AsyncClosing):
    """One connection to the guest agent of VM ``vm`` on ``socket_path``."""

    def __init__(self, vm: str, socket_path: Path) -> None:
        self.vm = vm
        self.socket_path = Path(socket_path)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        """Close the connection, if any."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def sync(self, timeout: float) -> None:
        """Connect and bring the stream in step (``guest-sync-delimited``).

        Raises:
            GuestAgentError: no connection, or no matching reply within ``timeout`` s.
        """
        ident = secrets.randbelow(1 << 31)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": ident}}
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await self._connect()
                writer.write(_SENTINEL + json.dumps(request).encode() + b"\n")
                await writer.drain()
                while True:
                    await reader.readuntil(_SENTINEL)
                    # Stale half lines end where the next sentinel begins a reply.
                    line = (await reader.readline()).rsplit(_SENTINEL, 1)[-1]
                    reply = _decode(line)
                    if reply is not None and reply.get("return") == ident:
                        return
        except TimeoutError as exc:
            await self.close()
            raise GuestAgentError(
                f"VM {self.vm}: the guest agent did not answer within {timeout:g} s"
            ) from exc
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            await self.close()
            raise GuestAgentError(
                f"VM {self.vm}: the guest agent's channel {self.socket_path} failed: {exc}"
            ) from exc

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float
    ) -> Any:
        """Run ``command`` and return what the agent returns (call :meth:`sync` first).

        Raises:
            GuestAgentError: the agent refused it, or did not answer within ``timeout``
                s (the connection is closed then: the stream is out of step).
        """
        if self._reader is None or self._writer is None:
            raise GuestAgentError(f"VM {self.vm}: the guest agent is not connected (sync first)")
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(json.dumps(message).encode() + b"\n")
                await self._writer.drain()
                while (reply := _decode(await self._reader.readline())) is None:
                    pass
        except TimeoutError as exc:
            await self.close()
            raise GuestAgentError(
                f"VM {self.vm}: the guest agent did not answer {command} within {timeout:g} s"
            ) from exc
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            await self.close()
            raise GuestAgentError(
                f"VM {self.vm}: the guest agent's channel failed during {command}: {exc}"
            ) from exc
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc", error) if isinstance(error, dict) else error
            raise GuestAgentError(f"VM {self.vm}: the guest agent refused {command}: {desc}")
        return reply.get("return")

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        await self.close()
        reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=_LIMIT)
        self._reader, self._writer = reader, writer
        return reader, writer


def _decode(line: bytes) -> dict[str, Any] | None:
    """The reply on ``line``, or None for a blank or stale line.

    Raises:
        asyncio.IncompleteReadError: ``line`` has no newline: the channel closed.
    """
    if not line.endswith(b"\n"):
        raise asyncio.IncompleteReadError(line, None)
    try:
        reply = json.loads(line.strip(_SENTINEL + b" \r\n").decode("utf-8", "replace"))
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None
