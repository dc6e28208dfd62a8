"""The execd's service interface, as a Protocol: what the RPC adapter serves.

:class:`lockstep.execd.service.HostService` implements it for real; protocol
tests serve a stub that implements it too. Every method raises only
:class:`~lockstep.errors.LockstepError` subclasses on purpose; the adapter maps
them to RPC status codes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from lockstep.execd.model import (
    FaultAction,
    FaultReply,
    GuestTime,
    ProbeReply,
    SaveProgress,
    StateInfo,
    VmReport,
    VmStatus,
)
from lockstep.group import VmSpec
from lockstep.store import Verified

__all__ = ["ExecdApi"]


class ExecdApi(Protocol):
    """One host's execd, transport-free."""

    def probe(self) -> ProbeReply:
        """Stamp a clock probe on the execd's clock."""

    def from_wall(self, wall: float) -> float:
        """A host wall-clock instant (a kernel's or QEMU's stamp) on the execd's clock."""

    async def up(self, group: str, vms: Sequence[VmSpec]) -> list[VmStatus]:
        """Start the VMs that are not running (each on a fresh layer over its base)."""

    async def down(self, vms: Sequence[str]) -> list[VmStatus]:
        """Stop the named VMs (all when empty) and remove their taps."""

    async def status(self) -> list[VmStatus]:
        """The VMs of this host as they are now."""

    async def pause(
        self, op: str, state: str, at: float, vms: Sequence[str], deadline: float
    ) -> list[VmReport]:
        """Open a save operation; at ``at`` freeze the NICs and pause the VMs."""

    async def save_memory(
        self, op: str, keep_running: bool, progress: Callable[[SaveProgress], None] | None
    ) -> list[VmReport]:
        """Write each paused VM's memory into the staging state and freeze its layer."""

    async def drain(self, op: str, quiet: float, limit: float) -> list[VmReport]:
        """Keep capturing until quiet, then write the held frames into the state."""

    async def resume(
        self, op: str, at: float, guest_time: GuestTime | None = None
    ) -> list[VmReport]:
        """At ``at`` resume the operation's VMs; a restore then sets the guests' clocks."""

    async def stop(self, op: str) -> list[VmReport]:
        """Destroy the operation's VMs (``save --stop``)."""

    async def commit(self, op: str) -> StateInfo | None:
        """Make the operation's result permanent (a save: the state becomes visible)."""

    async def abort(self, op: str, resume_at: float | None) -> list[VmReport]:
        """Undo the operation: drop its staging state, resume its VMs at ``resume_at``."""

    def extend(self, op: str, deadline: float) -> None:
        """Push back the operation's dead-man deadline."""

    async def prepare_restore(self, op: str, state: str, deadline: float) -> list[VmReport]:
        """Replace this host's VMs of ``state`` by paused VMs loaded from it."""

    async def switch(self, op: str, at: float) -> list[VmReport]:
        """Pause the restore's old VMs at ``at`` and put the new ones in their place, paused."""

    def states(self) -> list[StateInfo]:
        """The committed states on this host."""

    def state_show(self, name: str) -> dict[str, Any]:
        """One state's manifest as JSON-ready data."""

    async def verify_state(self, name: str, deep: bool) -> Verified:
        """Check every file of a state against its manifest (RAM hashes with ``deep``)."""

    async def state_delete(self, name: str) -> list[str]:
        """Delete a state no other state or VM depends on; return layers removed."""

    def state_frames(self, name: str, vm: str) -> Iterator[tuple[str, bytes]]:
        """The pcap files of the frames held for ``vm`` in state ``name``: (file, chunk)s."""

    async def inject_fault(self, group: str, fault_id: str, action: FaultAction) -> FaultReply:
        """Inject a fault on this host's VMs of ``group``, heal its faults, or list them."""
