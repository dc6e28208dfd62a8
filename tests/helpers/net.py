"""Small network tools the integration tests share."""

from __future__ import annotations

import pytest

from lockstep.proc import which

__all__ = ["ping_argv"]


def ping_argv(address: str, *extra: str) -> list[str]:
    """A one-echo ping of ``address`` with iputils ping, or busybox's when that is missing."""
    if which("ping") is not None:
        return ["ping", "-c1", "-W2", *extra, address]
    if which("busybox") is not None:
        return ["busybox", "ping", "-c1", "-W2", *extra, address]
    pytest.skip("needs ping (iputils-ping or busybox)")
