"""The freeze's lifecycle: an enum with allowed transitions, and the exact history of each end."""

from __future__ import annotations

import asyncio

import pytest

from lockstep.errors import NetError
from lockstep.net.freeze import FreezeState, NicFreeze


def test_a_freeze_never_prepared_lifts_cleanly_and_only_once() -> None:
    """Lifting a fresh freeze (an operation that failed early) is allowed, and idempotent."""
    freeze = NicFreeze("vm1", [])

    async def run() -> None:
        await freeze.lift()
        await freeze.lift()

    asyncio.run(run())
    assert freeze.history == [FreezeState.NEW, FreezeState.LIFTED]


def test_steps_out_of_order_are_refused_with_the_state_named() -> None:
    """Engaging before preparing, or after the lift, fails with one sentence; nothing changes."""
    freeze = NicFreeze("vm1", [])
    with pytest.raises(NetError, match="freeze of VM vm1 is new; engage needs it prepared"):
        asyncio.run(freeze.engage())
    asyncio.run(freeze.lift())
    with pytest.raises(NetError, match="is lifted; engage needs it prepared"):
        asyncio.run(freeze.engage())
    assert freeze.history == [FreezeState.NEW, FreezeState.LIFTED]


def test_delivering_a_lifted_freeze_does_nothing() -> None:
    """A freeze already lifted (an abort raced the resume) delivers nothing and stays lifted."""
    freeze = NicFreeze("vm1", [])
    asyncio.run(freeze.lift())
    asyncio.run(freeze.deliver())
    assert freeze.state is FreezeState.LIFTED
    assert (freeze.delivered, freeze.dropped) == (0, 0)
