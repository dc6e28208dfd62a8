"""A QMP server a test can script: QEMU's monitor as a protocol test needs it.

It speaks real QMP over a real unix socket: the greeting, ``qmp_capabilities``
negotiation, commands with an ``id``, ``return`` and ``error`` replies, events
with QEMU's ``timestamp``; it takes the file descriptors a client passes with
SCM_RIGHTS, as QEMU does for ``getfd``. A :class:`Script` says, per command,
what to do in turn (:class:`Step`): answer with a value or an error, send
events before or after the reply, die in the middle (a crashed QEMU) or never
answer again (a wedged one). Its ``split`` writes each message whole, all of a
command's messages in one write, one byte a write, or in random pieces that
cross message boundaries, so a client's framing is tried harder than QEMU tries it.

Built in, as in QEMU, unless the script says otherwise: ``qmp_capabilities``;
``getfd`` names the last descriptor passed; ``migrate`` / ``migrate-incoming``
to ``fd:NAME`` write the step's ``stream`` to that descriptor / read it to its
end; ``quit`` answers, sends SHUTDOWN and ends. Any other command is not found.

It runs as a process of its own, which looks like a running QEMU to
``Machine.attach``: it listens on ``--socket``, then writes its pid to
``--pidfile``. Where a step dies it closes the socket and exits (status 1, the
step's ``stderr`` text on its stderr, the pid file left as a crashed QEMU leaves
it); where a step hangs it waits to be killed; after ``quit`` it exits 0. Every
command it received is logged, before it is answered, as a JSON line to ``--log``::

    python -m tests.helpers.qmp_stub --socket S --pidfile P --log L --script JSON

:func:`stub_process` runs it so for a test. The stub imports nothing of lockstep
or ``qemu.qmp``: it is an independent reading of the protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NoReturn

__all__ = ["QmpStub", "Script", "Step", "StubProcess", "event", "main", "stub_process"]

Split = Literal["whole", "coalesce", "bytes", "random"]
End = Literal["answer", "die", "hang"]
Outcome = Literal["died", "quit"]

_BUILTIN = frozenset({"qmp_capabilities", "getfd", "migrate", "migrate-incoming", "quit"})
_GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "qmp-stub"},
        "capabilities": ["oob"],
    }
}
_MAX_FDS = 8
_PIECE_PAUSE = 0.0002  # s between the pieces of split messages, so they arrive apart
_REPO = Path(__file__).resolve().parents[2]


def event(
    name: str, seconds: int, microseconds: int = 0, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A QMP event as QEMU sends it: name, timestamp (host wall clock) and data."""
    ev: dict[str, Any] = {
        "event": name,
        "timestamp": {"seconds": seconds, "microseconds": microseconds},
    }
    if data is not None:
        ev["data"] = data
    return ev


@dataclass(frozen=True)
class Step:
    """What the stub does with one command.

    ``end``: "answer" sends the ``before`` events, the reply (``returns``, or
    ``error`` as (class, desc)) and the ``after`` events; "die" sends the
    ``before`` events and the first ``cut`` bytes of the reply, writes
    ``stderr`` and dies; "hang" sends the ``before`` events, then neither
    reads nor writes anything, ever. ``stream`` is what ``migrate`` writes.
    """

    returns: Any = field(default_factory=dict)
    error: tuple[str, str] | None = None
    before: tuple[dict[str, Any], ...] = ()
    after: tuple[dict[str, Any], ...] = ()
    end: End = "answer"
    cut: int = 0
    stderr: str = ""
    stream: str = ""


@dataclass(frozen=True)
class Script:
    """The stub's part: per command, the steps it plays in turn (the last one repeats).

    ``greet`` False: connections are accepted but never greeted (a QEMU whose
    main loop is stuck). ``seed`` makes the "random" split repeatable.
    """

    commands: dict[str, tuple[Step, ...]] = field(default_factory=dict)
    split: Split = "whole"
    seed: int = 0
    greet: bool = True

    def to_json(self) -> str:
        """The script as the ``--script`` argument of a stub process."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Script:
        """The script :meth:`to_json` wrote."""
        raw = json.loads(text)

        def step(s: dict[str, Any]) -> Step:
            error = None if s["error"] is None else (str(s["error"][0]), str(s["error"][1]))
            return Step(
                **{**s, "error": error, "before": tuple(s["before"]), "after": tuple(s["after"])}
            )

        commands = {name: tuple(step(s) for s in steps) for name, steps in raw["commands"].items()}
        return cls(commands=commands, split=raw["split"], seed=raw["seed"], greet=raw["greet"])


def _encode(message: dict[str, Any]) -> bytes:
    # QEMU ends every message it sends with CRLF.
    return json.dumps(message).encode() + b"\r\n"


def _take_object(buf: bytes) -> tuple[dict[str, Any], bytes] | None:
    """The first whole JSON object in ``buf`` and the bytes after it; None until it is all there.

    A QMP client need not end its messages with anything (qemu.qmp does not,
    and passes a descriptor with a lone space), so an object ends at its
    closing brace, as QEMU's streaming parser sees it.
    """
    start = len(buf) - len(buf.lstrip())
    depth = 0
    in_string = escaped = False
    for i in range(start, len(buf)):
        c = buf[i : i + 1]
        if in_string:
            if escaped:
                escaped = False
            elif c == b"\\":
                escaped = True
            elif c == b'"':
                in_string = False
        elif c == b'"':
            in_string = True
        elif c == b"{":
            depth += 1
        elif c == b"}":
            depth -= 1
            if depth == 0:
                obj: dict[str, Any] = json.loads(buf[start : i + 1])
                return obj, buf[i + 1 :]
    return None


class _Wire:
    """One client connection: commands and passed descriptors in, split messages out."""

    def __init__(self, conn: socket.socket, split: Split, rng: random.Random) -> None:
        self.conn = conn
        self.split = split
        self.rng = rng
        self.buf = b""
        self.fds: list[int] = []

    def read(self) -> dict[str, Any] | None:
        """The next command, or None when the client has gone."""
        while (found := _take_object(self.buf)) is None:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.conn, 4096, _MAX_FDS)
            except ConnectionResetError:
                return None
            self.fds.extend(fds)
            if not data:
                return None
            self.buf += data
        message, self.buf = found
        return message

    def pieces(self, messages: Sequence[bytes]) -> list[bytes]:
        """The writes that carry ``messages``, as the script splits them."""
        data = b"".join(messages)
        if self.split == "whole":
            return [m for m in messages if m]
        if self.split == "coalesce":
            return [data] if data else []
        if self.split == "bytes":
            return [data[i : i + 1] for i in range(len(data))]
        out = []
        i = 0
        while i < len(data):
            n = self.rng.randint(1, 16)
            out.append(data[i : i + n])
            i += n
        return out

    def send(self, pieces: Sequence[bytes]) -> None:
        """Write each piece on its own, pausing between split pieces so they arrive apart."""
        pause = self.split in ("bytes", "random")
        for i, piece in enumerate(pieces):
            if pause and i:
                time.sleep(_PIECE_PAUSE)
            with contextlib.suppress(OSError):  # a client that hung up is no error of ours
                self.conn.sendall(piece)

    def close_fds(self) -> None:
        """Close the descriptors passed but never named."""
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def _forever() -> NoReturn:
    """Block for good: a wedged QEMU, until its test kills it."""
    while True:
        time.sleep(3600)


class QmpStub:
    """A scripted QMP server; :meth:`serve` answers clients one at a time, as QEMU does."""

    def __init__(self, script: Script, log: Path | None = None) -> None:
        self.script = script
        self.log = log
        self._rng = random.Random(script.seed)
        self._played: dict[str, int] = {}
        self._named: dict[str, int] = {}

    def serve(self, listener: socket.socket) -> Outcome:
        """Accept and serve clients until a step dies or ``quit`` came (a hang never returns)."""
        try:
            while True:
                conn, _ = listener.accept()
                wire = _Wire(conn, self.script.split, self._rng)
                with conn:
                    outcome = self._session(wire)
                    wire.close_fds()
                if outcome is not None:
                    return outcome
        finally:
            for fd in self._named.values():
                os.close(fd)
            self._named.clear()

    def _session(self, wire: _Wire) -> Outcome | None:
        """Serve one client; None when it went away."""
        if not self.script.greet:
            _forever()
        wire.send(wire.pieces([_encode(_GREETING)]))
        while (message := wire.read()) is not None:
            outcome = self._command(wire, message)
            if outcome is not None:
                return outcome
        return None

    def _step(self, name: str) -> Step:
        steps = self.script.commands.get(name)
        if not steps:
            if name in _BUILTIN:
                return Step()
            return Step(error=("CommandNotFound", f"The command {name} has not been found"))
        played = self._played.get(name, 0)
        self._played[name] = played + 1
        return steps[min(played, len(steps) - 1)]

    def _command(self, wire: _Wire, message: dict[str, Any]) -> Outcome | None:
        name = str(message.get("execute", message.get("exec-oob", "")))
        args: dict[str, Any] = message.get("arguments", {})
        entry: dict[str, Any] = {"execute": name, "arguments": args}
        step = self._step(name)
        if step.end == "answer" and step.error is None:
            refused = self._effect(name, args, step, wire, entry)
            if refused is not None:
                step = replace(step, error=("GenericError", refused))
        body: dict[str, Any]
        if step.error is not None:
            body = {"error": {"class": step.error[0], "desc": step.error[1]}}
        else:
            body = {"return": step.returns}
        if "id" in message:
            body["id"] = message["id"]
        reply = _encode(body)
        before = [_encode(e) for e in step.before]
        if step.end == "hang":
            self._play(wire, entry, before)
            _forever()
        if step.end == "die":
            self._play(wire, entry, [*before, reply[: step.cut]])
            sys.stderr.write(step.stderr)
            sys.stderr.flush()
            return "died"
        self._play(wire, entry, [*before, reply, *(_encode(e) for e in step.after)])
        if name == "quit":
            now = time.time()
            shutdown = event("SHUTDOWN", int(now), int(now % 1 * 1e6), {"guest": False})
            wire.send(wire.pieces([_encode(shutdown)]))
            return "quit"
        return None

    def _play(self, wire: _Wire, entry: dict[str, Any], messages: Sequence[bytes]) -> None:
        # Logged before it is sent: a client that has its answer finds the log line there.
        pieces = wire.pieces(messages)
        entry["writes"] = [len(p) for p in pieces]
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        wire.send(pieces)

    def _effect(
        self, name: str, args: dict[str, Any], step: Step, wire: _Wire, entry: dict[str, Any]
    ) -> str | None:
        """Do what QEMU does for the commands whose effect a test looks at; say why it refuses."""
        if name == "getfd":
            if not wire.fds:
                return "No file descriptor supplied via SCM_RIGHTS"
            fdname = str(args["fdname"])
            old = self._named.pop(fdname, None)
            if old is not None:
                os.close(old)
            self._named[fdname] = wire.fds.pop()
            wire.close_fds()
            entry["fd"] = fdname
        elif name in ("migrate", "migrate-incoming"):
            uri = str(args.get("uri", ""))
            if not uri.startswith("fd:"):
                return None
            fd = self._named.pop(uri[3:], None)
            if fd is None:
                return f"File descriptor named '{uri[3:]}' has not been found"
            if name == "migrate":
                with open(fd, "wb") as f:
                    f.write(step.stream.encode())
                entry["wrote"] = len(step.stream.encode())
            else:
                with open(fd, "rb") as f:
                    entry["read"] = f.read().decode()
        return None


@dataclass
class StubProcess:
    """A stub QEMU process (see :func:`stub_process`) and the log of what it was sent."""

    proc: subprocess.Popen[bytes]
    log: Path

    def commands(self) -> list[dict[str, Any]]:
        """Every command received so far, in order, with what the stub did about it."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def names(self) -> list[str]:
        """The names of the commands received so far, in order."""
        return [str(c["execute"]) for c in self.commands()]


@contextlib.contextmanager
def stub_process(
    script: Script, *, qmp: Path, pidfile: Path, stderr: Path, log: Path, ready_within: float = 10.0
) -> Iterator[StubProcess]:
    """Run the stub as a process that looks like a running QEMU; always kill it at the end.

    Yields once its pid file is written (it listens on ``qmp`` by then).
    """
    for stale in (qmp, pidfile, log):
        stale.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "tests.helpers.qmp_stub", "--socket", str(qmp),
            "--pidfile", str(pidfile), "--log", str(log), "--script", script.to_json()]  # fmt: skip
    with stderr.open("wb") as err:
        proc = subprocess.Popen(argv, cwd=_REPO, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + ready_within
        while not pidfile.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the QMP stub did not start: {stderr.read_text()[-1500:]}")
            time.sleep(0.005)
        yield StubProcess(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a script on a unix socket as a stand-in QEMU process (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.qmp_stub")
    parser.add_argument("--socket", type=Path, required=True, help="QMP socket to listen on")
    parser.add_argument("--pidfile", type=Path, required=True, help="where to write the pid")
    parser.add_argument("--log", type=Path, help="JSON lines of the commands received")
    parser.add_argument("--script", required=True, help="the Script, as Script.to_json wrote it")
    args = parser.parse_args(argv)
    stub = QmpStub(Script.from_json(args.script), log=args.log)
    args.socket.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(args.socket))
        listener.listen(1)
        written = args.pidfile.with_name(args.pidfile.name + ".new")
        written.write_text(f"{os.getpid()}\n")
        written.replace(args.pidfile)
        outcome = stub.serve(listener)
    if outcome == "died":
        os._exit(1)  # a crash: nothing cleaned up
    args.socket.unlink(missing_ok=True)
    args.pidfile.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
