"""Host-side client of a lab guest's control agent (``guest/lsctl.py``).

Why a serial channel: a lab guest's NICs belong to the experiment (lockstep
freezes their frames), so the host reaches the guest through its second serial
port, which QEMU serves as a unix socket (``-chardev socket,server=on,wait=off``).

The channel is noisy and the agent may not be there yet: QEMU accepts a
connection long before the guest has booted, the guest's tty echoes what it
receives until the agent sets it raw, and a previous client may have left half
a line. So the client matches answers to requests by id, skips every line that
is not an answer, and retries connecting while the socket is absent or refuses.
Several requests may be in flight at once on one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
from pathlib import Path
from typing import Any

from lockstep.aio import AsyncClosing
from lockstep.errors import LabError

__all__ = ["GuestControl", "parse_answer"]

_LINE_LIMIT = 16 << 20  # the agent cuts output at 1 MiB; JSON escaping may grow it
_CONNECT_RETRY = 0.1  # seconds between connection attempts
_ANSWER_GRACE = 5.0  # seconds to wait beyond the guest-side timeout for its rc-124 answer
_PING_EVERY = 0.5  # seconds between pings while waiting for the agent


def parse_answer(line: bytes) -> tuple[int, dict[str, Any]] | None:
    """The (id, answer) on ``line`` when it is an agent's answer, else None (noise).

    An answer is a JSON object with an integer ``id`` and either ``pong: true``,
    an integer ``clock_ns``, or an integer ``rc`` with a string ``out``. Requests
    echoed back by the guest's tty have none of them, so they count as noise.
    """
    try:
        message = json.loads(line.decode("utf-8", "replace"))
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    ident = message.get("id")
    if not isinstance(ident, int) or isinstance(ident, bool):
        return None
    if message.get("pong") is True or _is_int(message.get("clock_ns")):
        return ident, message
    rc, out = message.get("rc"), message.get("out")
    if isinstance(rc, int) and not isinstance(rc, bool) and isinstance(out, str):
        return ident, message
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _ChannelClosedError(LabError):
    """The channel closed while requests were waiting for their answers."""


class GuestControl(AsyncClosing):
    """Client of the guest's control agent over the VM's serial channel (a unix socket QEMU serves).

    Create it anywhere; it connects on first use, inside the running loop. QEMU
    serves one client at a time on the socket: use one GuestControl per guest.
    """

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = Path(socket_path)
        # Ids start at a random point so that a late answer meant for an earlier
        # client of the same guest cannot be taken for an answer to this one.
        self._ids = itertools.count(1 + secrets.randbelow(1 << 40))
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._ready = False  # the agent answered a ping on this connection
        self._ready_lock: asyncio.Lock | None = None

    # The timeout is an argument, not the caller's asyncio.timeout(): the guest must know it.
    async def run(self, command: str, *, timeout: float = 30.0) -> tuple[int, str]:
        """Run ``command`` with /bin/sh in the guest; return its exit status and output.

        ``timeout`` covers connecting and running. The guest kills a command that
        runs past it and answers status 124 (returned, not raised).

        Raises:
            LabError: no connection could be made to the channel in time, it broke,
                or the guest did not answer.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._handshake(timeout)
        writer = await self._connect(deadline)
        remaining = max(deadline - loop.time(), 0.1)
        request = {"id": 0, "sh": command, "timeout": round(remaining, 3)}
        what = f"command {command!r}"
        answer = await self._request(writer, request, remaining + _ANSWER_GRACE, what)
        return int(answer["rc"]), str(answer["out"])

    async def clock(self, *, timeout: float = 10.0) -> tuple[float, float, float]:
        """Read the guest's wall clock: (sent, guest, received), seconds.

        ``sent`` and ``received`` are this host's wall clock around the request;
        the guest read its clock between them (the agent answers at once, with
        no process started), so ``received - sent`` bounds the reading.

        Raises:
            LabError: no connection could be made, it broke, or the guest did not answer.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._handshake(timeout)
        writer = await self._connect(deadline)
        wait = max(deadline - loop.time(), 0.1)
        sent = time.time()
        answer = await self._request(writer, {"id": 0, "clock": True}, wait, "a clock reading")
        received = time.time()
        return sent, int(answer["clock_ns"]) / 1e9, received

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the guest's agent answers a ping (the guest has booted).

        Raises:
            LabError: the agent did not answer within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pings: list[asyncio.Future[dict[str, Any]]] = []
        try:
            while True:
                try:
                    writer = await self._connect(deadline)
                    # Earlier pings stay registered: the agent may answer a ping
                    # that sat in QEMU's buffers while the guest was booting.
                    pings.append(self._send(writer, {"id": 0, "ping": True}))
                    await writer.drain()
                    wait = max(min(_PING_EVERY, deadline - loop.time()), 0.0)
                    done, _ = await asyncio.wait(
                        pings, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                    )
                    if any(f.exception() is None for f in done):
                        self._ready = True
                        return
                    if done:  # the channel closed under the pings: reconnect
                        await asyncio.sleep(_CONNECT_RETRY)
                except ConnectionError:
                    await asyncio.sleep(_CONNECT_RETRY)
                for ping in [f for f in pings if f.done()]:
                    self._forget(ping)
                    pings.remove(ping)
                if loop.time() >= deadline:
                    raise LabError(
                        f"the control agent of the guest on {self.socket_path} did not "
                        f"answer within {timeout:g} s (has the guest booted? see its console log)"
                    )
        finally:
            for ping in pings:
                self._forget(ping)

    async def _handshake(self, timeout: float) -> None:
        """Ping once per connection before the first command (concurrent callers share it).

        The agent flushes its port when it starts: a command that arrives just
        before would be lost, never answered. A pong says it is listening.
        """
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if not self._ready:
                await self.wait_ready(timeout=timeout)

    async def close(self) -> None:
        """Close the connection (if any); requests still waiting fail with LabError."""
        writer, task = self._writer, self._reader_task
        self._writer = self._reader_task = None
        self._ready = False
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if task is not None:
            await task

    async def _connect(self, deadline: float) -> asyncio.StreamWriter:
        """The open connection, made now if needed, retrying until ``deadline``."""
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._writer is not None and self._reader_task and not self._reader_task.done():
                return self._writer
            await self.close()
            loop = asyncio.get_running_loop()
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(
                        self.socket_path, limit=_LINE_LIMIT
                    )
                    break
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    if loop.time() >= deadline:
                        raise LabError(
                            f"cannot connect to the guest control channel {self.socket_path}: "
                            f"{exc.strerror or exc} (is the VM running?)"
                        ) from exc
                    await asyncio.sleep(_CONNECT_RETRY)
                except OSError as exc:
                    raise LabError(
                        f"cannot connect to the guest control channel {self.socket_path}: {exc}"
                    ) from exc
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_answers(reader))
            return writer

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        """Hand each answer to the request waiting for it, until the channel closes."""
        why = "closed"
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # a line over the limit: noise, already dropped
                    continue
                except OSError as exc:
                    why = f"failed ({exc})"
                    break
                if not line:
                    break
                parsed = parse_answer(line)
                if parsed is None:
                    continue
                future = self._pending.get(parsed[0])
                if future is not None and not future.done():
                    future.set_result(parsed[1])
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(
                        _ChannelClosedError(
                            f"the guest control channel {self.socket_path} {why} "
                            "before the guest answered"
                        )
                    )
                    future.exception()  # retrieved here, so an abandoned ping is not logged

    def _send(
        self, writer: asyncio.StreamWriter, request: dict[str, Any]
    ) -> asyncio.Future[dict[str, Any]]:
        """Send ``request`` under a fresh id; return the future its answer will complete."""
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        writer.write(json.dumps({**request, "id": ident}, separators=(",", ":")).encode() + b"\n")
        return future

    def _forget(self, future: asyncio.Future[dict[str, Any]]) -> None:
        for ident, pending in list(self._pending.items()):
            if pending is future:
                del self._pending[ident]
        if not future.done():
            future.cancel()

    async def _request(
        self, writer: asyncio.StreamWriter, request: dict[str, Any], wait: float, what: str
    ) -> dict[str, Any]:
        future = self._send(writer, request)
        try:
            await writer.drain()
            return await asyncio.wait_for(future, wait)
        except TimeoutError as exc:
            raise LabError(
                f"the guest on {self.socket_path} did not answer {what} within {wait:.1f} s"
            ) from exc
        except ConnectionError as exc:
            raise LabError(
                f"guest control channel {self.socket_path} broke while sending {what}: {exc}"
            ) from exc
        finally:
            self._forget(future)
