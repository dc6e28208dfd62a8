"""The phases of a group save or restore: each one's action and its undo, and the plans.

A :class:`Phase` is a step every host is asked to take: its ``act`` asks the
hosts (through the :class:`~lockstep.caller.operation.Operation`) and files
their answers; when a host fails it, the runner (:mod:`lockstep.caller.runner`)
runs its ``undo``. Most undos are an :class:`Abort`: the operation is aborted
on every host and the VMs that must resume do so at one common instant; it
differs only in what it means for the user. A restore never touches the running
VMs before its switch-over, so aborting it before then only discards what it
prepared, and after it switches back. Phases marked ``at_common_instant`` take
effect at one absolute time on every host.

The plans are pure: :func:`save_plan` and :func:`restore_plan` list the phases
in order; adding a step is one phase here and one line in its plan. Progress
output and tests name the phases.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from lockstep.caller.clock import predicted_skew, to_host
from lockstep.caller.links import Results, failures, fanout
from lockstep.caller.operation import PAUSE_MARGIN, RESUME_MARGIN, Operation
from lockstep.caller.report import clock_lines
from lockstep.caller.sync import measure
from lockstep.errors import ClockError
from lockstep.execd.model import GuestTime, SaveProgress

__all__ = ["Abort", "Phase", "Say", "Undo", "restore_plan", "save_plan"]


class Undo(Protocol):
    """What a failed phase calls for; :meth:`run` says what it did, to end the error's sentence."""

    @property
    def name(self) -> str:
        """How the runner's history names it."""

    async def run(self, op: Operation, results: Results) -> str:
        """Undo, given every host's result of the failed phase; returns "; what was done"."""


@dataclass(frozen=True)
class Phase:
    """One step the caller asks of every host: its action, and the undo its failure calls for.

    ``what`` names the step in an error (default: ``name``).
    """

    name: str
    act: Callable[[Operation], Awaitable[None]]
    undo: Undo | None = None
    at_common_instant: bool = False
    what: str = ""


@dataclass(frozen=True)
class Abort:
    """Abort the operation on every host; VMs that must resume do so at one common instant.

    A host undoes what it did of the operation: it drops staging, resumes a
    save's VMs (or stops a restore's), and a save it already committed is
    removed again. ``means`` says what that is for the user, given the failed
    phase's results and the abort's.
    """

    means: Callable[[Operation, Results, Results], str]
    name: str = "abort"

    async def run(self, op: Operation, results: Results) -> str:
        """Abort everywhere; "; what it means"."""
        at = op.common_instant(RESUME_MARGIN) if op.est else None
        aborted = await fanout(
            op.hosts,
            lambda h, link: link.abort(op.id, None if at is None else to_host(at, op.est[h])),
        )
        return "; " + self.means(op, results, aborted)


def _except(aborted: Results) -> str:
    """The hosts whose abort failed, as ' except HOST (why), ...' ('' if none did)."""
    failed = failures(aborted)
    return " except " + ", ".join(f"{r.host} ({r.error})" for r in failed) if failed else ""


@dataclass(frozen=True)
class Say:
    """Nothing to undo on the hosts: only what the failure means for the user."""

    means: Callable[[Operation, Results], str]
    name: str = "report"

    async def run(self, op: Operation, results: Results) -> str:
        """Say what the failure means (after "; ")."""
        return "; " + self.means(op, results)


def _restore_undone(done: str) -> Callable[[Operation, Results, Results], str]:
    """What an aborted restore means: ``done`` on every host, and the group runs on as it was."""

    def means(op: Operation, _results: Results, aborted: Results) -> str:
        unreached = sorted(r.host for r in failures(aborted))
        late = (
            f" (host {', '.join(unreached)} could not be told: it undoes the restore by itself"
            " at the operation's deadline)"
            if unreached
            else ""
        )
        return (
            f"the restore of state {op.state!r} was undone: {done}, and the group runs on as it"
            f" was{late}"
        )

    return means


def _restore_not_committed(op: Operation, results: Results) -> str:
    """What a restore whose commit failed somewhere means: it took effect, not for good there."""
    failed = sorted(h for h, r in results.items() if not r.ok)
    return (
        f"the restore of state {op.state!r} took effect on every host, but host"
        f" {', '.join(failed)} could not be told to keep it: at the operation's deadline"
        f" {'they switch' if len(failed) > 1 else 'it switches'} back to the VMs"
        f" {'they' if len(failed) > 1 else 'it'} ran before (run `lockstep restore"
        f" {op.state}` again)"
    )


ROLL_BACK = Abort(
    lambda _op, _r, aborted: (
        "the operation was rolled back on every host (VMs running as before)" + _except(aborted)
    )
)
DISCARD_PREPARED = Abort(_restore_undone("the VMs it prepared were discarded"))
SWITCH_BACK = Abort(
    _restore_undone("every host that had switched over to the restored VMs switched back")
)
UNDO_SAVE_COMMIT = Abort(
    lambda op, _r, _a: f"state {op.state!r} was removed from the hosts that had committed it"
)
RESTORE_NOT_KEPT = Say(_restore_not_committed)


# -- the actions -------------------------------------------------------------------


def _refuse_noisy(op: Operation) -> None:
    """Refuse (with the figures) when clock error alone could break the skew budget."""
    skew = predicted_skew(op.est)
    if skew <= op.skew_budget or op.options.force:
        return
    figures = ", ".join(
        f"{h}: delay {e.delay * 1000:.3f} ms, {e.samples} samples over {e.path}"
        for h, e in sorted(op.est.items())
    )
    raise ClockError(
        f"clock sync is too noisy: after {max(e.elapsed for e in op.est.values()):.1f} s of"
        f" probing it predicts up to {skew * 1000:.2f} ms of skew, over the budget of"
        f" {op.skew_budget * 1000:.2f} ms ({figures}); nothing was changed"
        " (retry, raise --sync-limit or --skew-budget, or use --force)"
    )


async def _sync(op: Operation) -> None:
    op.est.update(await op.each(lambda _h, link: measure(link, op.sync_policy, op.clock)))
    op.report.clocks, op.report.predicted_skew_ms = clock_lines(op.est)


async def _sync_within_budget(op: Operation) -> None:
    await _sync(op)
    _refuse_noisy(op)


async def _pause(op: Operation) -> None:
    at = op.common_instant(PAUSE_MARGIN)
    deadline = op.deadline = at + op.deadman
    paused = await op.each(
        lambda h, link: link.pause(
            op.id, op.state, op.on_host(h, at), op.vms[h], op.on_host(h, deadline)
        )
    )
    op.merge(paused)


async def _save_memory(op: Operation) -> None:
    def on_memory(p: SaveProgress) -> None:
        op.say("memory", {"vm": p.vm, "done": p.done, "total": p.total})

    op.merge(
        await op.each(lambda _h, link: link.save_memory(op.id, not op.options.stop, on_memory))
    )


async def _drain(op: Operation) -> None:
    quiet, limit = op.options.quiet, op.options.drain_limit
    op.merge(await op.each(lambda _h, link: link.drain(op.id, quiet, limit)))


async def _resume(op: Operation) -> None:
    at = op.resume_instant()
    op.merge(await op.each(lambda h, link: link.resume(op.id, op.on_host(h, at))))


SAVED_TIME_KEPT = 'the saved time kept (guest_time = "saved")'


async def _switch_over(op: Operation) -> None:
    """The restore's resume: then each host sets the chosen guests' wall clocks to true time.

    True time is this caller's clock: the resume instant ``at`` in it goes
    along, so every guest gets the group's one timebase.
    """
    at = op.resume_instant()

    def guest_time(host: str) -> GuestTime:
        return GuestTime(at, tuple(v for v in op.vms[host] if v in op.options.set_guest_time))

    op.merge(await op.each(lambda h, link: link.resume(op.id, op.on_host(h, at), guest_time(h))))
    for line in op.report.vms:
        if line.name not in op.options.set_guest_time:
            line.clock_note = SAVED_TIME_KEPT


async def _commit(op: Operation) -> None:
    await op.each(lambda _h, link: link.commit(op.id))


async def _stop(op: Operation) -> None:
    await op.each(lambda _h, link: link.stop(op.id))


async def _verify(op: Operation) -> None:
    await op.each(lambda _h, link: link.verify_state(op.state, op.options.verify))


async def _switch(op: Operation) -> None:
    at = op.common_instant(RESUME_MARGIN)
    op.merge(await op.each(lambda h, link: link.switch(op.id, op.on_host(h, at))))


async def _prepare_restore(op: Operation) -> None:
    deadline = op.deadline = op.clock() + op.deadman
    prepared = await op.each(
        lambda h, link: link.prepare_restore(op.id, op.state, op.on_host(h, deadline))
    )
    op.merge(prepared)


# -- the phases and plans ------------------------------------------------------------

# The first sync also checks the skew budget; nothing is open on the hosts yet.
CLOCK_SYNC = Phase("clock sync", _sync_within_budget)
PAUSE = Phase("freeze NICs and pause", _pause, ROLL_BACK, at_common_instant=True)
SAVE_MEMORY = Phase("save memory and freeze disk layers", _save_memory, ROLL_BACK)
DRAIN = Phase("drain and save held frames", _drain, ROLL_BACK)
RESUME_SAVED = Phase("resume and deliver frames", _resume, ROLL_BACK, at_common_instant=True)
COMMIT_SAVE = Phase("commit", _commit, UNDO_SAVE_COMMIT)
DESTROY = Phase("destroy VMs", _stop, what="destroying VMs")  # the state is committed
# Nothing is touched before the state is verified on every host.
VERIFY = Phase("verify the state", _verify, what="verifying the state")
PREPARE_RESTORE = Phase("load VMs paused, frames held", _prepare_restore, DISCARD_PREPARED)
RESYNC_RESTORE = Phase("clock sync", _sync, DISCARD_PREPARED)
# The old VMs pause a moment before the new ones resume at the common instant;
# the guests' wall clocks are set right after.
SWITCH_OVER = Phase("switch over", _switch_over, SWITCH_BACK, at_common_instant=True)
# Or, where a new VM can take the old one's place only once that one is paused
# (a libvirt domain cannot exist twice): the old VMs pause at one instant and
# every host swaps, however long that takes; then the new VMs resume at another.
SWITCH = Phase("pause and swap in the restored VMs", _switch, SWITCH_BACK, at_common_instant=True)
RESUME_RESTORED = Phase(
    "resume and deliver frames", _switch_over, SWITCH_BACK, at_common_instant=True
)
COMMIT_RESTORE = Phase("commit", _commit, RESTORE_NOT_KEPT)


def save_plan(*, stop: bool) -> list[Phase]:
    """The phases of ``lockstep save`` (``stop``: destroy the VMs after, as the paper)."""
    if stop:
        return [CLOCK_SYNC, PAUSE, SAVE_MEMORY, DRAIN, COMMIT_SAVE, DESTROY]
    # No second clock sync: the VMs are paused meanwhile (it would add to
    # their downtime), and clocks do not drift measurably in a save's seconds.
    return [CLOCK_SYNC, PAUSE, SAVE_MEMORY, DRAIN, RESUME_SAVED, COMMIT_SAVE]


def restore_plan(*, swap_paused: bool = False) -> list[Phase]:
    """The phases of ``lockstep restore`` (``swap_paused``: a VM is a libvirt domain)."""
    first = [VERIFY, CLOCK_SYNC, PREPARE_RESTORE, RESYNC_RESTORE]
    if swap_paused:
        return [*first, SWITCH, RESUME_RESTORED, COMMIT_RESTORE]
    return [*first, SWITCH_OVER, COMMIT_RESTORE]
