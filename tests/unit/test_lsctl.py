"""The guest control agent (guest/lsctl.py) run on the host, on a pty standing in for ttyS1.

A pty behaves like the guest's serial port where it matters: it echoes until the
agent sets it raw, and it stays when the host side goes away. The last test joins
the real agent and GuestControl through a unix socket, as QEMU would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from lockstep.lab.guestctl import GuestControl

AGENT = Path(str(resources.files("lockstep.lab").joinpath("guest", "lsctl.py")))


class Port:
    """The host end (pty master) of the agent's serial port."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.pending = b""

    def send(self, message: dict[str, Any] | bytes) -> None:
        """Write one request line (or raw bytes) to the agent."""
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        os.write(self.master, data)

    def answers(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The next ``count`` lines that parse as JSON objects with a "rc", "pong" or "clock_ns"."""
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {found} within {timeout} s"
            if b"\n" not in self.pending:
                ready, _, _ = select.select([self.master], [], [], remaining)
                if ready:
                    self.pending += os.read(self.master, 65536)
                continue
            line, self.pending = self.pending.split(b"\n", 1)
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict) and {"rc", "pong", "clock_ns"} & set(message):
                    found.append(message)
        return found


@pytest.fixture
def agent() -> Iterator[Port]:
    """The agent serving a fresh pty; killed (by its pid) afterwards."""
    master, slave = os.openpty()
    # The test keeps the slave open too: a pty master reads EIO while no slave is
    # open, where a serial port would just be quiet.
    proc = subprocess.Popen([sys.executable, str(AGENT), os.ttyname(slave)])
    port = Port(master)
    try:
        for attempt in range(100):  # pings until the agent has set the port raw
            port.send({"id": -attempt - 1, "ping": True})
            with contextlib.suppress(AssertionError):
                port.answers(1, timeout=0.1)
                break
        port.pending = b""
        yield port
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
        os.close(slave)


def test_ping_and_command(agent: Port) -> None:
    """A ping gets a pong; a command gets its exit status and stdout+stderr, with its id."""
    agent.send({"id": 1, "ping": True})
    agent.send({"id": 2, "sh": "echo out; echo err >&2; exit 3", "timeout": 5})
    assert agent.answers(2) == [
        {"id": 1, "pong": True},
        {"id": 2, "rc": 3, "out": "out\nerr\n"},
    ]


def test_clock_is_read_at_once(agent: Port) -> None:
    """A clock request is answered with the wall clock read between the request and its answer.

    No process is started for it: a slow command still running does not delay it.
    """
    agent.send({"id": 8, "sh": "sleep 2", "timeout": 5})
    before = time.time_ns()
    agent.send({"id": 9, "clock": True})
    (answer,) = agent.answers(1)
    after = time.time_ns()
    assert answer["id"] == 9
    assert before <= answer["clock_ns"] <= after
    assert after - before < 1_000_000_000


def test_noise_is_ignored(agent: Port) -> None:
    """Garbage, non-JSON lines, half lines and JSON without an id get no answer and no harm."""
    agent.send(b"\x00\xff garbage\n[1, 2]\n{not json\n" + b'{"sh": "echo no id"}\n' + b'id":4}')
    agent.send(b'\n{"id": 5, "sh": "echo fine"}\n')
    assert agent.answers(1) == [{"id": 5, "rc": 0, "out": "fine\n"}]


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie counts: it runs no more)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_timeout_kills_the_command_group(agent: Port, tmp_path: Path) -> None:
    """A command past its timeout is killed with its children and answers rc 124."""
    child_pid = tmp_path / "child.pid"
    started = time.monotonic()
    agent.send({"id": 6, "sh": f"sleep 30 & echo $! > {child_pid}; sleep 30", "timeout": 0.5})
    [reply] = agent.answers(1)
    assert reply["id"] == 6 and reply["rc"] == 124
    assert "killed after 0.5 s" in reply["out"]
    assert time.monotonic() - started < 5
    pid = int(child_pid.read_text())
    deadline = time.monotonic() + 2
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(pid), "the command's background child outlived the timeout"


def test_commands_run_concurrently(agent: Port) -> None:
    """A slow command does not hold up a quick one or a ping sent after it."""
    agent.send({"id": 7, "sh": "sleep 1; echo slow", "timeout": 5})
    agent.send({"id": 8, "sh": "echo quick", "timeout": 5})
    agent.send({"id": 9, "ping": True})
    order = [reply["id"] for reply in agent.answers(3)]
    assert sorted(order) == [7, 8, 9]
    assert order[-1] == 7


def test_background_child_does_not_hold_the_answer(agent: Port, tmp_path: Path) -> None:
    """A command leaving a background child that keeps stdout open still answers promptly."""
    child_pid = tmp_path / "child.pid"
    started = time.monotonic()
    agent.send({"id": 10, "sh": f"sleep 30 & echo $! > {child_pid}; echo started", "timeout": 10})
    try:
        assert agent.answers(1) == [{"id": 10, "rc": 0, "out": "started\n"}]
        assert time.monotonic() - started < 3
        assert not gone(int(child_pid.read_text())), "a finished command's child was killed"
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(child_pid.read_text()), signal.SIGKILL)


def test_end_to_end_with_guest_control(agent: Port, tmp_path: Path) -> None:
    """GuestControl talks to the real agent through a unix socket, and again after reconnecting.

    Commands run, and the agent's clock reading lies between the request and its answer.
    """

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """What QEMU's chardev does: socket bytes to the port and back."""
        loop = asyncio.get_running_loop()
        loop.add_reader(agent.master, lambda: writer.write(os.read(agent.master, 65536)))
        try:
            while data := await reader.read(65536):
                os.write(agent.master, data)
        finally:
            loop.remove_reader(agent.master)
            writer.close()

    async def scenario() -> None:
        sock = tmp_path / "chan.sock"
        server = await asyncio.start_unix_server(relay, sock)
        try:
            for _ in range(2):  # the second client proves the agent survives a hang-up
                async with GuestControl(sock) as ctl:
                    await ctl.wait_ready(timeout=10)
                    rc, out = await ctl.run("python3 -c 'print(6*7)'", timeout=10)
                    assert (rc, out) == (0, "42\n")
                    assert await ctl.run("exit 7", timeout=10) == (7, "")
                    sent, guest, received = await ctl.clock(timeout=10)
                    assert sent <= guest <= received
                    assert (await ctl.run("sleep 5", timeout=0.5))[0] == 124
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
