"""What an operation works with on one execd: config, clock, store, VMs, journal, fault hooks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from lockstep import disk
from lockstep.execd.clock import ExecdClock
from lockstep.execd.fault import Fault
from lockstep.execd.inject import FaultBook
from lockstep.execd.journal import Journal
from lockstep.execd.model import ExecdConfig
from lockstep.execd.ops import OperationError
from lockstep.execd.vms import VmRegistry
from lockstep.group import VmSpec
from lockstep.store import StateStore

if TYPE_CHECKING:
    from lockstep.execd.driver import VmDriver

__all__ = ["Host", "gather_all"]

T = TypeVar("T")


@dataclass
class Host:
    """One execd's parts, as its operations use them."""

    config: ExecdConfig
    clock: ExecdClock
    store: StateStore
    vms: VmRegistry
    journal: Journal
    fault: Fault  # the test-only failure hook
    faults: FaultBook  # the faults a user injected (lockstep fault)
    # The layer chains VMs use now: the running ones', and those of VMs an
    # operation holds (a restore's new VMs before they run), by VM.
    chains_in_use: Callable[[], Mapping[str, Sequence[str]]]
    # How this host runs each kind of VM, by the group file's ``driver``.
    drivers: dict[str, VmDriver] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """This host's name in the group."""
        return self.config.host

    def driver(self, spec: VmSpec) -> VmDriver:
        """The driver that runs VMs like ``spec``.

        Raises:
            OperationError: this execd has no such driver.
        """
        found = self.drivers.get(spec.driver)
        if found is None:
            raise OperationError(
                f"host {self.name} cannot run VM {spec.name}: no {spec.driver} driver"
            )
        return found

    def collect_garbage(self) -> None:
        """Remove layers no state and no running VM needs any more."""
        keep: list[Sequence[str]] = [
            rec.layers for m in self.store.list() for rec in m.vms.values()
        ]
        keep += self.chains_in_use().values()
        existing = {p.stem for p in self.store.layers_dir.glob("*.qcow2")}
        for layer in disk.unreachable_layers(existing, keep):
            disk.remove_layer(disk.layer_path(self.store.layers_dir, layer))


async def gather_all(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Like gather, but waits for every task before raising the first failure."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)  # type: ignore[arg-type]
