"""What a group operation reports: per-VM instants, skews, frames (pure data + math).

All instants are seconds on the caller's clock (Unix epoch). Skew is max minus
min over all VMs of the instant QEMU says the action took effect.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lockstep.caller.clock import ClockEstimate, predicted_skew

__all__ = ["ClockLine", "OperationReport", "VmLine", "clock_lines", "skew_ms"]


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
    """One host's clock as measured (at the start of the operation, or by ``check``).

    ``error_bound_ms`` is the most the offset can be wrong by; ``path`` the
    probe path ("udp" or "grpc", with ``note`` saying why gRPC); ``lost``
    probes got no reply in time; ``ignored`` replies did not verify or came
    late; ``refused`` is what the execd's UDP path ignored since it started.
    """

    host: str
    offset_ms: float
    delay_ms: float
    error_bound_ms: float = 0.0
    samples: int = 0
    path: str = ""
    note: str = ""
    sync_s: float = 0.0
    lost: int = 0
    ignored: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, host: str, est: ClockEstimate) -> ClockLine:
        """The line for one host's estimate."""
        return cls(
            host,
            offset_ms=est.offset * 1000,
            delay_ms=est.delay * 1000,
            error_bound_ms=est.error_bound * 1000,
            samples=est.samples,
            path=est.path,
            note=est.note,
            sync_s=est.elapsed,
            lost=est.lost,
            ignored=est.ignored,
            refused=dict(est.refused),
        )


def clock_lines(est: Mapping[str, ClockEstimate]) -> tuple[list[ClockLine], float]:
    """One line per host, in name order, and the skew clock error alone could cause (ms)."""
    return [ClockLine.of(h, e) for h, e in sorted(est.items())], predicted_skew(est) * 1000


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
