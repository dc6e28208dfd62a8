"""How one execd runs a kind of VM: lockstep's own QEMU processes, or libvirt domains.

A save or restore acts on every VM of the host the same way at its instants
(:mod:`lockstep.execd.instants`: freeze, pause, deliver, resume, through
:class:`~lockstep.vm.control.VmControl`); what differs between the two kinds
is behind this interface:

- :class:`VmDriver`: start a VM (``up``), take it back after an execd restart,
  save its memory and freeze every disk of it as a layer, stop it;
- :class:`Replacement`: one VM of a restore. It prepares what it can beside
  the running VM, puts the new VM in its place while every VM of the group is
  paused (:meth:`Replacement.swap`), and can put the old one back
  (:meth:`Replacement.swap_back`) until the restore commits.

The implementations are :class:`lockstep.execd.qemu_driver.QemuDriver` and
:class:`lockstep.execd.libvirt_driver.LibvirtDriver`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lockstep.execd.model import VmReport
from lockstep.store import DiskRecord, VmRecord

if TYPE_CHECKING:
    from lockstep.execd.host import Host
    from lockstep.execd.vms import HostVm, VmRuntime
    from lockstep.group import VmSpec

__all__ = ["MEMORY_FILE", "RAM_FILE", "Replacement", "SavedVm", "VmDriver"]

MEMORY_FILE = "{vm}.mem"  # the migration stream (or libvirt's save image) of a VM in a state
RAM_FILE = "{vm}.ram"  # the RAM image a fast save keeps (lockstep.vm.memory)

Progress = Callable[[int, int], None]
"""Called with (bytes written, bytes total) while a VM's memory is saved."""


@dataclass
class SavedVm:
    """What a save kept of one VM: its report, frozen disks, disks left alone, RAM image."""

    report: VmReport
    disks: list[DiskRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    ram: str | None = None  # the RAM image's file in the state, if the fast path kept one


class Replacement(abc.ABC):
    """One VM of a restore: the new VM made ready, put in place of the old one, or taken back.

    ``new`` is the restored VM once it exists; ``old`` the VM it replaces,
    once swapped (None if the host ran no VM of that name).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.new: HostVm | None = None
        self.old: HostVm | None = None
        self.swapped = False

    @abc.abstractmethod
    async def prepare(self) -> VmReport:
        """Make ready beside the running VM everything that can be (nothing of it changes).

        Raises:
            LockstepError: the new VM cannot be made ready.
        """

    @abc.abstractmethod
    async def swap(self, old: HostVm | None) -> None:
        """Put the new VM in place of ``old`` (paused now), paused, its held frames queued.

        Raises:
            LockstepError: it could not; :meth:`swap_back` puts ``old`` back.
        """

    @abc.abstractmethod
    async def swap_back(self) -> HostVm | None:
        """Put the old VM back in place, paused (the new one is paused or gone); return it.

        Raises:
            LockstepError: the old VM could not be put back (the message says
                what is left of it).
        """

    @abc.abstractmethod
    async def discard(self) -> None:
        """Drop the new VM and all that was made for it; the old VM is (back) in place."""

    @abc.abstractmethod
    async def commit(self) -> None:
        """The restore is kept: the old VM goes for good, the new one is at home."""

    @abc.abstractmethod
    def record(self) -> dict[str, Any]:
        """What a restarted execd needs to finish or undo this replacement."""

    @abc.abstractmethod
    async def adopt_after_restart(self, running: HostVm | None, *, switched: bool) -> None:
        """Take this replacement back after an execd restart (made from :meth:`record`).

        ``running`` is what the restarted execd found running under the VM's
        name; ``switched``: the restore had swapped it.

        Raises:
            LockstepError, OSError, ValueError: it cannot be taken back (what
                was made for it is removed).
        """

    def held_layers(self) -> dict[str, list[str]]:
        """Layer ids of the new and old VM that the host does not run (yet, or any more)."""
        return {}


class VmDriver(abc.ABC):
    """How this execd runs VMs of one kind (``kind``: the group file's ``driver``)."""

    kind: ClassVar[str]

    def __init__(self, host: Host) -> None:
        self.host = host

    @abc.abstractmethod
    async def up(self, group: str, spec: VmSpec) -> HostVm:
        """Start VM ``spec`` of ``group`` (each layered disk on a fresh layer), registered.

        Raises:
            LockstepError: it could not be started.
        """

    @abc.abstractmethod
    async def adopt(self, runtime: VmRuntime, rundir: Path) -> HostVm:
        """Take back a VM an earlier execd ran (its record in ``rundir``).

        Raises:
            VmError: it no longer runs, or cannot be driven.
        """

    @abc.abstractmethod
    async def save(
        self, vm: HostVm, staging: Path, *, keep_running: bool, progress: Progress | None
    ) -> SavedVm:
        """Write the paused VM's memory into ``staging`` and freeze every layered disk of it.

        With ``keep_running`` the VM goes on (paused) on fresh layers over the
        frozen ones; otherwise it will be stopped after the commit.

        Raises:
            VmError: memory could not be written, or the disks not frozen.
        """

    @abc.abstractmethod
    def replacement(self, op: str, group: str, state: str, name: str, rec: VmRecord) -> Replacement:
        """The replacement of VM ``name`` by what state ``state`` kept of it (restore ``op``)."""

    @abc.abstractmethod
    def adopt_replacement(self, name: str, record: dict[str, Any]) -> Replacement:
        """A replacement an earlier execd recorded (:meth:`Replacement.record`), taken back.

        Raises:
            ValueError: the record is not one this driver wrote.
        """

    @abc.abstractmethod
    async def discard(self, vm: HostVm, *, graceful: bool = True) -> None:
        """Stop ``vm`` and remove what it used here; it is no longer run by this host.

        Not ``graceful``: at once, for a VM whose memory and disks no one will use again.
        """

    @abc.abstractmethod
    async def close(self, vm: HostVm) -> None:
        """Let go of ``vm`` as the execd stops (it runs on)."""

    def runstate(self, vm: HostVm) -> str:
        """``vm``'s runstate as ``status`` says it ("crashed": its QEMU is gone)."""
        return vm.machine.runstate.value if vm.machine.alive() else "crashed"

    async def describe(self, vm: HostVm) -> str:
        """More about ``vm`` for ``status --xml`` (a domain's live XML); "" if nothing."""
        return ""

    def status_extra(self, vm: HostVm) -> dict[str, str]:
        """What ``status`` says of ``vm`` beyond its runstate (a domain's UUID...)."""
        return {}

    def spec_of(self, vm: HostVm) -> VmSpec:
        """``vm``'s spec (for messages)."""
        return vm.runtime.spec
