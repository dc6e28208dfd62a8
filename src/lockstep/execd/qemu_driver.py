"""lockstep's own QEMU driver: the execd starts each VM's QEMU itself and drives it over QMP.

A VM lives in ``run/<vm>/`` (QMP socket, pid file, console log, ``vm.json``)
on taps lockstep makes (:func:`lockstep.net.links.tap_name`). Its QEMU outlives
the execd, which re-attaches through the pid file and QMP socket.

A restore prepares the new VM whole beside the running one
(:class:`QemuReplacement`): in ``restoring/<op>/<vm>/``, on the VM's other set
of tap names, QEMU started paused with ``-incoming defer``, memory loaded,
NICs frozen and the state's frames queued. The swap is only taking the old
VM's taps out of the bridges; swapping back is putting them back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from lockstep import disk
from lockstep.errors import VmError
from lockstep.execd.driver import MEMORY_FILE, RAM_FILE, Progress, Replacement, SavedVm, VmDriver
from lockstep.execd.model import VmReport
from lockstep.execd.ops import OperationError
from lockstep.execd.vms import VM_RECORD, HostVm, VmRuntime, restored_disks, spec_disks
from lockstep.group import VmSpec
from lockstep.net.links import create_tap, delete_link, set_master
from lockstep.store import VmRecord
from lockstep.vm import memory
from lockstep.vm.argv import Drive
from lockstep.vm.machine import Machine

__all__ = ["QemuDriver", "QemuReplacement"]

log = logging.getLogger(__name__)


def machine_of(vm: HostVm) -> Machine:
    """``vm``'s QEMU process.

    Raises:
        OperationError: ``vm`` is not run by this driver.
    """
    if not isinstance(vm.machine, Machine):
        raise OperationError(f"VM {vm.name} is not run by lockstep's QEMU driver")
    return vm.machine


class QemuDriver(VmDriver):
    """VMs whose QEMU the execd starts itself (``driver = "qemu"``, the default)."""

    kind = "qemu"

    # -- a VM's parts ---------------------------------------------------------------

    def machine(self, spec: VmSpec, rundir: Path) -> Machine:
        """A Machine for ``spec`` with its files in ``rundir`` (its console log at home)."""
        config = self.host.config
        home = self.host.vms.home(spec.name)
        return Machine(
            spec,
            rundir,
            netns=config.netns,
            qemu_binary=config.qemu_binary,
            logdir=None if rundir == home else home,
        )

    def new_vm(self, runtime: VmRuntime, rundir: Path) -> HostVm:
        """A VM record with its Machine (not started) and its files in ``rundir``."""
        return HostVm(runtime, self.machine(runtime.spec, rundir), rundir, self)

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
            await create_tap(tap, nic.bridge, netns=self.host.config.netns)

    async def bridge_taps(self, vm: HostVm, *, attached: bool) -> None:
        """Put ``vm``'s taps into their bridges, or take them out.

        Raises:
            NetError: a tap could not be changed.
        """
        for tap, nic in zip(vm.runtime.taps, vm.runtime.spec.nics, strict=True):
            await set_master(tap, nic.bridge if attached else None, netns=self.host.config.netns)

    async def drives(self, runtime: VmRuntime) -> list[Drive]:
        """The files QEMU opens for ``runtime``'s disks: each layered disk's layer, else its image.

        Raises:
            DiskError: a disk left alone has no format given and qemu-img cannot tell it.
        """
        out = []
        layers = self.host.store.layers_dir
        for spec, d in zip(runtime.spec.disks, runtime.disks, strict=True):
            if d.layer is not None:
                path = disk.layer_path(layers, d.layer)
                out.append(Drive(path, "qcow2", below=len(d.chain)))
                continue
            fmt = spec.format or await disk.image_format(spec.path)
            out.append(Drive(spec.path, fmt, readonly=spec.readonly, shareable=spec.shareable))
        return out

    async def start(self, vm: HostVm, *, incoming: bool) -> None:
        """Start ``vm``'s QEMU (its taps made first, if they are not there yet).

        Raises:
            LockstepError: the taps or QEMU could not be started.
        """
        runtime, machine = vm.runtime, machine_of(vm)
        if not incoming:  # a restore has set up runtime.ram already
            ram, runtime.memory_note = memory.boot_ram(runtime.spec, machine.paths.ram)
            runtime.ram = None if ram is None else str(ram.path)
            runtime.ram_shared = ram is not None
        await self.make_taps(runtime)
        await machine.start(
            drives=await self.drives(runtime),
            taps=runtime.taps,
            incoming=incoming,
            ram=runtime.ram_file,
        )

    def move_home(self, vm: HostVm) -> None:
        """Move a restored VM's files from its restore folder to its home (QEMU runs on).

        The VM it replaced has quit: its files there are stale, except the
        console log, which goes on.
        """
        home = self.host.vms.home(vm.name)
        home.mkdir(parents=True, exist_ok=True)
        for item in vm.rundir.iterdir():
            os.replace(item, home / item.name)
        shutil.rmtree(vm.rundir, ignore_errors=True)
        if vm.runtime.ram is not None and Path(vm.runtime.ram).parent == vm.rundir:
            vm.runtime.ram = str(home / Path(vm.runtime.ram).name)
        vm.rundir = home
        machine_of(vm).relocate(home)
        self.host.vms.persist(vm)

    # -- the driver ---------------------------------------------------------------

    async def up(self, group: str, spec: VmSpec) -> HostVm:
        """Start ``spec`` on fresh layers over its disks' images, on its usual taps.

        Raises:
            LockstepError: a layer, a tap or QEMU could not be made.
        """
        vms = self.host.vms
        runtime = VmRuntime(
            spec=spec,
            group=group,
            taps=vms.taps(group, spec),
            disks=await vms.new_layers(spec.name, spec_disks(spec)),
        )
        vm = self.new_vm(runtime, vms.home(spec.name))
        await self.start(vm, incoming=False)
        vms.register(vm)
        vms.persist(vm)
        return vm

    async def adopt(self, runtime: VmRuntime, rundir: Path) -> HostVm:
        """Re-attach to the QEMU an earlier execd left running (pid file and QMP socket).

        Raises:
            VmError: it no longer runs, or offers no QMP.
        """
        vm = self.new_vm(runtime, rundir)
        await machine_of(vm).attach()
        return vm

    async def save(
        self, vm: HostVm, staging: Path, *, keep_running: bool, progress: Progress | None
    ) -> SavedVm:
        """Move every layered disk onto a fresh layer (one transaction), then write memory.

        The layers written so far are what the state keeps; without
        ``keep_running`` the VM stays on them (it will be destroyed).

        Raises:
            VmError: a disk could not be moved, or memory not written.
        """
        rt, machine = vm.runtime, machine_of(vm)
        kept = SavedVm(
            VmReport(name=vm.name),
            disks=[d.record() for d in rt.disks if not d.skipped],
            skipped={d.target: d.skipped for d in rt.disks if d.skipped},
        )
        if keep_running:
            layers = self.host.store.layers_dir
            plans = {
                i: disk.plan_fresh_overlay(layers, vm.name, disk.layer_path(layers, d.layer))
                for i, d in enumerate(rt.disks)
                if d.layer is not None
            }
            await machine.snapshot_disks({i: plan.path for i, plan in plans.items()})
            for i, plan in plans.items():
                rt.disks[i].chain.append(plan.layer_id)
            self.host.vms.persist(vm)
        kept.report, kept.ram = await self._save_memory(
            vm, staging, keep_running=keep_running, progress=progress
        )
        return kept

    async def _save_memory(
        self, vm: HostVm, staging: Path, *, keep_running: bool, progress: Progress | None
    ) -> tuple[VmReport, str | None]:
        """Save one paused VM's memory into ``staging``, fast or standard; its RAM image's name.

        Fast: the stream holds device state only and the state keeps a RAM
        image of the VM's RAM file (linked when the VM stops after the save,
        else reflinked or copied): see :mod:`lockstep.vm.memory`.

        Raises:
            VmError: the memory or the RAM image could not be written, or the
                VM's ``memory_path`` is "fast" and the fast path cannot be used.
        """
        rt, machine = vm.runtime, machine_of(vm)
        shared = rt.ram is not None and rt.ram_shared
        plan = memory.plan_save(
            rt.spec,
            rt.ram_file,
            rt.memory_note,
            qemu_ignores_shared=shared and await machine.can_ignore_shared(),
        )
        size = await machine.save_memory(
            staging / MEMORY_FILE.format(vm=vm.name), ignore_shared=plan.fast, progress=progress
        )
        if not plan.fast:
            report = VmReport(
                name=vm.name, memory_bytes=size, memory_path="standard", memory_note=plan.reason
            )
            return report, None
        assert rt.ram is not None
        image = RAM_FILE.format(vm=vm.name)
        kept = await asyncio.to_thread(
            memory.keep_ram_image, Path(rt.ram), staging / image, link=not keep_running
        )
        size += (staging / image).stat().st_blocks * 512
        report = VmReport(
            name=vm.name, memory_bytes=size, memory_path="fast", memory_note=kept.describe()
        )
        return report, image

    def replacement(self, op: str, group: str, state: str, name: str, rec: VmRecord) -> Replacement:
        """A new QEMU for ``name``, prepared beside the running one (see the module docstring)."""
        return QemuReplacement(self, self.host.vms.restoring / op / name, group, state, rec, name)

    def adopt_replacement(self, name: str, record: dict[str, Any]) -> Replacement:
        """The replacement whose new VM an earlier execd left in ``record["rundir"]``.

        Raises:
            ValueError: the record names no folder.
        """
        rundir = record.get("rundir")
        if not isinstance(rundir, str):
            raise ValueError(f"no folder for VM {name}'s new QEMU in {record}")
        return QemuReplacement(self, Path(rundir), "", "", None, name)

    async def discard(self, vm: HostVm, *, graceful: bool = True) -> None:
        """Quit ``vm``'s QEMU, lift its freeze, remove its taps (and its folder if not home).

        The VM is forgotten if it is the one this host runs under its name.
        """
        vms, machine = self.host.vms, machine_of(vm)
        try:
            if vm.freeze is not None:
                await vm.freeze.lift()
                vm.freeze = None
        finally:
            try:
                await (machine.quit() if graceful else machine.kill())
            finally:
                if vms.get(vm.name) is vm:
                    vms.forget(vm.name)
                for tap in vm.runtime.taps:
                    await delete_link(tap, netns=self.host.config.netns)
                if vm.rundir != vms.home(vm.name):
                    shutil.rmtree(vm.rundir, ignore_errors=True)

    async def close(self, vm: HostVm) -> None:
        """Drop the QMP connection (QEMU runs on)."""
        await machine_of(vm).drop_qmp()


def _kill(vm: HostVm) -> None:
    """For the fault hook: SIGKILL a new VM's QEMU (as if it crashed while loading)."""
    if vm.machine.pid is not None:
        os.kill(vm.machine.pid, signal.SIGKILL)


class QemuReplacement(Replacement):
    """A VM of a restore whose new QEMU is prepared whole beside the running one."""

    def __init__(
        self,
        driver: QemuDriver,
        rundir: Path,
        group: str,
        state: str,
        rec: VmRecord | None,
        name: str,
    ) -> None:
        super().__init__(name)
        self.driver = driver
        self.rundir = rundir
        self.group = group
        self.state = state
        self.rec = rec

    def record(self) -> dict[str, Any]:
        """Where the new VM's files are."""
        return {"driver": "qemu", "rundir": str(self.rundir)}

    def held_layers(self) -> dict[str, list[str]]:
        """The layers of the new VM before it runs, of the old one after the swap."""
        host = self.driver.host
        held = {}
        for which, vm in (("being restored", self.new), ("being replaced", self.old)):
            if vm is not None and host.vms.get(self.name) is not vm and vm.runtime.layer_ids:
                held[f"{self.name} ({which})"] = vm.runtime.layer_ids
        return held

    async def prepare(self) -> VmReport:
        """Start the new QEMU paused beside the running VM, load its memory, queue its frames.

        Raises:
            VmError, NetError, DiskError: the new VM could not be made.
        """
        assert self.rec is not None
        name, rec, driver = self.name, self.rec, self.driver
        host = driver.host
        state_dir = host.store.states_dir / self.state
        spec = VmSpec.model_validate(rec.spec)
        running = host.vms.get(name)
        runtime = VmRuntime(
            spec=spec,
            group=self.group,
            taps=host.vms.taps(self.group, spec, avoid=running.runtime.taps if running else ()),
            state=self.state,
        )
        self.rundir.mkdir(parents=True, exist_ok=True)
        vm = self.new = driver.new_vm(runtime, self.rundir)
        runtime.disks = await host.vms.new_layers(name, restored_disks(spec, rec.disks))
        machine = machine_of(vm)
        ram = await asyncio.to_thread(
            memory.restore_ram,
            spec,
            None if rec.ram is None else state_dir / rec.ram,
            machine.paths.ram,
            state=self.state,
        )
        runtime.ram = None if ram.ram is None else str(ram.ram.path)
        runtime.ram_shared = ram.ram is not None and ram.ram.shared
        runtime.memory_note = ram.later
        # Frozen before QEMU opens the taps: a frame of the running timeline
        # must never wait in a new tap's queue; the freeze takes it, and it is
        # dropped at the switch-over.
        await driver.make_taps(runtime)
        vm.freeze = host.vms.freeze_for(vm)
        await vm.freeze.prepare()
        await vm.freeze.engage()
        await driver.start(vm, incoming=True)
        host.vms.persist(vm)
        assert rec.memory is not None
        await host.fault.at("prepare_restore:load", lambda: _kill(vm))
        await machine.load_memory(state_dir / rec.memory, ignore_shared=ram.fast)
        # The state's frames go first in the new VM's queue: it reads nothing
        # until it resumes, and nothing of its new timeline exists yet.
        loaded = vm.freeze.load_pcaps([state_dir / f for f in rec.frames])
        await vm.freeze.queue_saved()
        return VmReport(
            name=name,
            frames_held=loaded,
            memory_path="fast" if ram.fast else "standard",
            memory_note=ram.note,
        )

    async def swap(self, old: HostVm | None) -> None:
        """Take the old VM's taps out of the bridges: the new VM's are in them already.

        Raises:
            NetError: a tap could not be changed.
        """
        self.old, self.swapped = old, True
        if old is not None:
            await self.driver.bridge_taps(old, attached=False)

    async def swap_back(self) -> HostVm | None:
        """Take the new VM's taps out of the bridges and put the old VM's back.

        Raises:
            NetError: a tap could not be changed.
        """
        if self.new is not None:
            await self.driver.bridge_taps(self.new, attached=False)
        if self.old is not None:
            await self.driver.bridge_taps(self.old, attached=True)
        self.swapped = False
        return self.old

    async def discard(self) -> None:
        """Kill the new QEMU and remove its taps and folder; the old VM stays."""
        new, self.new = self.new, None
        if new is not None:
            await self.driver.discard(new, graceful=False)
        shutil.rmtree(self.rundir, ignore_errors=True)

    async def commit(self) -> None:
        """Kill the old QEMU (its memory and layers are of no more use); the new one goes home."""
        if self.old is not None:
            await self.driver.discard(self.old, graceful=False)
            self.old = None
        if self.new is not None:
            self.driver.move_home(self.new)

    async def adopt_after_restart(self, running: HostVm | None, *, switched: bool) -> None:
        """Re-attach to the new QEMU an earlier execd left in :attr:`rundir` (if it still runs).

        Switched, ``running`` is the old VM (paused, its taps out of the bridges).

        Raises:
            ValueError: the new VM's record is unreadable (its folder is removed).
        """
        try:
            runtime = VmRuntime.from_json((self.rundir / VM_RECORD).read_text())
        except (OSError, ValueError, TypeError) as exc:
            shutil.rmtree(self.rundir, ignore_errors=True)
            raise ValueError(f"its record in {self.rundir} is unreadable: {exc}") from exc
        if switched:
            self.old, self.swapped = running, True
        self.new = self.driver.new_vm(runtime, self.rundir)
        try:
            await machine_of(self.new).attach()
        except VmError as exc:  # gone: discarding it removes its taps and folder
            log.warning("VM %s's new QEMU not re-attached: %s", self.name, exc)
