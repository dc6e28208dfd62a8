"""The caller: sync clocks, schedule phases, fan out to every host, commit or abort.

It holds no VM logic. Each call goes to all hosts at once and comes back as one
:class:`HostResult` per host (Ganeti style); this module alone decides whether
to go on, abort everywhere, or compensate after a partial commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from lockstep.caller.clock import (
    ClockEstimate,
    SyncPolicy,
    predicted_skew,
    to_caller,
    to_host,
)
from lockstep.caller.plan import Phase, restore_plan, save_plan
from lockstep.caller.report import OperationReport, VmLine, clock_lines
from lockstep.caller.sync import ProbePath, measure
from lockstep.errors import ClockError, ConfigError, LockstepError, OperationFailed
from lockstep.execd.model import ProbeReply, SaveProgress, StateInfo, VmReport, VmStatus
from lockstep.group import GroupSpec, VmSpec, validate_name

__all__ = ["GroupCaller", "HostLink", "HostResult", "fanout"]

T = TypeVar("T")

# How far ahead of "now" a common instant is set (plus 4 times the worst
# measured delay): the call must reach every host, and for a pause the host
# must prepare its freeze, before it. A resume's margin is the VMs' downtime.
PAUSE_MARGIN = 0.35
RESUME_MARGIN = 0.05
# Held frames are queued on the taps before the VMs resume (lockstep.net.freeze):
# the resume instant leaves this long per frame a host holds (a slow machine's
# Python injects one in about 10 us).
DELIVER_SECONDS_PER_FRAME = 20e-6
# Dead-man's timer: paused VMs resume by themselves (at one instant on every
# host) this long after the caller last extended the operation.
DEADMAN_SECONDS = 30.0
# Refuse to start when clock error alone could cause more skew than this.
SKEW_BUDGET = 0.002


class HostLink(Protocol):
    """What the caller needs of one execd (``lockstep.rpc.HostClient`` provides it)."""

    async def probe(self, sent: float) -> ProbeReply: ...
    async def probe_path(self) -> ProbePath | None: ...
    async def up(self, group: str, vms: Sequence[VmSpec]) -> list[VmStatus]: ...
    async def down(self, vms: Sequence[str]) -> list[VmStatus]: ...
    async def status(self) -> list[VmStatus]: ...
    async def pause(
        self, op: str, state: str, at: float, vms: Sequence[str], deadline: float
    ) -> list[VmReport]: ...
    async def save_memory(
        self, op: str, keep_running: bool, progress: Callable[[SaveProgress], None] | None
    ) -> list[VmReport]: ...
    async def drain(self, op: str, quiet: float, limit: float) -> list[VmReport]: ...
    async def resume(self, op: str, at: float) -> list[VmReport]: ...
    async def stop(self, op: str) -> list[VmReport]: ...
    async def commit(self, op: str) -> StateInfo | None: ...
    async def abort(self, op: str, resume_at: float | None) -> list[VmReport]: ...
    async def extend(self, op: str, deadline: float) -> None: ...
    async def prepare_restore(self, op: str, state: str, deadline: float) -> list[VmReport]: ...
    async def states(self) -> list[StateInfo]: ...
    async def state_show(self, name: str) -> dict[str, Any]: ...
    async def state_delete(self, name: str) -> list[str]: ...
    async def state_frames(self, name: str, vm: str) -> list[tuple[str, bytes]]: ...


@dataclass(frozen=True)
class HostResult(Generic[T]):
    """One host's answer to a fanned-out call: a value or the error it raised."""

    host: str
    value: T | None = None
    error: LockstepError | None = None

    @property
    def ok(self) -> bool:
        """Whether the call succeeded on this host."""
        return self.error is None


async def fanout(
    hosts: Mapping[str, HostLink],
    call: Callable[[str, HostLink], Awaitable[T]],
) -> dict[str, HostResult[T]]:
    """Run ``call`` on every host at once; one result per host, never raises LockstepError."""

    async def one(name: str, link: HostLink) -> HostResult[T]:
        try:
            return HostResult(name, value=await call(name, link))
        except LockstepError as exc:
            return HostResult(name, error=exc)

    results = await asyncio.gather(*(one(n, link) for n, link in hosts.items()))
    return {r.host: r for r in results}


def _failures(results: Mapping[str, HostResult[Any]]) -> list[HostResult[Any]]:
    return [r for r in results.values() if not r.ok]


def _say_failures(what: str, failed: Sequence[HostResult[Any]]) -> str:
    parts = [f"on host {r.host}: {r.error}" for r in failed]
    return f"{what} failed " + "; ".join(parts)


def _except(failed: Sequence[HostResult[Any]]) -> str:
    return " except " + ", ".join(f"{r.host} ({r.error})" for r in failed) if failed else ""


def _restore_not_committed(
    state: str, results: Mapping[str, HostResult[Any]], abort_failed: Sequence[HostResult[Any]]
) -> str:
    """What a restore whose commit failed somewhere left: where its VMs run, where they stopped."""
    committed = sorted(h for h, r in results.items() if r.ok)
    run = f"run on host {', '.join(committed)}, which committed it, and " if committed else ""
    return (
        f"the restore of state {state!r} did not complete (the state itself is unchanged):"
        f" its VMs {run}were stopped on every {'other ' if committed else ''}host"
        f"{_except(abort_failed)}; restore it again, or `lockstep up` for fresh VMs"
    )


Progress = Callable[[str, Mapping[str, Any]], None]
"""Called with (event, details): "phase" {name}, "memory" {vm, done, total}."""


class GroupCaller:
    """Runs group operations over one :class:`HostLink` per host of the group."""

    def __init__(
        self,
        group: GroupSpec,
        links: Mapping[str, HostLink],
        *,
        clock: Callable[[], float] = time.time,
        sync_policy: SyncPolicy | None = None,
        deadman: float = DEADMAN_SECONDS,
        skew_budget: float = SKEW_BUDGET,
    ) -> None:
        missing = sorted(set(group.hosts) - set(links))
        if missing:
            raise ValueError(f"no link for hosts {', '.join(missing)}")
        self.group = group
        self.links = dict(links)
        self.clock = clock
        self.sync_policy = sync_policy or SyncPolicy()
        self.deadman = deadman
        self.skew_budget = skew_budget

    @property
    def vm_hosts(self) -> dict[str, HostLink]:
        """The hosts that run at least one VM of the group."""
        used = {vm.host for vm in self.group.vms.values()}
        return {h: link for h, link in self.links.items() if h in used}

    # -- clocks -------------------------------------------------------------------

    async def sync(self, hosts: Mapping[str, HostLink] | None = None) -> dict[str, ClockEstimate]:
        """Measure every host's clock offset and delay (no clock is changed).

        Every host is sampled at once, each as :attr:`sync_policy` says
        (:func:`lockstep.caller.sync.measure`).

        Raises:
            OperationFailed: a host could not be probed.
        """
        results = await fanout(
            hosts or self.links, lambda _h, link: measure(link, self.sync_policy, self.clock)
        )
        failed = _failures(results)
        if failed:
            raise OperationFailed(_say_failures("clock sync", failed))
        return {h: r.value for h, r in results.items() if r.value is not None}

    def _check_budget(self, est: Mapping[str, ClockEstimate], force: bool) -> None:
        """Refuse (with the figures) when clock error alone could break the skew budget."""
        skew = predicted_skew(est)
        if skew <= self.skew_budget or force:
            return
        figures = ", ".join(
            f"{h}: delay {e.delay * 1000:.3f} ms, {e.samples} samples over {e.path}"
            for h, e in sorted(est.items())
        )
        raise ClockError(
            f"clock sync is too noisy: after {max(e.elapsed for e in est.values()):.1f} s of"
            f" probing it predicts up to {skew * 1000:.2f} ms of skew, over the budget of"
            f" {self.skew_budget * 1000:.2f} ms ({figures}); nothing was changed"
            " (retry, raise --sync-limit or --skew-budget, or use --force)"
        )

    @contextlib.asynccontextmanager
    async def _keepalive(
        self, op: str, hosts: Mapping[str, HostLink], est: Mapping[str, ClockEstimate]
    ) -> AsyncIterator[None]:
        """Extend ``op``'s dead-man deadline on every host while the body runs."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.deadman / 3)
                deadline = self.clock() + self.deadman
                await fanout(hosts, lambda h, link: link.extend(op, to_host(deadline, est[h])))

        task = asyncio.create_task(loop(), name=f"keepalive {op}")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _refuse_existing(self, name: str) -> None:
        present = await self._hosts_with_state(name)
        if present:
            raise OperationFailed(
                f"state {name!r} already exists on host {', '.join(present)}; nothing was"
                f" changed (choose another name, or `lockstep state delete {name}` first)"
            )

    # -- simple fan-outs --------------------------------------------------------

    async def _all(
        self,
        what: str,
        call: Callable[[str, HostLink], Awaitable[T]],
        hosts: Mapping[str, HostLink] | None = None,
    ) -> dict[str, T]:
        results = await fanout(hosts if hosts is not None else self.links, call)
        failed = _failures(results)
        if failed:
            raise OperationFailed(_say_failures(what, failed))
        return {h: r.value for h, r in results.items()}  # type: ignore[misc]

    async def up(self) -> dict[str, list[VmStatus]]:
        """Start every VM of the group that is not running.

        Raises:
            OperationFailed: some host could not start its VMs (names them).
        """
        return await self._all(
            "up",
            lambda h, link: link.up(self.group.name, self.group.vms_on(h)),
            self.vm_hosts,
        )

    async def down(self) -> dict[str, list[VmStatus]]:
        """Stop every VM of the group.

        Raises:
            OperationFailed: some host could not stop its VMs.
        """
        return await self._all(
            "down",
            lambda h, link: link.down([v.name for v in self.group.vms_on(h)]),
            self.vm_hosts,
        )

    async def status(self) -> dict[str, HostResult[list[VmStatus]]]:
        """Every host's VMs, or why the host could not say."""
        return await fanout(self.links, lambda _h, link: link.status())

    async def states(self) -> dict[str, HostResult[list[StateInfo]]]:
        """Every host's committed states, or why the host could not say."""
        return await fanout(self.links, lambda _h, link: link.states())

    async def state_show(self, name: str) -> dict[str, HostResult[dict[str, Any]]]:
        """One state's manifest on every host."""
        validate_name("state", name)
        return await fanout(self.vm_hosts, lambda _h, link: link.state_show(name))

    async def state_frames(self, name: str, vm: str) -> list[tuple[str, bytes]]:
        """The frames state ``name`` holds for ``vm``: each NIC's pcap file (name, content).

        Asked of the host the group places ``vm`` on.

        Raises:
            ConfigError: ``vm`` is not a VM of the group.
            RpcError: that host could not answer, or has no such state or VM.
        """
        validate_name("state", name)
        spec = self.group.vms.get(vm)
        if spec is None:
            known = ", ".join(sorted(self.group.vms))
            raise ConfigError(f"group {self.group.name} has no VM {vm!r} (its VMs: {known})")
        return await self.links[spec.host].state_frames(name, vm)

    async def state_delete(self, name: str) -> dict[str, list[str]]:
        """Delete a state on every host that has it.

        Raises:
            OperationFailed: a host refused (e.g. other states depend on it).
        """
        validate_name("state", name)
        present = await self._hosts_with_state(name)
        if not present:
            raise OperationFailed(f"state {name!r} is on no host of group {self.group.name}")
        return await self._all(
            f"deleting state {name!r}",
            lambda _h, link: link.state_delete(name),
            {h: self.links[h] for h in present},
        )

    async def _hosts_with_state(self, name: str) -> list[str]:
        listing = await self._all("listing states", lambda _h, link: link.states(), self.vm_hosts)
        return sorted(h for h, states in listing.items() if any(s.name == name for s in states))

    # -- save ---------------------------------------------------------------------

    def _new_op(self, kind: str) -> str:
        return f"{kind}-{secrets.token_hex(6)}"

    def _report_clocks(self, report: OperationReport, est: Mapping[str, ClockEstimate]) -> None:
        report.clocks, report.predicted_skew_ms = clock_lines(est)

    def _common_instant(self, est: Mapping[str, ClockEstimate], margin: float) -> float:
        worst = max((e.delay for e in est.values()), default=0.0)
        return self.clock() + margin + 4 * worst

    def _resume_instant(self, est: Mapping[str, ClockEstimate], report: OperationReport) -> float:
        """The common resume instant: time for the call, and for the busiest host's held frames."""
        held: dict[str, int] = {}
        for v in report.vms:
            held[v.host] = held.get(v.host, 0) + v.frames_held
        most = max(held.values(), default=0)
        return self._common_instant(est, RESUME_MARGIN + DELIVER_SECONDS_PER_FRAME * most)

    def _merge(
        self,
        report: OperationReport,
        results: Mapping[str, Sequence[VmReport]],
        est: Mapping[str, ClockEstimate],
    ) -> None:
        for host, reports in results.items():
            for r in reports:
                try:
                    line = report.vm(r.name)
                except KeyError:
                    line = VmLine(name=r.name, host=host)
                    report.vms.append(line)
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
        report.vms.sort(key=lambda v: (v.host, v.name))

    async def _abort(
        self, op: str, hosts: Mapping[str, HostLink], est: Mapping[str, ClockEstimate]
    ) -> list[HostResult[list[VmReport]]]:
        at = self._common_instant(est, RESUME_MARGIN) if est else None
        results = await fanout(
            hosts,
            lambda h, link: link.abort(op, None if at is None else to_host(at, est[h])),
        )
        return _failures(results)

    async def _step(
        self,
        phase: Phase,
        op: str,
        hosts: Mapping[str, HostLink],
        est: Mapping[str, ClockEstimate],
        call: Callable[[str, HostLink], Awaitable[T]],
        progress: Progress | None,
    ) -> dict[str, T]:
        """Run one phase everywhere; on any failure abort everywhere and raise."""
        if progress is not None:
            progress("phase", {"name": phase.name})
        results = await fanout(hosts, call)
        failed = _failures(results)
        if not failed:
            return {h: r.value for h, r in results.items()}  # type: ignore[misc]
        message = _say_failures(phase.name, failed)
        if phase.undone_by_abort:
            abort_failed = await self._abort(op, hosts, est)
            if op.startswith("restore"):
                message += (
                    "; the VMs being restored were stopped on every host (the ones they replaced"
                    " are gone: restore again, or `lockstep up` for fresh VMs)"
                )
            else:
                message += "; the operation was rolled back on every host (VMs running as before)"
            message += _except(abort_failed)
        raise OperationFailed(message)

    async def save(
        self,
        name: str,
        *,
        stop: bool = False,
        quiet: float = 0.05,
        drain_limit: float = 1.0,
        force: bool = False,
        progress: Progress | None = None,
    ) -> OperationReport:
        """Save the whole group as state ``name``, every VM paused at one instant.

        Without ``stop`` every VM resumes at one common instant on a new disk
        layer and gets the frames held for it; with ``stop`` the VMs are
        destroyed after the state is committed.

        Raises:
            OperationFailed: the name is taken (nothing touched), or a step failed
                somewhere and everything was rolled back (the message names the
                step, the host and the reason).
            ClockError: clock sync predicts more skew than the budget (unless ``force``).
        """
        validate_name("state", name)
        started = self.clock()
        hosts = self.vm_hosts
        await self._refuse_existing(name)
        op = self._new_op("save")
        report = OperationReport(state=name, operation="save", stop=stop)
        plan = save_plan(stop=stop)
        if progress is not None:
            progress("phase", {"name": plan[0].name})
        est = await self.sync(hosts)
        self._check_budget(est, force)
        self._report_clocks(report, est)
        t_pause = self._common_instant(est, PAUSE_MARGIN)
        deadline = t_pause + self.deadman
        async with self._keepalive(op, hosts, est):
            await self._save_phases(
                op,
                name,
                stop,
                plan,
                hosts,
                est,
                t_pause,
                deadline,
                report,
                quiet,
                drain_limit,
                progress,
            )
        report.duration_s = self.clock() - started
        return report

    async def _save_phases(
        self,
        op: str,
        name: str,
        stop: bool,
        plan: Sequence[Phase],
        hosts: Mapping[str, HostLink],
        est: dict[str, ClockEstimate],
        t_pause: float,
        deadline: float,
        report: OperationReport,
        quiet: float,
        drain_limit: float,
        progress: Progress | None,
    ) -> None:
        for phase in plan[1:]:
            if phase.call == "pause":
                paused = await self._step(
                    phase, op, hosts, est,
                    lambda h, link: link.pause(
                        op, name, to_host(t_pause, est[h]),
                        [v.name for v in self.group.vms_on(h)], to_host(deadline, est[h]),
                    ),
                    progress,
                )  # fmt: skip
                self._merge(report, paused, est)
            elif phase.call == "save_memory":

                def on_memory(p: SaveProgress) -> None:
                    if progress is not None:
                        progress("memory", {"vm": p.vm, "done": p.done, "total": p.total})

                saved = await self._step(
                    phase, op, hosts, est,
                    lambda _h, link: link.save_memory(op, not stop, on_memory),
                    progress,
                )  # fmt: skip
                self._merge(report, saved, est)
            elif phase.call == "drain":
                drained = await self._step(
                    phase, op, hosts, est,
                    lambda _h, link: link.drain(op, quiet, drain_limit),
                    progress,
                )  # fmt: skip
                self._merge(report, drained, est)
            elif phase.call == "probe":
                if progress is not None:
                    progress("phase", {"name": phase.name})
                try:
                    est.update(await self.sync(hosts))
                except OperationFailed as exc:
                    await self._abort(op, hosts, est)
                    raise OperationFailed(f"{exc}; the operation was rolled back") from exc
            elif phase.call == "resume":
                t_resume = self._resume_instant(est, report)
                resumed = await self._step(
                    phase, op, hosts, est,
                    lambda h, link: link.resume(op, to_host(t_resume, est[h])),
                    progress,
                )  # fmt: skip
                self._merge(report, resumed, est)
            elif phase.call == "commit":
                await self._commit(op, name, hosts, est, progress, phase)
            elif phase.call == "stop":
                if progress is not None:
                    progress("phase", {"name": phase.name})
                await self._all("destroying VMs", lambda _h, link: link.stop(op), hosts)

    async def _commit(
        self,
        op: str,
        name: str,
        hosts: Mapping[str, HostLink],
        est: Mapping[str, ClockEstimate],
        progress: Progress | None,
        phase: Phase,
    ) -> None:
        """Commit everywhere; if some host fails, undo the commits that happened."""
        if progress is not None:
            progress("phase", {"name": phase.name})
        results = await fanout(hosts, lambda _h, link: link.commit(op))
        failed = _failures(results)
        if not failed:
            return
        # Abort everywhere. A save: hosts that committed undo their commit (the
        # state goes, its layers stay under the running VMs); the others drop
        # staging. A restore: hosts that committed keep its VMs running; the
        # others stop them.
        abort_failed = await self._abort(op, hosts, est)
        if op.startswith("restore"):
            tail = _restore_not_committed(name, results, abort_failed)
        else:
            tail = f"state {name!r} was removed from the hosts that had committed it"
        raise OperationFailed(_say_failures("commit", failed) + "; " + tail)

    # -- restore ------------------------------------------------------------------

    async def restore(
        self, name: str, *, force: bool = False, progress: Progress | None = None
    ) -> OperationReport:
        """Restore the whole group to state ``name``; every VM resumes at one instant.

        Raises:
            OperationFailed: the state is missing somewhere (nothing touched), or a
                step failed (the half-restored VMs are stopped; the message says).
        """
        validate_name("state", name)
        started = self.clock()
        hosts = self.vm_hosts
        present = await self._hosts_with_state(name)
        missing = sorted(set(hosts) - set(present))
        if missing:
            raise OperationFailed(
                f"state {name!r} is missing on host {', '.join(missing)}; nothing was changed"
                " (see `lockstep states`)"
            )
        op = self._new_op("restore")
        report = OperationReport(state=name, operation="restore")
        if progress is not None:
            progress("phase", {"name": restore_plan()[0].name})
        est = await self.sync(hosts)
        self._check_budget(est, force)
        async with self._keepalive(op, hosts, est):
            await self._restore_phases(op, name, hosts, est, report, progress)
        report.duration_s = self.clock() - started
        return report

    async def _restore_phases(
        self,
        op: str,
        name: str,
        hosts: Mapping[str, HostLink],
        est: dict[str, ClockEstimate],
        report: OperationReport,
        progress: Progress | None,
    ) -> None:
        for phase in restore_plan()[1:]:
            if phase.call == "prepare_restore":
                deadline = self.clock() + self.deadman
                prepared = await self._step(
                    phase, op, hosts, est,
                    lambda h, link: link.prepare_restore(op, name, to_host(deadline, est[h])),
                    progress,
                )  # fmt: skip
                self._merge(report, prepared, est)
            elif phase.call == "probe":
                if progress is not None:
                    progress("phase", {"name": phase.name})
                try:
                    est.update(await self.sync(hosts))
                except OperationFailed as exc:
                    await self._abort(op, hosts, est)
                    raise OperationFailed(f"{exc}; the half-restored VMs were stopped") from exc
                self._report_clocks(report, est)
            elif phase.call == "resume":
                t_resume = self._resume_instant(est, report)
                resumed = await self._step(
                    phase, op, hosts, est,
                    lambda h, link: link.resume(op, to_host(t_resume, est[h])),
                    progress,
                )  # fmt: skip
                self._merge(report, resumed, est)
            elif phase.call == "commit":
                await self._commit(op, name, hosts, est, progress, phase)

    # -- check ----------------------------------------------------------------------

    async def check(self) -> tuple[dict[str, ClockEstimate], float]:
        """Each host's clock offset and delay, and the skew they predict (s).

        Raises:
            OperationFailed: a host could not be reached.
        """
        est = await self.sync()
        return est, predicted_skew(est)
