"""A save's drain, in-process with a stand-in freeze: the pcap files are written off the event loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import cast

from lockstep.execd.clock import ExecdClock
from lockstep.execd.fault import Fault
from lockstep.execd.host import Host
from lockstep.execd.inject import FaultBook
from lockstep.execd.journal import Journal
from lockstep.execd.model import ExecdConfig
from lockstep.execd.ops import OpPhase
from lockstep.execd.qemu_driver import QemuDriver
from lockstep.execd.save import SaveOperation
from lockstep.execd.vms import VmRegistry, VmRuntime
from lockstep.group import VmSpec
from lockstep.net.freeze import NicFreeze
from lockstep.store import StateStore
from tests.helpers.loop import longest_stall


class SlowFreeze:
    """What drain asks of a freeze; writing its pcap files takes 0.4 s (many frames, a slow disk)."""

    held = 3
    dropped = 0
    ignored = 0

    async def drain(self, quiet: float, limit: float) -> None:
        return None

    def write_pcaps(self, directory: Path, stem: str) -> list[str]:
        time.sleep(0.4)
        name = f"{stem}.nic0.pcap"
        (directory / name).write_bytes(b"pcap")
        return [name]


def test_drain_writes_the_held_frames_without_stalling_the_event_loop(tmp_path: Path) -> None:
    """While a VM's held frames are written, a task ticking every 10 ms never waits long.

    Written on the event loop (as drain once did), they stalled every other
    call of the execd: probes, extends, the other VMs' migrations.
    """
    config = ExecdConfig(host="h1", root=tmp_path)
    store = StateStore(tmp_path)
    vms = VmRegistry(config, store)
    journal = Journal(tmp_path / "ops")
    host = Host(config, ExecdClock(), store, vms, journal, Fault(), FaultBook("h1", vms), dict)
    spec = VmSpec(name="p1", host="h1", kernel=Path("/boot/vmlinuz"), memory=256 << 20)
    vm = QemuDriver(host).new_vm(VmRuntime(spec, "lab", []), vms.home("p1"))
    vm.freeze = cast(NicFreeze, SlowFreeze())
    vms.register(vm)
    op = SaveOperation(host, "op1", "s1", ["p1"], 1e12, staging=store.begin("s1"))
    op.life.advance(OpPhase.PAUSED)
    op.life.advance(OpPhase.SAVED)

    reports, longest = asyncio.run(longest_stall(op.drain(0.01, 0.1)))
    assert [r.frames_held for r in reports] == [3]
    assert op.kept["p1"].frames == ["p1.nic0.pcap"]
    assert op.phase is OpPhase.DRAINED
    assert longest < 0.2, f"the event loop stalled for {longest:.2f} s"
