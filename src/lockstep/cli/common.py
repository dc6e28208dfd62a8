"""What every `lockstep` command shares: the group file, a connected caller, errors, --json."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

from lockstep.caller.connect import connected
from lockstep.caller.links import HostResult
from lockstep.cli.output import error
from lockstep.errors import ConfigError, LockstepError
from lockstep.group import GroupSpec, load_group

__all__ = ["fail", "group_of", "host_errors", "json_option", "run_async", "with_caller"]

T = TypeVar("T")

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")


def fail(message: str) -> None:
    """Print one sentence and exit 1."""
    error(message)
    sys.exit(1)


def run_async(coro: Awaitable[T]) -> T:
    """Run a coroutine; LockstepError becomes one sentence and exit status 1."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except LockstepError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        error("interrupted")
        sys.exit(130)
    raise AssertionError("unreachable")


def host_errors(results: Mapping[str, HostResult[Any]]) -> dict[str, str]:
    """Why each host that failed a fanned-out call failed, by host."""
    return {h: str(r.error) for h, r in results.items() if r.error is not None}


def group_of(ctx: click.Context) -> GroupSpec:
    """The group file the command was given (``-g``, ``$LOCKSTEP_GROUP``, ./lockstep.toml)."""
    path: Path = ctx.find_root().obj["group_path"]
    try:
        return load_group(path, check_files=False)
    except ConfigError as exc:
        fail(str(exc))
    raise AssertionError("unreachable")


def with_caller(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Decorate a command body ``async fn(caller, **kw)``: connect, run, report errors."""

    @click.pass_context
    @functools.wraps(fn)
    def wrapper(ctx: click.Context, /, **kw: Any) -> Any:
        group = group_of(ctx)

        async def body() -> Any:
            async with connected(group) as caller:
                return await fn(caller, **kw)

        return run_async(body())

    return wrapper
