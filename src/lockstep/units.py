"""Parsing and printing sizes and durations as users write them ("256M", "30ms")."""

from __future__ import annotations

import re

__all__ = ["format_size", "parse_duration", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_FACTOR = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|us)?\s*$")
_DURATION_FACTOR = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}


def parse_size(text: str | int) -> int:
    """Bytes from "512M", "4G", "1.5GiB" or a plain integer (binary units).

    Raises:
        ValueError: the text is not a size.
    """
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{text} is not a size (it is negative)")
        return text
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"{text[:40]!r} is not a size (examples: 512M, 4G)")
    try:
        return int(float(m.group(1)) * _SIZE_FACTOR[m.group(2).upper()])
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"{text[:40]!r} is too large a size") from exc


def parse_duration(text: str | float) -> float:
    """Seconds from "30ms", "1s", "1.5", "2m" or a plain number of seconds.

    Raises:
        ValueError: the text is not a duration.
    """
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"{text} is not a duration (it is negative)")
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (examples: 30ms, 1s, 1.5s)")
    return float(m.group(1)) * _DURATION_FACTOR[m.group(2)]


def format_size(n: int) -> str:
    """Shortest exact binary-unit spelling of ``n`` bytes ("256M", "1536K")."""
    for unit in ("T", "G", "M", "K"):
        f = _SIZE_FACTOR[unit]
        if n >= f and n % f == 0:
            return f"{n // f}{unit}"
    return str(n)
