"""The phases of a group save or restore, as pure data.

The orchestrator walks these in order; progress output and tests name them.
Steps marked ``at_common_instant`` are scheduled at one absolute time on every
host; everything before ``commit`` is undone by ``abort`` on failure.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Phase", "restore_plan", "save_plan"]


@dataclass(frozen=True)
class Phase:
    """One step the caller asks of every host."""

    name: str
    call: str  # the execd call it makes
    at_common_instant: bool = False
    undone_by_abort: bool = True


_SYNC = Phase("clock sync", "probe", undone_by_abort=False)


def save_plan(*, stop: bool) -> list[Phase]:
    """The phases of ``lockstep save`` (``stop``: destroy the VMs after, as the paper)."""
    phases = [
        _SYNC,
        Phase("freeze NICs and pause", "pause", at_common_instant=True),
        Phase("save memory and freeze disk layers", "save_memory"),
        Phase("drain and save held frames", "drain"),
    ]
    if stop:
        return [
            *phases,
            Phase("commit", "commit", undone_by_abort=False),
            Phase("destroy VMs", "stop", undone_by_abort=False),
        ]
    # No second clock sync: the VMs are paused meanwhile (it would add to
    # their downtime), and clocks do not drift measurably in a save's seconds.
    return [
        *phases,
        Phase("resume and deliver frames", "resume", at_common_instant=True),
        Phase("commit", "commit", undone_by_abort=False),
    ]


def restore_plan() -> list[Phase]:
    """The phases of ``lockstep restore``."""
    return [
        _SYNC,
        Phase("load VMs paused, frames held", "prepare_restore"),
        _SYNC,
        Phase("resume and deliver frames", "resume", at_common_instant=True),
        Phase("commit", "commit", undone_by_abort=False),
    ]
