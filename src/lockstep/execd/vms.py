"""The VMs one execd runs: runtime records, their disks, taps and freezes.

A :class:`HostVm` is one VM as this execd drives it: its :class:`VmRuntime`
(persisted as ``vm.json`` in its folder, so a restarted execd takes it back),
its QEMU (a :class:`~lockstep.vm.control.VmControl`: a
:class:`~lockstep.vm.machine.Machine` or a libvirt
:class:`~lockstep.vm.domain.Domain`), the :class:`~lockstep.execd.driver.VmDriver`
that runs it and, while an operation holds its frames, its
:class:`~lockstep.net.freeze.NicFreeze`. The :class:`VmRegistry` holds the VMs
the host runs now, by name; the operations (:mod:`lockstep.execd.ops`) use it.

Every running VM has its folder ``run/<vm>/``, and each of its disks a
:class:`DiskRuntime`: the image it stands on and lockstep's layers over it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lockstep import disk
from lockstep.execd.model import ExecdConfig
from lockstep.execd.ops import OperationError
from lockstep.group import VmSpec
from lockstep.net.freeze import FreezeLimits, NicFreeze
from lockstep.net.links import tap_name
from lockstep.store import DiskRecord, StateStore
from lockstep.vm.argv import RamFile
from lockstep.vm.control import VmControl

if TYPE_CHECKING:
    from lockstep.execd.driver import VmDriver

__all__ = [
    "DiskRuntime",
    "HostVm",
    "VmRegistry",
    "VmRuntime",
    "disk_target",
    "restored_disks",
    "spec_disks",
]

log = logging.getLogger(__name__)

VM_RECORD = "vm.json"


def disk_target(index: int) -> str:
    """The guest's name of the QEMU driver's disk ``index``: vda, vdb... (virtio-blk, in order)."""
    return "vd" + chr(ord("a") + index)


@dataclass
class DiskRuntime:
    """One disk of a VM as this execd tracks it.

    ``chain`` are lockstep's layers over ``base``, oldest first; the VM
    writes the last one (or ``base`` itself while the chain is empty: a
    libvirt domain's disk before its first save). A disk states leave alone
    says why in ``skipped``; its ``base`` is the image the VM uses as it is.
    """

    target: str
    base: str
    chain: list[str] = field(default_factory=list)
    skipped: str = ""

    @property
    def layer(self) -> str | None:
        """The layer the VM writes (None: ``base``, or a disk left alone)."""
        return self.chain[-1] if self.chain else None

    def record(self) -> DiskRecord:
        """This disk as a state keeps it: frozen where it is now."""
        return DiskRecord(target=self.target, base=self.base, chain=list(self.chain))


def spec_disks(spec: VmSpec) -> list[DiskRuntime]:
    """``spec``'s disks before any layer: each on its own image, those left alone saying why."""
    return [
        DiskRuntime(disk_target(i), str(d.path), skipped=d.left_alone)
        for i, d in enumerate(spec.disks)
    ]


def restored_disks(spec: VmSpec, frozen: Sequence[DiskRecord]) -> list[DiskRuntime]:
    """``spec``'s disks as a state froze them (those it left alone on their own images).

    Raises:
        OperationError: the state has no layer for a disk the spec layers.
    """
    by_target = {d.target: d for d in frozen}
    out = []
    for d in spec_disks(spec):
        rec = by_target.get(d.target)
        if not d.skipped and rec is None:
            raise OperationError(f"VM {spec.name}: the state has no layer for disk {d.target}")
        out.append(
            d if d.skipped or rec is None else DiskRuntime(d.target, rec.base, list(rec.chain))
        )
    return out


@dataclass
class VmRuntime:
    """What execd must remember about a VM it runs (persisted as ``vm.json``)."""

    spec: VmSpec
    group: str
    taps: list[str]
    disks: list[DiskRuntime] = field(default_factory=list)
    state: str | None = None  # state it was restored from or last saved as
    ram: str | None = None  # the file guest RAM is in (None: anonymous memory)
    ram_shared: bool = False  # the VM's own RAM file (else a state's image, mapped privately)
    memory_note: str = ""  # why its next save cannot take the fast path ("" if it can)

    @property
    def layer_ids(self) -> list[str]:
        """Every layer id the VM's disks stand on, disk after disk."""
        return [layer for d in self.disks for layer in d.chain]

    @property
    def active_layers(self) -> list[str]:
        """The layers the VM writes, one per layered disk (for status)."""
        return [d.layer for d in self.disks if d.layer is not None]

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
        """Read back what :meth:`to_json` wrote (or an execd of one disk per VM did).

        Raises:
            ValueError: the text is not such a record.
        """
        data = json.loads(text)
        data["spec"] = spec = VmSpec.model_validate(data["spec"])
        layer, chain = data.pop("layer", None), data.pop("chain", None)
        if layer is not None and chain and spec.disks:
            data["disks"] = [asdict(DiskRuntime(disk_target(0), str(spec.disks[0].path), chain))]
        data["disks"] = [DiskRuntime(**d) for d in data.get("disks", []) if isinstance(d, dict)]
        return cls(**data)


@dataclass
class HostVm:
    """One VM as this execd drives it: its record, its QEMU, its folder, driver and freeze."""

    runtime: VmRuntime
    machine: VmControl
    rundir: Path
    driver: VmDriver
    freeze: NicFreeze | None = None

    @property
    def name(self) -> str:
        """The VM's name."""
        return self.runtime.spec.name


class VmRegistry:
    """The VMs this host runs now, by name, their records and what they share (layers, freezes)."""

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
        """lockstep's tap names for ``spec``'s NICs (the spare set if ``avoid`` has the usual)."""
        usual = [tap_name(group, spec.name, i) for i in range(len(spec.nics))]
        if set(usual) & set(avoid):
            return [tap_name(group, spec.name, i, spare=True) for i in range(len(spec.nics))]
        return usual

    def freeze_for(self, vm: HostVm) -> NicFreeze:
        """A freeze (not prepared yet) of ``vm``'s taps."""
        return self.freeze_of(vm.runtime, vm.rundir)

    def freeze_of(self, runtime: VmRuntime, rundir: Path) -> NicFreeze:
        """A freeze (not prepared yet) of ``runtime``'s taps, spilling into ``rundir``."""
        spec = runtime.spec
        return NicFreeze(
            spec.name,
            runtime.taps,
            hold_from=[nic.hold_from for nic in spec.nics],
            netns=self.config.netns,
            limits=FreezeLimits(
                in_memory=self.config.frames_in_memory, limit=self.config.frames_limit
            ),
            spill_dir=rundir,
        )

    async def new_layers(self, vm: str, disks: Sequence[DiskRuntime]) -> list[DiskRuntime]:
        """``disks`` with a fresh layer on each layered one, over what it stands on now.

        What a VM starts on, from its base images (``up``) or a state's frozen
        layers (a restore): neither is ever written. On failure the layers
        made so far are removed.

        Raises:
            DiskError: a layer could not be made.
        """
        layers = self.store.layers_dir
        out: list[DiskRuntime] = []
        made: list[Path] = []
        try:
            for d in disks:
                if d.skipped:
                    out.append(d)
                    continue
                top = disk.layer_path(layers, d.layer) if d.layer else Path(d.base)
                plan = disk.plan_fresh_overlay(layers, vm, top)
                made.append(await disk.create_overlay(plan))
                out.append(DiskRuntime(d.target, d.base, [*d.chain, plan.layer_id]))
        except BaseException:
            for path in made:
                disk.remove_layer(path)
            raise
        return out

    async def discard(self, vm: HostVm, *, graceful: bool = True) -> None:
        """Stop ``vm`` through its driver; it is no longer run here (see VmDriver.discard)."""
        await vm.driver.discard(vm, graceful=graceful)

    def active_chains(self) -> dict[str, list[str]]:
        """The layer ids each running VM's disks stand on."""
        return {name: ids for name, vm in self.vms.items() if (ids := vm.runtime.layer_ids)}
