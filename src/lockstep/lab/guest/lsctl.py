#!/usr/bin/python3
"""lockstep's control agent: runs inside every lab guest, on a serial port.

Why a serial port: a lab guest's NICs belong to the experiment (lockstep freezes
their frames), so the host's way in must not be a network. QEMU serves the
guest's second serial port as a unix socket; lockstep.lab.guestctl talks to it.

Protocol, one JSON object per line in each direction::

    host -> guest  {"id": N, "sh": "command", "timeout": S}   run with /bin/sh -c
                   {"id": N, "ping": true}
                   {"id": N, "clock": true}                   read the wall clock
    guest -> host  {"id": N, "rc": R, "out": "stdout and stderr"}
                   {"id": N, "pong": true}
                   {"id": N, "clock_ns": T}                   CLOCK_REALTIME, ns

A clock request is answered at once, with no process started (``date`` would
take a fork and an exec, tens of ms under TCG), so the host can bound when the
guest read its clock by the request's round trip.

A command that outlives its timeout is killed with its whole process group and
answers rc 124. Commands run concurrently, each in its own thread. Lines that
are not such JSON objects are ignored: the channel carries noise (the tty's echo
before the port is set raw, half lines from a host that went away). The host
may disconnect and reconnect at any time; the port stays, so the agent just
keeps reading (and reopens the port if it ever reports end of file).

Stdlib only: it runs on the guest's Debian python3 (3.11).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_PORT = "/dev/ttyS1"
DEFAULT_TIMEOUT = 30.0
TIMED_OUT_RC = 124
MAX_OUTPUT = 1 << 20  # bytes of command output kept; the rest is cut
MAX_LINE = 1 << 20  # a request line longer than this is noise
EXIT_GRACE = 0.2  # seconds to keep reading output after the shell exited
COMMAND_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}


@dataclass(frozen=True)
class Request:
    """One request from the host: a ping, a clock reading, or a shell command with its timeout."""

    id: int
    command: str | None
    timeout: float
    clock: bool = False


def parse_request(line: bytes) -> Request | None:
    """The request on ``line``, or None when the line is noise."""
    text = line.decode("utf-8", "replace")
    start = text.find("{")
    if start < 0:
        return None
    try:
        message, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    ident = message.get("id")
    if not isinstance(ident, int) or isinstance(ident, bool):
        return None
    if message.get("ping") is True:
        return Request(ident, None, 0.0)
    if message.get("clock") is True:
        return Request(ident, None, 0.0, clock=True)
    command = message.get("sh")
    if not isinstance(command, str):
        return None
    timeout = message.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        timeout = DEFAULT_TIMEOUT
    return Request(ident, command, float(timeout))


def run_command(command: str, timeout: float) -> tuple[int, str]:
    """Run ``command`` with /bin/sh; return its exit status and output.

    Output is read until the shell has exited and its stdout is closed, or for
    EXIT_GRACE seconds after the shell exited (a background child may hold the
    pipe forever). After ``timeout`` the whole process group is killed and the
    status is 124. A status from a signal is reported as the shell does: 128+N.
    """
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd="/",
        env=COMMAND_ENV,
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    chunks: list[bytes] = []
    kept = 0
    cut = False
    deadline = time.monotonic() + timeout
    exited_at: float | None = None
    timed_out = False
    try:
        while True:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at >= EXIT_GRACE:
                break
            if now >= deadline:
                timed_out = True
                break
            ready, _, _ = select.select([fd], [], [], min(deadline - now, 0.05))
            if not ready:
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            room = MAX_OUTPUT - kept
            cut = cut or len(data) > room
            if room > 0:
                chunks.append(data[:room])
                kept += len(chunks[-1])
        if not timed_out:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        if timed_out or proc.returncode is None:
            _kill_group(proc)
        proc.stdout.close()
    out = b"".join(chunks).decode("utf-8", "replace")
    if cut:
        out = _with_note(out, f"output cut at {MAX_OUTPUT} bytes")
    if timed_out:
        return TIMED_OUT_RC, _with_note(out, f"killed after {timeout:g} s")
    rc = proc.returncode
    return (128 - rc if rc < 0 else rc), out


def _with_note(out: str, note: str) -> str:
    newline = "\n" if out and not out.endswith("\n") else ""
    return f"{out}{newline}[lsctl: {note}]\n"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def open_port(path: str) -> int:
    """Open the serial port raw: no echo, no line editing, 8 bits, modem lines ignored."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    attrs: list[Any] = termios.tcgetattr(fd)
    attrs[0] &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
        | termios.IXOFF
        | termios.IXANY
    )
    attrs[1] &= ~termios.OPOST
    attrs[2] &= ~(termios.CSIZE | termios.PARENB | termios.HUPCL)
    attrs[2] |= termios.CS8 | termios.CREAD | termios.CLOCAL
    attrs[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    attrs[4] = attrs[5] = termios.B115200
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    termios.tcflush(fd, termios.TCIOFLUSH)
    return fd


class Agent:
    """Serves requests read from one serial port; answers go back on the same port."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._write_lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """Close the port; answers still being computed are then dropped."""
        with self._write_lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def serve(self) -> None:
        """Read and answer requests until the port reports end of file."""
        pending = b""
        while True:
            data = os.read(self._fd, 65536)
            if not data:
                return
            pending += data
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_LINE:
                pending = b""
            for line in lines:
                self._handle(line)

    def _handle(self, line: bytes) -> None:
        request = parse_request(line)
        if request is None:
            return
        if request.clock:
            self._send({"id": request.id, "clock_ns": time.time_ns()})
            return
        if request.command is None:
            self._send({"id": request.id, "pong": True})
            return
        worker = threading.Thread(target=self._answer, args=(request,), daemon=True)
        worker.start()

    def _answer(self, request: Request) -> None:
        assert request.command is not None
        try:
            rc, out = run_command(request.command, request.timeout)
        except Exception as exc:  # the host must get an answer, whatever happened
            rc, out = 127, f"[lsctl: cannot run the command: {exc}]\n"
        self._send({"id": request.id, "rc": rc, "out": out})

    def _send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with self._write_lock:
            if self._closed:
                return
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                print(f"lsctl: answer to {message.get('id')} lost: {exc}", file=sys.stderr)


def main(argv: list[str]) -> int:
    """Serve the port named in argv (default /dev/ttyS1) forever."""
    path = argv[1] if len(argv) > 1 else DEFAULT_PORT
    while True:
        try:
            fd = open_port(path)
        except OSError as exc:
            print(f"lsctl: cannot open {path}: {exc}", file=sys.stderr, flush=True)
            time.sleep(1.0)
            continue
        agent = Agent(fd)
        try:
            agent.serve()
        except OSError as exc:
            print(f"lsctl: {path}: {exc}; reopening it", file=sys.stderr, flush=True)
        finally:
            agent.close()
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
