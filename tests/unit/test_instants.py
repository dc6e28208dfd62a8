"""Meeting a common instant on one host: an instant met late is logged, one met in time is not."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from lockstep.execd.clock import ExecdClock
from lockstep.execd.host import Host
from lockstep.execd.instants import pause_at
from lockstep.execd.vms import HostVm
from lockstep.vm.machine import VmRunstate

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="real-time priority needs root")


@dataclass
class StubMachine:
    """What pause_at asks of a VM's machine; pausing stamps the wall clock."""

    runstate: VmRunstate = VmRunstate.RUNNING
    paused: list[float] = field(default_factory=list)

    async def pause(self) -> float:
        self.paused.append(time.time())
        self.runstate = VmRunstate.PAUSED
        return self.paused[-1]

    def control_threads(self) -> list[int]:
        return []

    def vcpu_threads(self) -> list[int]:
        return []


@dataclass
class StubVm:
    name: str
    machine: StubMachine = field(default_factory=StubMachine)


@dataclass
class StubHost:
    clock: ExecdClock = field(default_factory=ExecdClock)


def _pause(at_in: float) -> list[Any]:
    host = StubHost()
    vms = [StubVm("p1"), StubVm("p2")]
    at = host.clock.now() + at_in
    return asyncio.run(pause_at(cast(Host, host), cast(list[HostVm], vms), at))


@root_only
def test_an_instant_met_late_is_logged_with_how_late(caplog: pytest.LogCaptureFixture) -> None:
    """A pause whose instant had passed when its call came says so; one in time says nothing.

    The caller's skew figures cannot tell a late host from a slow QEMU; the
    execd's log can.
    """
    with caplog.at_level(logging.WARNING, logger="lockstep.execd.instants"):
        reports = _pause(0.02)
    assert [r.name for r in reports] == ["p1", "p2"]
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="lockstep.execd.instants"):
        _pause(-0.005)
    [record] = caplog.records
    message = record.getMessage()
    assert message.startswith("pause of VMs p1, p2 began ")
    late_ms = float(message.split(" began ")[1].split(" ms ")[0])
    assert 5.0 <= late_ms < 1000.0, message
