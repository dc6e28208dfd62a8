"""A :class:`~lockstep.vm.machine.Machine` driving a stub QEMU (:mod:`tests.helpers.qmp_stub`).

The ``qemu`` fixture (registered for the protocol tests by their conftest)
starts stub QEMU processes for VM p1, each with a Machine not yet attached;
:func:`attached` runs a scenario on one, always killing it at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

from lockstep.group import VmSpec
from lockstep.vm.machine import Machine
from tests.helpers.qmp_stub import Script, Step, StubProcess, stub_process
from tests.helpers.rpc import run

__all__ = ["LIMIT", "SPEC", "StubQemu", "attached", "qemu", "status"]

T = TypeVar("T")

SPEC = VmSpec(name="p1", host="h1", kernel=Path("/boot/vmlinuz"))
LIMIT = 30.0  # s: no scenario may take longer (a hang fails the test, not the run)


class StubQemu(Protocol):
    """Starts a stub QEMU for VM p1 and returns a Machine (not yet attached) for it."""

    def __call__(
        self, script: Script, *, command_timeout: float = ...
    ) -> tuple[Machine, StubProcess]: ...


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[StubQemu]:
    """Factory of stub QEMU processes, each with its Machine; every stub is killed at the end."""
    with contextlib.ExitStack() as stubs:

        def start(script: Script, *, command_timeout: float = 5.0) -> tuple[Machine, StubProcess]:
            machine = Machine(SPEC, tmp_path / SPEC.name, command_timeout=command_timeout)
            paths = machine.paths
            paths.rundir.mkdir(parents=True, exist_ok=True)
            stub = stubs.enter_context(
                stub_process(
                    script,
                    qmp=paths.qmp,
                    pidfile=paths.pidfile,
                    stderr=paths.stderr,
                    log=paths.rundir / "stub.jsonl",
                )
            )
            return machine, stub

        yield start


def attached(machine: Machine, body: Callable[[], Awaitable[T]]) -> T:
    """Attach ``machine``, run ``body`` and always kill the VM, in one bounded event loop."""

    async def scenario() -> T:
        await machine.attach()
        try:
            return await body()
        finally:
            await machine.kill()

    return run(scenario(), LIMIT)


def status(name: str) -> tuple[Step, ...]:
    """query-status answered as QEMU answers it, with ``name`` as its status."""
    return (Step(returns={"status": name, "singlestep": False, "running": name == "running"}),)
