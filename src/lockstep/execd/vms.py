"""The VMs one execd runs: runtime records, QEMU machines, taps and freezes.

A :class:`HostVm` is one VM as this execd drives it: its :class:`VmRuntime`
(persisted as ``vm.json`` in its folder, so a restarted execd re-attaches),
its :class:`~lockstep.vm.machine.Machine` and, while an operation holds its
frames, its :class:`~lockstep.net.freeze.NicFreeze`. The :class:`VmRegistry`
holds the VMs the host runs now, by name, and makes and discards them; the
operations (:mod:`lockstep.execd.operation`) use it.

Every running VM lives in ``run/<vm>/``. A restore prepares the VM that will
replace it in ``restoring/<op>/<vm>/``, on the other set of tap names
(:func:`lockstep.net.links.tap_name`), so both exist until the switch-over; its
console log is the VM's one log in ``run/<vm>/`` all along.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lockstep import disk
from lockstep.execd.model import ExecdConfig
from lockstep.execd.ops import OperationError
from lockstep.group import VmSpec
from lockstep.net.freeze import FreezeLimits, NicFreeze
from lockstep.net.links import create_tap, delete_link, set_master, tap_name
from lockstep.store import StateStore
from lockstep.vm import memory
from lockstep.vm.argv import RamFile
from lockstep.vm.machine import Machine

__all__ = ["HostVm", "VmRegistry", "VmRuntime"]

log = logging.getLogger(__name__)

VM_RECORD = "vm.json"


@dataclass
class VmRuntime:
    """What execd must remember about a VM it runs (persisted as ``vm.json``)."""

    spec: VmSpec
    group: str
    taps: list[str]
    layer: str | None = None  # active layer id (None: no disk)
    chain: list[str] = field(default_factory=list)  # layer ids over the base, ending in layer
    state: str | None = None  # state it was restored from or last saved as
    ram: str | None = None  # the file guest RAM is in (None: anonymous memory)
    ram_shared: bool = False  # the VM's own RAM file (else a state's image, mapped privately)
    memory_note: str = ""  # why its next save cannot take the fast path ("" if it can)

    @property
    def ram_file(self) -> RamFile | None:
        """Guest RAM's file as QEMU got it (None: anonymous memory)."""
        return None if self.ram is None else RamFile(Path(self.ram), shared=self.ram_shared)

    def to_json(self) -> str:
        """Serialise for ``vm.json``."""
        data = asdict(self)
        data["spec"] = self.spec.model_dump(mode="json")
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> VmRuntime:
        """Read back what :meth:`to_json` wrote."""
        data = json.loads(text)
        data["spec"] = VmSpec.model_validate(data["spec"])
        return cls(**data)


@dataclass
class HostVm:
    """One VM as this execd drives it: its record, its QEMU, its folder, its freeze."""

    runtime: VmRuntime
    machine: Machine
    rundir: Path
    freeze: NicFreeze | None = None

    @property
    def name(self) -> str:
        """The VM's name."""
        return self.runtime.spec.name


class VmRegistry:
    """The VMs this host runs now, and how VMs are made, moved and discarded here."""

    def __init__(self, config: ExecdConfig, store: StateStore) -> None:
        self.config = config
        self.store = store
        self.rundir = config.root / "run"
        self.restoring = config.root / "restoring"
        self.vms: dict[str, HostVm] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.vms

    def get(self, name: str) -> HostVm | None:
        """The VM called ``name`` this host runs, if any."""
        return self.vms.get(name)

    def home(self, name: str) -> Path:
        """The folder of VM ``name`` while it is the one this host runs."""
        return self.rundir / name

    def machine(self, spec: VmSpec, rundir: Path) -> Machine:
        """A Machine for ``spec`` with its files in ``rundir`` (its console log at home)."""
        home = self.home(spec.name)
        return Machine(
            spec,
            rundir,
            netns=self.config.netns,
            qemu_binary=self.config.qemu_binary,
            logdir=None if rundir == home else home,
        )

    def persist(self, vm: HostVm) -> None:
        """Write ``vm``'s record into its folder (atomically)."""
        path = vm.rundir / VM_RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(vm.runtime.to_json())
        os.replace(tmp, path)

    def register(self, vm: HostVm) -> None:
        """Make ``vm`` the one this host runs under its name."""
        self.vms[vm.name] = vm

    def forget(self, name: str) -> None:
        """Forget VM ``name`` (its record at home goes too)."""
        (self.home(name) / VM_RECORD).unlink(missing_ok=True)
        self.vms.pop(name, None)

    def taps(self, group: str, spec: VmSpec, *, avoid: Sequence[str] = ()) -> list[str]:
        """Tap names for ``spec``'s NICs: the usual set, or the spare one if ``avoid`` uses it."""
        usual = [tap_name(group, spec.name, i) for i in range(len(spec.nics))]
        if set(usual) & set(avoid):
            return [tap_name(group, spec.name, i, spare=True) for i in range(len(spec.nics))]
        return usual

    async def make_taps(self, runtime: VmRuntime) -> None:
        """Create ``runtime``'s taps on their networks' bridges.

        Raises:
            OperationError: a NIC names no bridge.
            NetError: a tap could not be made.
        """
        for tap, nic in zip(runtime.taps, runtime.spec.nics, strict=True):
            if nic.bridge is None:
                raise OperationError(
                    f"VM {runtime.spec.name}: NIC on {nic.network} names no bridge"
                )
            await create_tap(tap, nic.bridge, netns=self.config.netns)

    async def bridge_taps(self, vm: HostVm, *, attached: bool) -> None:
        """Put ``vm``'s taps into their bridges, or take them out.

        Raises:
            NetError: a tap could not be changed.
        """
        for tap, nic in zip(vm.runtime.taps, vm.runtime.spec.nics, strict=True):
            await set_master(tap, nic.bridge if attached else None, netns=self.config.netns)

    def freeze_for(self, vm: HostVm) -> NicFreeze:
        """A freeze (not prepared yet) of ``vm``'s taps."""
        spec = vm.runtime.spec
        return NicFreeze(
            spec.name,
            vm.runtime.taps,
            hold_from=[nic.hold_from for nic in spec.nics],
            netns=self.config.netns,
            limits=FreezeLimits(
                in_memory=self.config.frames_in_memory, limit=self.config.frames_limit
            ),
            spill_dir=vm.rundir,
        )

    def new_vm(self, runtime: VmRuntime, rundir: Path) -> HostVm:
        """A VM record with its Machine (not started) and its files in ``rundir``."""
        return HostVm(runtime, self.machine(runtime.spec, rundir), rundir)

    async def start(self, vm: HostVm, *, incoming: bool) -> None:
        """Start ``vm``'s QEMU (its taps made first, if they are not there yet).

        Raises:
            LockstepError: the taps or QEMU could not be started.
        """
        runtime = vm.runtime
        if not incoming:  # a restore has set up runtime.ram already
            ram, runtime.memory_note = memory.boot_ram(runtime.spec, vm.machine.paths.ram)
            runtime.ram = None if ram is None else str(ram.path)
            runtime.ram_shared = ram is not None
        await self.make_taps(runtime)
        layer = disk.layer_path(self.store.layers_dir, runtime.layer) if runtime.layer else None
        await vm.machine.start(
            disk=layer, taps=runtime.taps, incoming=incoming, ram=runtime.ram_file
        )

    async def discard(self, vm: HostVm, *, graceful: bool = True) -> None:
        """Quit ``vm``'s QEMU, lift its freeze, remove its taps (and its folder if not home).

        Not ``graceful``: QEMU is killed at once, for a VM whose memory and
        disk no one will use again (a restore's replaced or unused VMs).
        The VM is forgotten if it is the one this host runs under its name.
        """
        try:
            if vm.freeze is not None:
                await vm.freeze.lift()
                vm.freeze = None
        finally:
            try:
                await (vm.machine.quit() if graceful else vm.machine.kill())
            finally:
                if self.vms.get(vm.name) is vm:
                    self.forget(vm.name)
                for tap in vm.runtime.taps:
                    await delete_link(tap, netns=self.config.netns)
                if vm.rundir != self.home(vm.name):
                    shutil.rmtree(vm.rundir, ignore_errors=True)

    def move_home(self, vm: HostVm) -> None:
        """Move a restored VM's files from its restore folder to its home (QEMU runs on).

        The VM it replaced has quit: its files there are stale, except the
        console log, which goes on.
        """
        home = self.home(vm.name)
        home.mkdir(parents=True, exist_ok=True)
        for item in vm.rundir.iterdir():
            os.replace(item, home / item.name)
        shutil.rmtree(vm.rundir, ignore_errors=True)
        if vm.runtime.ram is not None and Path(vm.runtime.ram).parent == vm.rundir:
            vm.runtime.ram = str(home / Path(vm.runtime.ram).name)
        vm.rundir = home
        vm.machine.relocate(home)
        self.persist(vm)

    def active_chains(self) -> dict[str, list[str]]:
        """Each running VM's chain of layer ids."""
        return {name: vm.runtime.chain for name, vm in self.vms.items() if vm.runtime.chain}
