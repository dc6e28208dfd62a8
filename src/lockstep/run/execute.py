"""One case as a process: its environment, its output stamped line by line, its time limit.

A case runs in a session of its own, so that stopping it (its time limit, or
Ctrl-C) stops everything it started. Every line it prints is kept with the
wall-clock time it arrived; a line ``action: TEXT`` marks one of the case's
own actions (the HTML report draws it on the case's timeline).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from lockstep.run.cases import Case

__all__ = ["ACTION", "Line", "Outcome", "execute"]

ACTION = "action:"  # a case's line that marks one of its actions
MAX_LINES = 20_000  # lines kept per case; past them, the count of those dropped
_GRACE = 2.0  # s between SIGTERM and SIGKILL for a case that is stopped


@dataclass(frozen=True)
class Line:
    """One line a case printed: when it arrived (wall clock), on which stream, what."""

    t: float
    stream: str  # "out" or "err"
    text: str

    @property
    def action(self) -> str | None:
        """The action this line marks, if it marks one."""
        head, sep, rest = self.text.partition(ACTION)
        return rest.strip() if sep and not head.strip() else None


@dataclass
class Outcome:
    """How one case's process ended and what it printed."""

    started: float
    ended: float = 0.0
    exit_code: int | None = None  # None: it was stopped
    timed_out: bool = False
    lines: list[Line] = field(default_factory=list)
    dropped: int = 0  # lines past MAX_LINES

    @property
    def duration(self) -> float:
        """Seconds it ran."""
        return self.ended - self.started


async def _read(stream: asyncio.StreamReader | None, name: str, out: Outcome) -> None:
    if stream is None:
        return
    while raw := await stream.readline():
        if len(out.lines) >= MAX_LINES:
            out.dropped += 1
            continue
        out.lines.append(Line(time.time(), name, raw.decode("utf-8", "replace").rstrip("\n")))


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Stop the case's whole session: SIGTERM, then SIGKILL if it lingers.

    Also after the case exited: what it started in the background must not
    run on into the next case.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), _GRACE)
            return
        except TimeoutError:
            continue


async def execute(
    case: Case, env: Mapping[str, str], timeout: float, out: Outcome | None = None
) -> Outcome:
    """Run ``case`` with ``env`` until it exits, or stop it after ``timeout`` seconds.

    Cancelled (Ctrl-C), the case is stopped before the cancellation goes on;
    what it printed until then is in ``out``, when the caller handed one.

    Raises:
        OSError: the case could not be started.
    """
    if out is None:
        out = Outcome(started=time.time())
    proc = await asyncio.create_subprocess_exec(
        str(case.path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        start_new_session=True,
    )
    readers = asyncio.gather(_read(proc.stdout, "out", out), _read(proc.stderr, "err", out))
    try:
        try:
            out.exit_code = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            out.timed_out = True
    except BaseException:  # cancelled: the case must not outlive the run
        await _stop(proc)
        readers.cancel()
        raise
    finally:
        out.ended = time.time()
    await _stop(proc)  # what it left running in the background goes too
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(readers, _GRACE)
    out.lines.sort(key=lambda line: line.t)
    return out
