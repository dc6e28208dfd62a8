"""An execd's faults (lockstep.execd.inject.FaultBook) on VMs whose QEMU is a scripted QMP stub.

Each VM of the host is a stub QEMU process (:mod:`tests.helpers.qmp_stub`)
that a real :class:`~lockstep.vm.machine.Machine` attaches to; the stub logs
every command it gets, so each test can tell when ``stop`` and ``cont``
reached QEMU. Network faults here name no VM of this host, so no nft runs:
their rules are tested as text (unit) and for real on the lab (integration).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

from lockstep.errors import VmError
from lockstep.execd.inject import FaultBook
from lockstep.execd.model import (
    FaultVm,
    Freeze,
    Heal,
    Kill,
    ListFaults,
    Loss,
    Partition,
)
from lockstep.execd.ops import OperationError
from lockstep.execd.qemu_driver import QemuDriver, machine_of
from lockstep.execd.vms import VmRuntime
from lockstep.group import VmSpec
from tests.helpers.execd import execd_host
from tests.helpers.qmp_stub import Script, Step, StubProcess, event, stub_process
from tests.helpers.rpc import run

T = TypeVar("T")
LIMIT = 30.0
SCRIPT = Script(
    {
        "query-status": (Step(returns={"status": "running", "running": True}),),
        "stop": (Step(before=(event("STOP", 1_700_000_000),)),),
        "cont": (Step(before=(event("RESUME", 1_700_000_001),)),),
    }
)
Scenario = Callable[[FaultBook, dict[str, StubProcess]], Awaitable[T]]


class OnHost(Protocol):
    """Runs a scenario on the host's FaultBook and stub QEMUs, in one bounded event loop."""

    def __call__(self, body: Scenario[T]) -> T: ...


@pytest.fixture
def host(tmp_path: Path) -> Iterator[OnHost]:
    """Runs a scenario on a FaultBook over VMs p1 and p2 of group lab, each a stub QEMU."""
    host = execd_host(tmp_path)
    registry = host.vms
    driver = QemuDriver(host)
    with contextlib.ExitStack() as stack:
        stubs: dict[str, StubProcess] = {}
        for name in ("p1", "p2"):
            spec = VmSpec(name=name, host="h1", kernel=Path("/boot/vmlinuz"))
            vm = driver.new_vm(VmRuntime(spec, "lab", [f"t-{name}"]), registry.home(name))
            paths = machine_of(vm).paths
            paths.rundir.mkdir(parents=True, exist_ok=True)
            stubs[name] = stack.enter_context(
                stub_process(
                    SCRIPT,
                    qmp=paths.qmp,
                    pidfile=paths.pidfile,
                    stderr=paths.stderr,
                    log=paths.rundir / "stub.jsonl",
                )
            )
            registry.register(vm)

        def scenario(body: Scenario[T]) -> T:
            async def whole() -> T:
                book = FaultBook("h1", registry)
                for vm in registry.vms.values():
                    await machine_of(vm).attach()
                try:
                    return await body(book, stubs)
                finally:
                    book.close()
                    for vm in registry.vms.values():
                        await vm.machine.kill()

            return run(whole(), LIMIT)

        yield scenario


def _sent(stub: StubProcess) -> list[str]:
    """The commands a stub got after attach's negotiation and status."""
    return [n for n in stub.names() if n not in ("qmp_capabilities", "query-status")]


def test_a_freeze_stops_the_vm_alone_and_resumes_it_by_itself(host: OnHost) -> None:
    """`freeze p1 0.4`: stop now, cont 0.4 s later, by itself; p2 never hears of it."""

    async def body(book: FaultBook, stubs: dict[str, StubProcess]) -> tuple[float, list[str]]:
        start = time.monotonic()
        reply = await book.act("lab", "freeze-1", Freeze("p1", 0.4))
        assert reply.did == ["paused p1; it resumes by itself in 0.4 s"]
        assert [(h.id, h.kind, h.vms) for h in reply.held] == [("freeze-1", "freeze", ["p1"])]
        assert 0 < (reply.held[0].seconds_left or 0) <= 0.4
        assert book.frozen() == {"p1": "freeze-1"}
        assert _sent(stubs["p1"]) == ["stop"]
        while _sent(stubs["p1"]) != ["stop", "cont"]:
            assert time.monotonic() - start < 5, "p1 was never resumed"
            await asyncio.sleep(0.01)
        took = time.monotonic() - start
        await asyncio.sleep(0.05)
        assert (await book.act("lab", "", ListFaults())).held == []
        return took, _sent(stubs["p2"])

    took, p2 = host(body)
    assert 0.4 <= took < 1.0, took
    assert p2 == []


def test_heal_resumes_a_frozen_vm_at_once_and_its_timer_never_fires(host: OnHost) -> None:
    """Healed 0.1 s into a 0.5 s freeze, p1 gets one cont, then none when the timer was due."""

    async def body(book: FaultBook, stubs: dict[str, StubProcess]) -> list[str]:
        await book.act("lab", "freeze-1", Freeze("p1", 0.5))
        await asyncio.sleep(0.1)
        reply = await book.act("lab", "", Heal())
        assert reply.did == ["freeze-1: resumed p1"]
        await asyncio.sleep(0.6)
        return _sent(stubs["p1"])

    assert host(body) == ["stop", "cont"]


def test_a_restore_ends_a_freeze_without_resuming_the_vm(host: OnHost) -> None:
    """At a switch-over (end_freezes) the frozen VM stays paused: the restore replaces it."""

    async def body(book: FaultBook, stubs: dict[str, StubProcess]) -> list[str]:
        await book.act("lab", "freeze-1", Freeze("p1", 0.2))
        book.end_freezes("lab")
        await book.switched_over("lab")
        assert book.frozen() == {}
        await asyncio.sleep(0.4)
        return _sent(stubs["p1"])

    assert host(body) == ["stop"]


def test_only_a_running_vm_of_this_host_can_be_frozen_or_killed(host: OnHost) -> None:
    """A frozen VM cannot be frozen again; a VM of no host here, or killed, is refused in a sentence."""

    async def body(book: FaultBook, stubs: dict[str, StubProcess]) -> None:
        await book.act("lab", "freeze-1", Freeze("p1", 5))
        with pytest.raises(
            VmError, match=r"VM p1 on host h1 is paused \(frozen by fault freeze-1\)"
        ):
            await book.act("lab", "freeze-2", Freeze("p1", 5))
        with pytest.raises(OperationError, match="holds a fault freeze-1 already"):
            await book.act("lab", "freeze-1", Freeze("p2", 5))
        with pytest.raises(VmError, match="host h1 runs no VM s1 of group lab"):
            await book.act("lab", "kill-1", Kill("s1"))
        with pytest.raises(VmError, match="runs no VM p1 of group other"):
            await book.act("other", "kill-1", Kill("p1"))
        reply = await book.act("lab", "kill-1", Kill("p1"))
        assert reply.did[0].startswith("killed p1's QEMU (pid ")
        assert book.frozen() == {}  # a killed VM is frozen no more
        with pytest.raises(VmError, match="VM p1 on host h1 is not running: nothing to kill"):
            await book.act("lab", "kill-2", Kill("p1"))
        stubs["p1"].proc.wait(5)

    host(body)


def test_network_faults_of_other_hosts_vms_are_held_without_rules(host: OnHost) -> None:
    """A partition of s1 | s2 (both elsewhere) is on record here with no VM and no rule to set.

    A loss on a VM of another host is refused; heal names the faults it
    removed, and says which ids it does not hold.
    """

    async def body(book: FaultBook, stubs: dict[str, StubProcess]) -> None:
        cut = Partition((FaultVm("s1", ("52:54:00:00:00:03",)),), (FaultVm("s2"),))
        reply = await book.act("lab", "partition-1", cut)
        assert reply.did == [
            "no VM of either side runs here now; the cut applies to them once they do"
        ]
        assert [(h.id, h.vms) for h in reply.held] == [("partition-1", [])]
        with pytest.raises(VmError, match="runs no VM s1"):
            await book.act("lab", "loss-1", Loss("s1", 10))
        healed = await book.act("lab", "", Heal(("partition-1", "loss-9")))
        assert healed.did == [
            "holds no fault loss-9 of group lab",
            "partition-1: its rules are removed",
        ]
        assert healed.held == []

    host(body)
