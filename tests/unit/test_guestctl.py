"""Protocol tests of GuestControl against stub agents on a unix socket (no QEMU).

The stubs behave as the serial channel does: they echo requests back (the tty
before the agent sets it raw), send noise, split answers across writes, answer
out of order, come up late, or hang up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from lockstep.errors import LabError
from lockstep.lab import guestctl
from lockstep.lab.guestctl import GuestControl, parse_answer

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def stub(path: Path, handler: Handler) -> AsyncIterator[asyncio.Server]:
    """Serve ``handler`` on the unix socket ``path`` for the duration of the block."""
    server = await asyncio.start_unix_server(handler, path)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


def answer(request: dict[str, Any]) -> bytes:
    """What a well-behaved agent answers to ``request``."""
    if request.get("ping"):
        reply: dict[str, Any] = {"id": request["id"], "pong": True}
    else:
        reply = {"id": request["id"], "rc": 0, "out": f"ran {request['sh']}\n"}
    return json.dumps(reply).encode() + b"\n"


async def noisy_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo each request, add noise and a stray answer, then answer in two pieces."""
    writer.write(b"\x00\xffgarbage before anything\r\n")
    while line := await reader.readline():
        request = json.loads(line)
        writer.write(line.replace(b"\n", b"\r\n"))  # the tty's echo
        writer.write(b'{"id": 7, "rc": 0, "out": "for someone else"}\n')
        writer.write(b"[    3.14] kernel: noise\n")
        data = answer(request)
        writer.write(data[:5])
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(data[5:])
        await writer.drain()


async def silent_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept the connection, read everything, never answer (a hung guest)."""
    await reader.read()


async def commands(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list[Any]:
    """Answer pings (the client's handshake) as an agent does; return the next command."""
    while line := await reader.readline():
        request = json.loads(line)
        if not request.get("ping"):
            return [request]
        writer.write(answer(request))
        await writer.drain()
    return []


async def pong_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer pings, never a command (a command that hangs the guest)."""
    while await commands(reader, writer):
        pass


def test_parse_answer_skips_noise_and_echo() -> None:
    """Only JSON objects with an int id and pong, int clock_ns or (int rc, str out) are answers."""
    assert parse_answer(b'{"id": 3, "pong": true}\n') == (3, {"id": 3, "pong": True})
    assert parse_answer(b'{"id": 5, "clock_ns": 17}\n') == (5, {"id": 5, "clock_ns": 17})
    assert parse_answer(b'{"id": 4, "rc": 1, "out": "x"}\r\n') == (
        4,
        {"id": 4, "rc": 1, "out": "x"},
    )
    for noise in (
        b'{"id": 3, "ping": true}\n',  # our own request, echoed
        b'{"id": 3, "clock": true}\n',
        b'{"id": 3, "clock_ns": 1.5}\n',
        b'{"id": 3, "sh": "ls", "timeout": 3}\n',
        b'{"id": true, "pong": true}\n',
        b'{"id": 4, "rc": "0", "out": "x"}\n',
        b"[1,2]\n",
        b"lockstep-init: ready\n",
        b"\xff\xfe\n",
    ):
        assert parse_answer(noise) is None


def test_run_through_noise_echo_and_split_answers(tmp_path: Path) -> None:
    """run() returns the answer with its own id despite echo, noise, strays and split writes."""

    async def scenario() -> None:
        sock = tmp_path / "chan.sock"
        async with stub(sock, noisy_agent), GuestControl(sock) as ctl:
            await ctl.wait_ready(timeout=5)
            assert await ctl.run("uname -r", timeout=5) == (0, "ran uname -r\n")
            results = await asyncio.gather(*(ctl.run(f"cmd{i}", timeout=5) for i in range(5)))
            assert results == [(0, f"ran cmd{i}\n") for i in range(5)]

    asyncio.run(scenario())


def test_run_answers_out_of_order(tmp_path: Path) -> None:
    """Concurrent requests answered in reverse order each get their own answer."""

    async def reverse_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests = [r for _ in range(3) for r in await commands(reader, writer)]
        for request in reversed(requests):
            writer.write(answer(request))
        await writer.drain()
        await reader.read()

    async def scenario() -> None:
        sock = tmp_path / "chan.sock"
        async with stub(sock, reverse_agent), GuestControl(sock) as ctl:
            results = await asyncio.gather(*(ctl.run(f"c{i}", timeout=5) for i in range(3)))
            assert results == [(0, f"ran c{i}\n") for i in range(3)]

    asyncio.run(scenario())


def test_connect_retries_until_the_socket_appears(tmp_path: Path) -> None:
    """run() keeps trying while the socket is absent and succeeds once QEMU creates it."""

    async def scenario() -> None:
        sock = tmp_path / "late.sock"

        async def start_late() -> None:
            await asyncio.sleep(0.3)
            server = await asyncio.start_unix_server(noisy_agent, sock)
            await asyncio.sleep(2)
            server.close()

        late = asyncio.create_task(start_late())
        async with GuestControl(sock) as ctl:
            assert await ctl.run("true", timeout=5) == (0, "ran true\n")
        late.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await late

    asyncio.run(scenario())


def test_absent_socket_is_a_lab_error_naming_it(tmp_path: Path) -> None:
    """With no socket, run() fails after its timeout with a LabError naming the socket."""
    sock = tmp_path / "nothing.sock"

    async def scenario() -> None:
        async with GuestControl(sock) as ctl:
            await ctl.run("true", timeout=0.3)

    started = time.monotonic()
    with pytest.raises(LabError, match=r"cannot connect .*nothing\.sock") as info:
        asyncio.run(scenario())
    assert time.monotonic() - started < 2
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_hang_up_fails_the_waiting_request(tmp_path: Path) -> None:
    """If the channel closes before the answer, run() raises LabError at once."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await commands(reader, writer)
        writer.close()

    async def scenario() -> None:
        sock = tmp_path / "chan.sock"
        async with stub(sock, hang_up), GuestControl(sock) as ctl:
            with pytest.raises(LabError, match="closed before the guest answered"):
                await ctl.run("true", timeout=5)
            # The next request reconnects.
            with pytest.raises(LabError, match="closed before the guest answered"):
                await ctl.run("true", timeout=5)

    asyncio.run(scenario())


def test_silent_agent_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent that never answers makes run() raise LabError after timeout plus grace."""
    monkeypatch.setattr(guestctl, "_ANSWER_GRACE", 0.2)

    async def scenario() -> None:
        sock = tmp_path / "chan.sock"
        async with stub(sock, pong_only), GuestControl(sock) as ctl:
            with pytest.raises(LabError, match="did not answer command 'sleep 1'"):
                await ctl.run("sleep 1", timeout=0.2)

    asyncio.run(scenario())


def test_wait_ready_pings_until_the_agent_is_up(tmp_path: Path) -> None:
    """wait_ready() keeps pinging a guest that only listens after a while, then returns."""

    async def booting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_at = time.monotonic() + 0.7
        while line := await reader.readline():
            writer.write(line)  # the tty echoes while the agent is not up yet
            if time.monotonic() >= up_at:
                writer.write(answer(json.loads(line)))
            await writer.drain()

    async def scenario() -> None:
        sock = tmp_path / "chan.sock"
        async with stub(sock, booting), GuestControl(sock) as ctl:
            started = time.monotonic()
            await ctl.wait_ready(timeout=5)
            assert 0.6 < time.monotonic() - started < 3

    asyncio.run(scenario())


def test_run_waits_for_the_agent_and_loses_no_command_to_its_start(tmp_path: Path) -> None:
    """A command is not sent before the agent answers a ping: the agent flushes its port at start.

    The stub discards everything before it is up, as lsctl's tcflush does; a
    command sent then would never be answered. run() pings first, once per
    connection.
    """
    seen: list[Any] = []

    async def starting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_at = time.monotonic() + 0.6
        while line := await reader.readline():
            if time.monotonic() < up_at:
                continue  # flushed: never answered
            request = json.loads(line)
            seen.append(request)
            writer.write(answer(request))
            await writer.drain()

    async def scenario() -> None:
        sock = tmp_path / "chan.sock"
        async with stub(sock, starting), GuestControl(sock) as ctl:
            assert await ctl.run("true", timeout=5) == (0, "ran true\n")
            assert await ctl.run("false", timeout=5) == (0, "ran false\n")
        assert [r.get("sh", "ping") for r in seen] == ["ping", "true", "false"]

    asyncio.run(scenario())


def test_wait_ready_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    """A connected but silent guest makes wait_ready() raise LabError after its timeout."""

    async def scenario() -> None:
        sock = tmp_path / "chan.sock"
        async with stub(sock, silent_agent), GuestControl(sock) as ctl:
            await ctl.wait_ready(timeout=0.5)

    with pytest.raises(LabError, match=r"did not answer within 0\.5 s"):
        asyncio.run(scenario())


def test_cancellation_is_not_swallowed(tmp_path: Path) -> None:
    """Cancelling a waiting run() raises CancelledError, not LabError, and close() still works."""

    async def scenario() -> None:
        sock = tmp_path / "chan.sock"
        async with stub(sock, silent_agent):
            ctl = GuestControl(sock)
            task = asyncio.create_task(ctl.run("sleep 100", timeout=100))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await ctl.close()

    asyncio.run(scenario())
