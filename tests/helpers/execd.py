"""An execd's host parts for protocol tests: its registry, store and QEMU driver, no service."""

from __future__ import annotations

from pathlib import Path

from lockstep.execd.clock import ExecdClock
from lockstep.execd.fault import Fault
from lockstep.execd.host import Host
from lockstep.execd.inject import FaultBook
from lockstep.execd.journal import Journal
from lockstep.execd.model import ExecdConfig
from lockstep.execd.qemu_driver import QemuDriver
from lockstep.execd.vms import HostVm, VmRegistry, VmRuntime
from lockstep.group import VmSpec
from lockstep.store import StateStore

__all__ = ["execd_host", "qemu_vm"]


def execd_host(root: Path, name: str = "h1") -> Host:
    """Host ``name`` of an execd whose files are under ``root``, with the QEMU driver."""
    config = ExecdConfig(host=name, root=root)
    store = StateStore(config.root)
    vms = VmRegistry(config, store)
    journal = Journal(config.root / "ops")
    host = Host(config, ExecdClock(), store, vms, journal, Fault(), FaultBook(name, vms), dict)
    host.drivers["qemu"] = QemuDriver(host)
    return host


def qemu_vm(host: Host, spec: VmSpec, taps: list[str], rundir: Path | None = None) -> HostVm:
    """VM ``spec`` of group ``lab`` as the QEMU driver runs it (QEMU not started), at home."""
    driver = host.drivers["qemu"]
    assert isinstance(driver, QemuDriver)
    return driver.new_vm(VmRuntime(spec, "lab", taps), rundir or host.vms.home(spec.name))
