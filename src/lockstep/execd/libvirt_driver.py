"""The libvirt driver: a VM of the group is a domain of the host's libvirt (``driver = "libvirt"``).

The user's domain stays theirs: lockstep finds it by name at the host's URI,
acts on it through libvirt's API (:mod:`lockstep.vm.domain`) and changes of it
only what a state needs, every change through libvirt:

- its taps are libvirt's, found in the live XML; each gets a ``clsact`` qdisc
  when lockstep first sees it (:func:`lockstep.net.freeze.prepare_tap`), so a
  freeze only adds and removes a filter;
- a save takes an external snapshot of the paused domain with its memory,
  without metadata: libvirt writes the memory into the state (a save image)
  and moves every layered disk onto a new overlay in lockstep's layers
  folder, in one transaction. The images it wrote so far are what the state
  keeps; the domain goes on (or, with ``--stop``, is destroyed);
- a restore cannot make the new domain beside the running one: libvirt
  restores a domain only as itself (same name and UUID), and never twice.
  So :class:`DomainReplacement` prepares what it can beside it (the save
  image checked, fresh overlays over the state's layers, the XML with the
  disks on them), and at the switch-over, with every VM of the group paused,
  saves the running domain aside (its memory; its disks are not written
  again), restores the state's domain paused, freezes the taps libvirt made
  for it (the names the domain's XML gives, ``<target dev=...>``, or new
  ``vnetN`` ones) and queues the state's frames. Swapping back is destroying
  that domain and restoring the one saved aside. The commit deletes what was
  saved aside and points the domain's definition at its new overlays.

What that costs, and its limits: README, "libvirt domains".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lockstep import disk
from lockstep.errors import LibvirtError, LockstepError
from lockstep.execd.driver import MEMORY_FILE, Progress, Replacement, SavedVm, VmDriver
from lockstep.execd.model import VmReport
from lockstep.execd.ops import OperationError
from lockstep.execd.vms import DiskRuntime, HostVm, VmRuntime
from lockstep.group import VmSpec
from lockstep.net.freeze import prepare_tap
from lockstep.store import VmRecord
from lockstep.vm import domainxml
from lockstep.vm.domain import Domain, Libvirt

__all__ = ["DomainReplacement", "LibvirtDriver", "domain_of"]

log = logging.getLogger(__name__)

ASIDE_FILE = "replaced.mem"  # the running domain's memory, saved aside at the switch-over


def domain_of(vm: HostVm) -> Domain:
    """``vm``'s libvirt domain.

    Raises:
        OperationError: ``vm`` is not a libvirt domain.
    """
    if not isinstance(vm.machine, Domain):
        raise OperationError(f"VM {vm.name} is not a libvirt domain")
    return vm.machine


def _top(layers: Path, d: DiskRuntime) -> Path:
    """The file a disk's domain writes now: its last layer, or its base."""
    return disk.layer_path(layers, d.layer) if d.layer else Path(d.base)


class LibvirtDriver(VmDriver):
    """VMs that are domains of the host's libvirt (see the module docstring)."""

    kind = "libvirt"

    async def hub(self, spec: VmSpec) -> Libvirt:
        """The connection to ``spec``'s libvirt.

        Raises:
            LibvirtError: libvirt cannot be reached there.
        """
        return await asyncio.to_thread(Libvirt.connect, spec.libvirt)

    def disks(self, xml: str, known: list[DiskRuntime]) -> list[DiskRuntime]:
        """The domain's disks as its XML has them now, with the layers lockstep knows of them.

        A layered disk still on the file lockstep last put it on keeps its
        record; one on any other file (a disk the user changed) starts over
        from that file. Disks states leave alone say why.
        """
        layers = self.host.store.layers_dir
        by_target = {d.target: d for d in known if not d.skipped}
        why = domainxml.skipped(xml)
        out = []
        for d in domainxml.disks(xml):
            if d.target in why:
                base = "" if d.source is None else str(d.source)
                out.append(DiskRuntime(d.target, base, skipped=why[d.target]))
                continue
            assert d.source is not None
            old = by_target.get(d.target)
            if old is not None and _top(layers, old) == d.source:
                out.append(DiskRuntime(old.target, old.base, list(old.chain)))
            else:
                out.append(DiskRuntime(d.target, str(d.source)))
        return out

    async def taps(self, dom: Domain, xml: str | None = None) -> list[str]:
        """The taps the domain's NICs use now, each ready for freezes (see the module docstring).

        Raises:
            LibvirtError: libvirt could not describe the domain.
            NetError: a tap is missing.
        """
        xml = xml if xml is not None else await dom.xml()
        taps = [nic.tap for nic in domainxml.nics(xml) if nic.tap]
        for tap in taps:
            await prepare_tap(tap, netns=self.host.config.netns)
        return taps

    async def _vm(self, runtime: VmRuntime, dom: Domain) -> HostVm:
        """``dom`` as VM ``runtime`` at its home, its taps and disks read from its live XML."""
        if dom.alive():
            xml = await dom.xml()
            runtime.taps = await self.taps(dom, xml)
            runtime.disks = self.disks(xml, runtime.disks)
        return HostVm(runtime, dom, self.host.vms.home(runtime.spec.name), self)

    async def up(self, group: str, spec: VmSpec) -> HostVm:
        """Start the domain unless it runs (defining it first from ``spec.define`` if need be).

        A domain this host ran before keeps what lockstep knows of its disks
        (the layers of the states under them), so no state it stands on can
        be deleted from under it.

        Raises:
            LibvirtError: there is no such domain (and nothing to define it
                from), or libvirt could not start it.
        """
        hub = await self.hub(spec)
        try:
            dom = await hub.domain(spec.domain_name, spec.name)
        except LibvirtError:
            if spec.define is None:
                raise
            try:
                xml = spec.define.read_text()
            except OSError as exc:
                raise LibvirtError(
                    f"VM {spec.name}: cannot read domain XML {spec.define}: {exc.strerror}"
                ) from exc
            dom = await hub.define(xml, spec.name)
        if not dom.alive():
            await dom.start()
        runtime = VmRuntime(spec=spec, group=group, taps=[])
        known = self.host.vms.get(spec.name)
        if known is not None:  # stopped here before: its disks still stand on lockstep's layers
            runtime.disks, runtime.state = known.runtime.disks, known.runtime.state
        vm = await self._vm(runtime, dom)
        self.host.vms.register(vm)
        self.host.vms.persist(vm)
        return vm

    async def adopt(self, runtime: VmRuntime, rundir: Path) -> HostVm:
        """Find the domain again (shut off, too: its disks stand on lockstep's layers).

        Raises:
            VmError: libvirt has no such domain any more.
        """
        dom = await (await self.hub(runtime.spec)).domain(
            runtime.spec.domain_name, runtime.spec.name
        )
        return await self._vm(runtime, dom)

    async def save(
        self, vm: HostVm, staging: Path, *, keep_running: bool, progress: Progress | None
    ) -> SavedVm:
        """An external snapshot of the paused domain with its memory (see the module docstring).

        Raises:
            LibvirtError: libvirt could not take it (nothing changed then: it is atomic).
        """
        dom, rt = domain_of(vm), vm.runtime
        layers = self.host.store.layers_dir
        rt.disks = self.disks(await dom.xml(), rt.disks)
        kept = SavedVm(
            VmReport(name=vm.name),
            disks=[d.record() for d in rt.disks if not d.skipped],
            skipped={d.target: d.skipped for d in rt.disks if d.skipped},
        )
        plans = {
            d.target: disk.plan_fresh_overlay(
                layers, vm.name, _top(layers, d), backing_format="qcow2"
            )
            for d in rt.disks
            if not d.skipped
        }
        memory = staging / MEMORY_FILE.format(vm=vm.name)
        snapshot = domainxml.snapshot_xml(
            f"lockstep-{staging.name}",
            memory,
            {target: plan.path for target, plan in plans.items()},
            list(kept.skipped),
        )
        await dom.snapshot(snapshot)
        for d in rt.disks:
            if d.target in plans:
                d.chain.append(plans[d.target].layer_id)
        self.host.vms.persist(vm)
        size = memory.stat().st_size
        kept.report = VmReport(
            name=vm.name,
            memory_bytes=size,
            memory_path="standard",
            memory_note="libvirt's save image (an external snapshot with memory)",
        )
        return kept

    def replacement(self, op: str, group: str, state: str, name: str, rec: VmRecord) -> Replacement:
        """The domain of ``name`` put back as state ``state`` kept it (see the module docstring)."""
        spec = VmSpec.model_validate(rec.spec)
        folder = self.host.vms.restoring / op / name
        return DomainReplacement(self, name, spec, folder, group=group, state=state, rec=rec)

    def adopt_replacement(self, name: str, record: dict[str, Any]) -> Replacement:
        """The replacement an earlier execd recorded.

        Raises:
            ValueError: the record is not one of :meth:`DomainReplacement.record`.
        """
        try:
            spec = VmSpec.model_validate(record["spec"])
            rep = DomainReplacement(self, name, spec, Path(str(record["folder"])))
            rep.disks = [DiskRuntime(**d) for d in record.get("disks", [])]
            old = record.get("old")
            rep.old_runtime = None if old is None else VmRuntime.from_json(str(old))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a libvirt replacement's record: {exc}") from exc
        return rep

    async def discard(self, vm: HostVm, *, graceful: bool = True) -> None:
        """Lift the freeze and stop the domain; it stays defined and this host's.

        Its disks stand on lockstep's layers, so the VM stays on record (shut
        off) and keeps them: ``up`` starts it again.
        """
        try:
            if vm.freeze is not None:
                await vm.freeze.lift()
                vm.freeze = None
        finally:
            await domain_of(vm).destroy()

    async def close(self, vm: HostVm) -> None:
        """Stop the domain's caller thread (it runs on)."""
        domain_of(vm).close()

    def runstate(self, vm: HostVm) -> str:
        """The domain's runstate; "shut off" when it does not run (it is not gone)."""
        return vm.machine.runstate.value if vm.machine.alive() else "shut off"

    def status_extra(self, vm: HostVm) -> dict[str, str]:
        """The domain's name and UUID."""
        dom = domain_of(vm)
        return {"domain": dom.domain, "uuid": dom.uuid}

    async def describe(self, vm: HostVm) -> str:
        """The domain's live XML, without secrets (as ``virsh dumpxml`` shows it).

        Raises:
            LibvirtError: libvirt could not describe it.
        """
        return await domain_of(vm).xml(secure=False)


class DomainReplacement(Replacement):
    """A domain of a restore: made ready beside the running one, swapped in while all is paused."""

    def __init__(
        self,
        driver: LibvirtDriver,
        name: str,
        spec: VmSpec,
        folder: Path,
        *,
        group: str = "",
        state: str = "",
        rec: VmRecord | None = None,
    ) -> None:
        super().__init__(name)
        self.driver = driver
        self.spec = spec
        self.folder = folder
        self.group = group
        self.state = state
        self.rec = rec
        self.xml = ""  # the state's domain, on its fresh layers
        self.disks: list[DiskRuntime] = []  # the fresh layers it starts on
        self.old_runtime: VmRuntime | None = None  # the replaced VM's record, once saved aside

    @property
    def aside(self) -> Path:
        """Where the running domain's memory is saved at the switch-over."""
        return self.folder / ASIDE_FILE

    def record(self) -> dict[str, Any]:
        """The folder, the fresh layers, and the replaced VM's record once saved aside."""
        return {
            "driver": "libvirt",
            "spec": self.spec.model_dump(mode="json"),
            "folder": str(self.folder),
            "disks": [asdict(d) for d in self.disks],
            "old": None if self.old_runtime is None else self.old_runtime.to_json(),
        }

    def held_layers(self) -> dict[str, list[str]]:
        """The fresh layers until the new domain runs; the old domain's while it is aside."""
        held = {}
        vms = self.driver.host.vms
        if self.new is None or vms.get(self.name) is not self.new:
            ids = [layer for d in self.disks for layer in d.chain]
            if ids:
                held[f"{self.name} (being restored)"] = ids
        if self.old_runtime is not None and self.old_runtime.layer_ids:
            held[f"{self.name} (saved aside)"] = self.old_runtime.layer_ids
        return held

    def _hub(self) -> Libvirt:
        return Libvirt.connect(self.spec.libvirt)

    async def prepare(self) -> VmReport:
        """Check the state's save image, make fresh layers over its disks, write its XML.

        The running domain is not touched. It must be the domain the state
        saved (its UUID), if it still exists.

        Raises:
            LibvirtError: the save image cannot be read, or the domain is another one now.
            DiskError: a fresh layer could not be made.
        """
        driver, rec, host = self.driver, self.rec, self.driver.host
        if rec is None or rec.memory is None:
            raise LibvirtError(f"VM {self.name}: state {self.state!r} holds no save image of it")
        hub = await driver.hub(self.spec)
        memory = host.store.states_dir / self.state / rec.memory
        image = await hub.image_xml(memory)
        name, uuid = domainxml.identity(image)
        running = host.vms.get(self.name)
        if running is not None:
            dom = domain_of(running)
            if dom.uuid.lower() != uuid:
                raise LibvirtError(
                    f"VM {self.name}: domain {dom.domain} on host {host.name} is not the"
                    f" domain state {self.state!r} saved (UUID {dom.uuid}, not {uuid});"
                    " it was defined anew since"
                )
        if name != self.spec.domain_name:
            raise LibvirtError(
                f"VM {self.name}: state {self.state!r} holds domain {name!r},"
                f" not {self.spec.domain_name!r}"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        frozen = [DiskRuntime(d.target, d.base, list(d.chain)) for d in rec.disks]
        self.disks = await host.vms.new_layers(self.name, frozen)
        layers = host.store.layers_dir
        self.xml = domainxml.with_disk_sources(
            image, {d.target: disk.layer_path(layers, d.layer) for d in self.disks if d.layer}
        )
        return VmReport(name=self.name, memory_path="standard", memory_note="libvirt save image")

    async def swap(self, old: HostVm | None) -> None:
        """Save the running domain aside, restore the state's domain paused, frozen, frames queued.

        Raises:
            LockstepError: a step failed; :meth:`swap_back` puts the old domain back.
        """
        assert self.rec is not None
        self.old, self.swapped = old, True
        host, driver = self.driver.host, self.driver
        if old is not None:
            if old.freeze is not None:  # its frames are of a timeline that ends here
                with contextlib.suppress(LockstepError):
                    await old.freeze.lift()
                old.freeze = None
            if old.machine.alive():
                self.old_runtime = old.runtime
                await domain_of(old).save(self.aside)
        hub = await driver.hub(self.spec)
        memory = host.store.states_dir / self.state / (self.rec.memory or "")
        # libvirt makes the domain's taps and puts them in their bridges; the
        # domain, paused, reads nothing from them until it resumes. Every VM
        # of the group is paused now: what reaches them before the freeze
        # below is from outside the group, and goes to the guest as it resumes.
        dom = await hub.restore(memory, self.xml, self.spec.domain_name, self.name)
        runtime = VmRuntime(spec=self.spec, group=self.group, taps=[])
        runtime.disks, runtime.state = list(self.disks), self.state
        home = host.vms.home(self.name)
        vm = self.new = HostVm(runtime, dom, home, driver)
        runtime.taps = await driver.taps(dom)
        freeze = vm.freeze = host.vms.freeze_of(runtime, home)
        await freeze.prepare()
        await freeze.engage()
        freeze.load_pcaps([host.store.states_dir / self.state / f for f in self.rec.frames])
        await freeze.queue_saved()
        host.vms.persist(vm)

    async def swap_back(self) -> HostVm | None:
        """Destroy the state's domain and restore the one saved aside, paused.

        Raises:
            LibvirtError: the saved domain could not be restored; its memory
                stays where it was saved (the message says where).
        """
        new, self.new = self.new, None
        if new is not None:
            with contextlib.suppress(LockstepError):
                if new.freeze is not None:
                    await new.freeze.lift()
            if isinstance(new.machine, Domain):
                await new.machine.destroy()
        self.swapped = False
        if self.old_runtime is None or not self.aside.exists():
            return self.old
        hub = await self.driver.hub(self.spec)
        try:
            dom = await hub.restore(self.aside, None, self.spec.domain_name, self.name)
        except LibvirtError as exc:
            raise LibvirtError(
                f"{exc}; the domain's memory stays in {self.aside} (`virsh restore` it)"
            ) from exc
        vm = await self.driver._vm(self.old_runtime, dom)
        self.driver.host.vms.persist(vm)
        self.aside.unlink(missing_ok=True)
        self.old_runtime = None
        return vm

    async def discard(self) -> None:
        """Drop the fresh layers and folder (the domain saved aside, if any, is kept)."""
        new, self.new = self.new, None
        if new is not None and self.driver.host.vms.get(self.name) is not new:
            with contextlib.suppress(LockstepError):
                if new.freeze is not None:
                    await new.freeze.lift()
                if isinstance(new.machine, Domain):
                    await new.machine.destroy()
        if self.aside.exists():
            log.warning("VM %s: its domain saved aside is kept in %s", self.name, self.aside)
            return
        shutil.rmtree(self.folder, ignore_errors=True)

    async def commit(self) -> None:
        """Delete the domain saved aside; point the domain's definition at its new layers."""
        self.aside.unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.old is not None and self.old is not self.new:
            await self.driver.close(self.old)  # its caller thread; the domain is the new one
        self.old, self.old_runtime = None, None
        new = self.new
        if new is None:
            return
        self.driver.host.vms.persist(new)
        dom = domain_of(new)
        try:
            if not await dom.persistent():
                return
            layers = self.driver.host.store.layers_dir
            sources = {d.target: disk.layer_path(layers, d.layer) for d in self.disks if d.layer}
            defined = domainxml.with_disk_sources(await dom.xml(inactive=True), sources)
            await dom.hub.define(defined, self.name)
        except (LockstepError, ValueError) as exc:
            log.warning(
                "VM %s: domain %s's definition still names its disks of before: %s",
                self.name, dom.domain, exc,
            )  # fmt: skip

    async def adopt_after_restart(self, running: HostVm | None, *, switched: bool) -> None:
        """Take the replacement back: after the swap, the domain running is the state's.

        Raises:
            ValueError: nothing to take back.
        """
        if not switched:
            return
        self.swapped = True
        if self.old_runtime is not None and running is not None:
            self.new = running
        else:
            self.old = running
