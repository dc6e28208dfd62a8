"""The one place lockstep runs external commands.

Commands are always argv lists, never shell strings. A command that exits
non-zero raises :class:`~lockstep.errors.CommandError` carrying the tail of its
stderr, so the user sees the tool's own words. ``netns`` runs the command inside
a named network namespace (``ip netns exec``, which execs, so pids stay true).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lockstep.errors import CommandError

__all__ = ["Completed", "arun", "in_netns", "run", "which"]

_STDERR_TAIL = 2000


@dataclass(frozen=True)
class Completed:
    """What a finished command left: exit status and its captured output."""

    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        """Stdout decoded as UTF-8 (errors replaced)."""
        return self.stdout.decode("utf-8", "replace")


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """Return argv wrapped to run inside network namespace ``netns`` (if given)."""
    if netns is None:
        return list(argv)
    return ["ip", "netns", "exec", netns, *argv]


def which(name: str) -> str | None:
    """Return the full path of executable ``name`` on PATH (or sbin dirs), or None."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    for d in path.split(":"):
        candidate = os.path.join(d, name)
        if d and os.access(candidate, os.X_OK) and os.path.isfile(candidate):
            return candidate
    return None


def _failure(argv: list[str], returncode: int | None, stderr: bytes, why: str) -> CommandError:
    tail = stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
    shown = " ".join(argv[:6]) + (" ..." if len(argv) > 6 else "")
    detail = f": {tail}" if tail else ""
    return CommandError(f"`{shown}` {why}{detail}", argv, returncode, tail)


def run(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    input: bytes | None = None,
    timeout: float | None = 600.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Completed:
    """Run a command to completion and capture its output.

    Raises:
        CommandError: the command could not start, timed out, or (with ``check``)
            exited non-zero.
    """
    full = in_netns(netns, argv)
    try:
        cp = subprocess.run(
            full,
            input=input,
            capture_output=True,
            timeout=timeout,
            env=None if env is None else dict(env),
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(
            f"`{full[0]}` is not installed (run `make setup`)", full, None, ""
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise _failure(full, None, exc.stderr or b"", f"did not finish in {timeout} s") from exc
    if check and cp.returncode != 0:
        raise _failure(full, cp.returncode, cp.stderr, f"failed (exit {cp.returncode})")
    return Completed(full, cp.returncode, cp.stdout, cp.stderr)


async def arun(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    input: bytes | None = None,
    timeout: float | None = 600.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Async twin of :func:`run`; the child is killed if the caller is cancelled.

    Raises:
        CommandError: as :func:`run`.
    """
    full = in_netns(netns, argv)
    try:
        child = await asyncio.create_subprocess_exec(
            *full,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=None if env is None else dict(env),
        )
    except FileNotFoundError as exc:
        raise CommandError(
            f"`{full[0]}` is not installed (run `make setup`)", full, None, ""
        ) from exc
    try:
        out, err = await asyncio.wait_for(child.communicate(input), timeout)
    except TimeoutError as exc:
        child.kill()
        await child.wait()
        raise _failure(full, None, b"", f"did not finish in {timeout} s") from exc
    except asyncio.CancelledError:
        if child.returncode is None:
            child.kill()
            await child.wait()
        raise
    rc = child.returncode if child.returncode is not None else -1
    if check and rc != 0:
        raise _failure(full, rc, err, f"failed (exit {rc})")
    return Completed(full, rc, out, err)
