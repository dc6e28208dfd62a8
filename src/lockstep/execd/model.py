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
    "FaultAction",
    "FaultReply",
    "FaultVm",
    "Freeze",
    "Heal",
    "HeldFault",
    "Kill",
    "ListFaults",
    "Loss",
    "MAX_FREEZE_S",
    "Partition",
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
    layer: str | None = None  # the active layers, one per layered disk, comma-separated
    state: str | None = None
    driver: str = "qemu"
    domain: str | None = None  # a libvirt domain's name, UUID and live XML (no secrets)
    uuid: str | None = None
    xml: str | None = None


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


# Faults injected on purpose (``lockstep fault``; :mod:`lockstep.execd.inject`).


@dataclass(frozen=True)
class Kill:
    """Kill the VM's QEMU (SIGKILL), as a crashed node."""

    vm: str


# The longest freeze: longer is a caller's mistake, and would hold a VM paused for good.
MAX_FREEZE_S = 3600.0


@dataclass(frozen=True)
class Freeze:
    """Pause the VM alone for ``seconds`` (at most :data:`MAX_FREEZE_S`), then resume it."""

    vm: str
    seconds: float


@dataclass(frozen=True)
class FaultVm:
    """A VM of one side of a partition, with its NICs' MACs (from the group file)."""

    name: str
    macs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Partition:
    """Drop every frame between a VM of side ``a`` and a VM of side ``b``, both ways."""

    a: tuple[FaultVm, ...]
    b: tuple[FaultVm, ...]


@dataclass(frozen=True)
class Loss:
    """Drop ``percent`` of the frames to and from the VM, at random."""

    vm: str
    percent: int


@dataclass(frozen=True)
class Heal:
    """Undo the faults ``ids`` of the group (none: every one)."""

    ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ListFaults:
    """Change nothing; say which faults of the group this host holds."""


FaultAction = Kill | Freeze | Partition | Loss | Heal | ListFaults


@dataclass(frozen=True)
class HeldFault:
    """A fault one host holds until it is healed or a restore of its group switches over.

    ``vms`` are the host's VMs it acts on now; ``what`` says what it does
    there; ``seconds_left`` is a freeze's time until its VM resumes by itself.
    """

    id: str
    kind: str  # "freeze", "partition" or "loss"
    vms: list[str] = field(default_factory=list)
    what: str = ""
    seconds_left: float | None = None


@dataclass(frozen=True)
class FaultReply:
    """What one host did about a fault (one sentence each), and the faults it holds after."""

    did: list[str] = field(default_factory=list)
    held: list[HeldFault] = field(default_factory=list)
