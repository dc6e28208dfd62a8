"""What a group operation reports: per-VM instants, skews, frames (pure data + math).

All instants are seconds on the caller's clock (Unix epoch). Skew is max minus
min over all VMs of the instant QEMU says the action took effect.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lockstep.caller.clock import ClockEstimate, predicted_skew, to_caller
from lockstep.execd.model import VmReport

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
    # a restore: how far the guest's wall clock was moved forward to true time
    # (None: not set), and why not ("no guest agent", the saved time kept...)
    clock_correction_ms: float | None = None
    clock_note: str = ""


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
        """Spread of the pause instants over all VMs (a restore: of the VMs it replaced)."""
        return skew_ms(v.paused_at for v in self.vms)

    @property
    def switch_over_ms(self) -> float | None:
        """A restore's switch-over: from the first replaced VM's pause to the last new VM's resume.

        None for a save, or a restore that replaced no running VM.
        """
        if self.operation != "restore":
            return None
        paused = [v.paused_at for v in self.vms if v.paused_at is not None]
        resumed = [v.resumed_at for v in self.vms if v.resumed_at is not None]
        if not paused or not resumed:
            return None
        return (max(resumed) - min(paused)) * 1000

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

    def merge(
        self, results: Mapping[str, Sequence[VmReport]], est: Mapping[str, ClockEstimate]
    ) -> None:
        """Add what one step did to each host's VMs, instants converted to the caller's clock.

        A step's figures add to the earlier steps' (the largest count is kept);
        the lines stay in (host, name) order.
        """
        for host, reports in results.items():
            for r in reports:
                try:
                    line = self.vm(r.name)
                except KeyError:
                    line = VmLine(name=r.name, host=host)
                    self.vms.append(line)
                if r.paused_at is not None:
                    line.paused_at = to_caller(r.paused_at, est[host])
                if r.resumed_at is not None:
                    line.resumed_at = to_caller(r.resumed_at, est[host])
                line.memory_bytes = max(line.memory_bytes, r.memory_bytes)
                line.frames_held = max(line.frames_held, r.frames_held)
                line.frames_delivered = max(line.frames_delivered, r.frames_delivered)
                line.frames_dropped = max(line.frames_dropped, r.frames_dropped)
                line.frames_ignored = max(line.frames_ignored, r.frames_ignored)
                if r.memory_path:
                    line.memory_path, line.memory_note = r.memory_path, r.memory_note
                if r.clock_correction_ms is not None or r.clock_note:
                    line.clock_correction_ms, line.clock_note = r.clock_correction_ms, r.clock_note
        self.vms.sort(key=lambda v: (v.host, v.name))

    def frames_held_by_host(self) -> dict[str, int]:
        """How many frames each host holds for its VMs."""
        held: dict[str, int] = {}
        for v in self.vms:
            held[v.host] = held.get(v.host, 0) + v.frames_held
        return held

    def to_json(self) -> dict[str, Any]:
        """The JSON document ``--json`` prints (DESIGN.md's contract, plus extras)."""
        data = asdict(self)
        data["pause_skew_ms"] = self.pause_skew_ms
        data["resume_skew_ms"] = self.resume_skew_ms
        data["switch_over_ms"] = self.switch_over_ms
        data["frames_held"] = sum(v.frames_held for v in self.vms)
        data["frames_delivered"] = sum(v.frames_delivered for v in self.vms)
        data["frames_dropped"] = sum(v.frames_dropped for v in self.vms)
        data["frames_ignored"] = sum(v.frames_ignored for v in self.vms)
        return data
