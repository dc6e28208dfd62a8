"""What a group operation reports: per-VM instants, skews, frames (pure data + math).

All instants are seconds on the caller's clock (Unix epoch). Skew is max minus
min over all VMs of the instant QEMU says the action took effect.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ClockLine", "OperationReport", "VmLine", "skew_ms"]


def skew_ms(instants: Iterable[float | None]) -> float | None:
    """Max minus min of the known instants, in milliseconds (None if none known)."""
    known = [t for t in instants if t is not None]
    if not known:
        return None
    return (max(known) - min(known)) * 1000.0


@dataclass
class VmLine:
    """One VM's part of an operation."""

    name: str
    host: str
    paused_at: float | None = None
    resumed_at: float | None = None
    memory_bytes: int = 0
    frames_held: int = 0
    frames_delivered: int = 0
    frames_dropped: int = 0
    frames_ignored: int = 0  # from outside the group, not held (networks with hold = "group")
    # "fast" or "standard"; and why the standard path, or how the RAM image was kept
    memory_path: str = ""
    memory_note: str = ""


@dataclass(frozen=True)
class ClockLine:
    """One host's clock as measured at the start of the operation."""

    host: str
    offset_ms: float
    delay_ms: float


@dataclass
class OperationReport:
    """The result of ``lockstep save`` or ``lockstep restore``."""

    state: str
    operation: str
    stop: bool = False
    duration_s: float = 0.0
    predicted_skew_ms: float = 0.0
    vms: list[VmLine] = field(default_factory=list)
    clocks: list[ClockLine] = field(default_factory=list)

    @property
    def pause_skew_ms(self) -> float | None:
        """Spread of the pause instants over all VMs (save only)."""
        return skew_ms(v.paused_at for v in self.vms)

    @property
    def resume_skew_ms(self) -> float | None:
        """Spread of the resume instants over all VMs (None for ``save --stop``)."""
        return skew_ms(v.resumed_at for v in self.vms)

    def vm(self, name: str) -> VmLine:
        """The line of VM ``name``.

        Raises:
            KeyError: no such VM in this operation.
        """
        for v in self.vms:
            if v.name == name:
                return v
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """The JSON document ``--json`` prints (DESIGN.md's contract, plus extras)."""
        data = asdict(self)
        data["pause_skew_ms"] = self.pause_skew_ms
        data["resume_skew_ms"] = self.resume_skew_ms
        data["frames_held"] = sum(v.frames_held for v in self.vms)
        data["frames_delivered"] = sum(v.frames_delivered for v in self.vms)
        data["frames_dropped"] = sum(v.frames_dropped for v in self.vms)
        data["frames_ignored"] = sum(v.frames_ignored for v in self.vms)
        return data
