"""What the execd needs of any VM to act on it at an instant, whoever runs its QEMU.

Two kinds of VM implement :class:`VmControl`: :class:`~lockstep.vm.machine.Machine`
(a QEMU process lockstep starts and drives over QMP) and
:class:`~lockstep.vm.domain.Domain` (a libvirt domain, driven through
libvirt's API). Both report the instants QEMU itself stamped on its STOP and
RESUME events, and both name the QEMU threads that carry a command (so they
can run real-time around an instant).
"""

from __future__ import annotations

from typing import Protocol

from lockstep.vm.machine import VmRunstate

__all__ = ["VmControl"]


class VmControl(Protocol):
    """A VM's QEMU as the execd's instants see it: its runstate, threads, pause and resume."""

    @property
    def name(self) -> str:
        """The VM's name."""

    @property
    def runstate(self) -> VmRunstate:
        """Where the VM is in its lifecycle."""

    @property
    def pid(self) -> int | None:
        """QEMU's pid, if it runs."""

    def alive(self) -> bool:
        """Whether QEMU still runs."""

    def control_threads(self) -> list[int]:
        """Threads that carry a command through to QEMU (QEMU's own, and any of ours)."""

    def vcpu_threads(self) -> list[int]:
        """QEMU's vCPU threads."""

    async def pause(self) -> float:
        """Stop the vCPUs; QEMU's STOP instant (host wall clock, s).

        Raises:
            VmError: the VM could not be paused.
        """

    async def resume(self) -> float:
        """Start the vCPUs; QEMU's RESUME instant (host wall clock, s).

        Raises:
            VmError: the VM could not be resumed.
        """

    async def kill(self) -> None:
        """Kill QEMU at once (SIGKILL), as a crash would; the VM is gone afterwards."""

    async def announce(self) -> None:
        """Announce the running VM's NICs to the network, where the driver can.

        Raises:
            VmError: QEMU refused or did not answer.
        """

    async def guest_agent_open(self) -> bool:
        """Whether a guest agent in the VM listens on its channel.

        Raises:
            VmError: QEMU (or libvirt) did not answer.
        """
