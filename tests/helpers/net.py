"""Small network tools the integration tests share."""

from __future__ import annotations

import pytest

from lockstep.errors import LabError
from lockstep.lab import client

__all__ = ["ping_argv"]


def ping_argv(address: str, *extra: str) -> list[str]:
    """A one-echo ping of ``address`` (lockstep.lab.client's); the test is skipped without ping."""
    try:
        return client.ping_argv(address, *extra)
    except LabError as exc:
        pytest.skip(str(exc))
