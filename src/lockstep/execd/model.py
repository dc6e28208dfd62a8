"""Values the execd service takes and returns; transport-free (no gRPC here).

Times are seconds on the execd's clock: the host's wall clock plus its
``--clock-offset`` (zero outside tests). The caller converts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ExecdConfig",
    "GuestTime",
    "ProbeReply",
    "SaveProgress",
    "StateInfo",
    "VmReport",
    "VmStatus",
]


@dataclass(frozen=True)
class ExecdConfig:
    """How one execd runs: its host name, data root and listening address."""

    host: str
    root: Path
    listen: str = "0.0.0.0:7443"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    clock_offset: float = 0.0
    # Only for running the service in-process against a lab host: the network
    # namespace its taps and QEMU processes live in. A real execd runs inside it.
    netns: str | None = None
    qemu_binary: str = "qemu-system-x86_64"
    # Frames: how many to hold in memory per VM, and the hard limit (issue 4).
    frames_in_memory: int = 4096
    frames_limit: int = 262144
    # How long before the pause the NICs freeze: QEMU drops a frame it read
    # from the tap but could not hand to the guest yet when the VM stops, so
    # the guest gets this long to take what already reached QEMU.
    frames_lead: float = 0.02


@dataclass(frozen=True)
class ProbeReply:
    """One clock probe: when the request arrived and when the reply left (execd clock)."""

    received: float
    sent: float


@dataclass(frozen=True)
class VmStatus:
    """A VM as its host sees it now."""

    name: str
    runstate: str
    pid: int | None = None
    layer: str | None = None
    state: str | None = None


@dataclass(frozen=True)
class VmReport:
    """What one step did to one VM: instants (execd clock), bytes and frames.

    ``memory_path`` is the path a memory step took ("fast" or "standard"; ""
    for steps that touch no memory) and ``memory_note`` why it fell back to
    the standard path, or how the fast path kept or mapped the RAM image.
    ``clock_correction_ms`` is how far a restore moved the guest's wall clock
    forward to true time (None: not set) and ``clock_note`` why it was not
    ("no guest agent", or what the agent said).
    """

    name: str
    paused_at: float | None = None
    resumed_at: float | None = None
    memory_bytes: int = 0
    frames_held: int = 0
    frames_delivered: int = 0
    frames_dropped: int = 0
    frames_ignored: int = 0
    memory_path: str = ""
    memory_note: str = ""
    clock_correction_ms: float | None = None
    clock_note: str = ""


@dataclass(frozen=True)
class GuestTime:
    """The guests whose wall clocks a restore sets once they resumed, and true time for them.

    ``true_at`` is the caller's clock at the resume instant: the group's one
    timebase, so every guest gets the same time whatever its host's clock says.
    The VMs not in ``vms`` keep the time they had when saved.
    """

    true_at: float
    vms: tuple[str, ...] = ()


@dataclass(frozen=True)
class SaveProgress:
    """Memory written so far for one VM."""

    vm: str
    done: int
    total: int


@dataclass(frozen=True)
class StateInfo:
    """A committed state as listed by one host."""

    name: str
    host: str
    created_at: str
    parent: str | None = None
    vms: list[str] = field(default_factory=list)
    size_bytes: int = 0
