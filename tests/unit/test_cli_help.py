"""``--help`` of every command: examples stay as written, and every option is explained."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from lockstep.cli.main import main


def _commands(
    group: click.Command = main, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, group
    if isinstance(group, click.Group):
        for name, command in sorted(group.commands.items()):
            yield from _commands(command, (*path, name))


COMMANDS = list(_commands())


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=[" ".join(p) or "lockstep" for p, _ in COMMANDS]
)
def test_help_keeps_example_blocks_line_by_line(
    path: tuple[str, ...], command: click.Command
) -> None:
    """A paragraph marked with click's backspace mark prints line by line, never run together.

    The mark must be the backspace character on a line of its own; written as
    a literal backslash-b (a raw docstring) it is printed and the block wraps
    into one paragraph (seen in `lockstep --help`).
    """
    result = CliRunner().invoke(main, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "\\b" not in result.output
    doc = command.help or ""
    blocks = doc.split("\b\n")[1:]
    for block in blocks:
        for line in block.split("\n\n")[0].splitlines():
            if line.strip():
                assert any(out.strip() == line.strip() for out in result.output.splitlines()), (
                    f"{line.strip()!r} is not a line of its own in:\n{result.output}"
                )


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=[" ".join(p) or "lockstep" for p, _ in COMMANDS]
)
def test_every_option_has_help(path: tuple[str, ...], command: click.Command) -> None:
    """Every option of every command says what it does."""
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{' '.join(('lockstep', *path))} {param.opts[0]} has no help"


def test_the_main_help_shows_its_example_lines() -> None:
    """`lockstep --help` lists the lab example one command per line."""
    out = CliRunner().invoke(main, ["--help"], terminal_width=100).output
    lines = [line.strip() for line in out.splitlines()]
    assert any(line.startswith("lockstep lab up") for line in lines), out
    assert any(line.startswith("lockstep restore start") for line in lines), out
