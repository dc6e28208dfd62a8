"""The cases of a run: executables, or folders of them, run in name order."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lockstep.errors import ConfigError

__all__ = ["Case", "discover"]


@dataclass(frozen=True)
class Case:
    """One failure case: an executable and the name it is reported under."""

    name: str
    path: Path


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def discover(paths: Sequence[Path]) -> list[Case]:
    """The cases ``paths`` name, in order: each executable, or a folder's executables by name.

    A folder's other files (a README, a helper sourced by the cases) are not
    cases; a case's name is its path relative to the folder it came from.

    Raises:
        ConfigError: a path is missing, not executable, or a folder with no case.
    """
    cases: list[Case] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if _executable(p))
            if not found:
                raise ConfigError(f"{path}: a folder of cases, but no executable file in it")
            cases += [Case(str(p.relative_to(path)), p) for p in found]
        elif _executable(path):
            cases.append(Case(path.name, path))
        elif path.exists():
            raise ConfigError(f"{path}: a case must be executable (chmod +x {path})")
        else:
            raise ConfigError(f"{path}: no such case (a file or a folder of executables)")
    names = [c.name for c in cases]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"case names must differ; given twice: {', '.join(twice)}")
    return cases
