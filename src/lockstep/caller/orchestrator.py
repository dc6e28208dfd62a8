"""The caller: runs the group's operations over one link per host; commits or undoes.

It holds no VM logic. Each call goes to all hosts at once and comes back as one
result per host (Ganeti style, :mod:`lockstep.caller.links`). A save or restore
is an :class:`~lockstep.caller.operation.Operation` walked through its plan
(:mod:`lockstep.caller.plan`) by the runner (:mod:`lockstep.caller.runner`),
which decides to go on or to run the failed phase's undo.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from lockstep.caller import faults
from lockstep.caller.clock import ClockEstimate, SyncPolicy, predicted_skew
from lockstep.caller.links import HostLink, HostResult, HostsFailed, everywhere, fanout
from lockstep.caller.operation import Operation, Options, Progress
from lockstep.caller.plan import restore_plan, save_plan
from lockstep.caller.report import OperationReport
from lockstep.caller.runner import run
from lockstep.caller.sync import measure
from lockstep.errors import OperationFailed
from lockstep.execd.model import FaultAction, FaultReply, StateInfo, VmStatus
from lockstep.group import GroupSpec, validate_name

__all__ = ["GroupCaller", "HostLink", "HostResult", "Progress", "fanout"]

T = TypeVar("T")

# Dead-man's timer: paused VMs resume by themselves (at one instant on every
# host) this long after the caller last extended the operation.
DEADMAN_SECONDS = 30.0
# Refuse to start when clock error alone could cause more skew than this.
SKEW_BUDGET = 0.002


class GroupCaller:
    """Runs group operations over one :class:`HostLink` per host of the group.

    :attr:`last_operation` is the save or restore last started: its runstate
    and history say how it went.
    """

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
        self.last_operation: Operation | None = None

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
        return await self._all(
            "clock sync",
            lambda _h, link: measure(link, self.sync_policy, self.clock),
            hosts or self.links,
        )

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
        try:
            return await everywhere(hosts if hosts is not None else self.links, call)
        except HostsFailed as exc:
            raise OperationFailed(exc.say(what)) from exc.cause

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
        return await self.links[self.group.vm(vm).host].state_frames(name, vm)

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

    # -- save and restore ---------------------------------------------------------

    def _operation(
        self, kind: str, name: str, options: Options, progress: Progress | None
    ) -> Operation:
        """A new save or restore of state ``name`` over the hosts that run the group's VMs."""
        hosts = self.vm_hosts
        self.last_operation = Operation(
            kind,
            name,
            hosts,
            {h: [v.name for v in self.group.vms_on(h)] for h in hosts},
            clock=self.clock,
            sync_policy=self.sync_policy,
            deadman=self.deadman,
            skew_budget=self.skew_budget,
            options=options,
            progress=progress,
        )
        return self.last_operation

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
        await self._refuse_existing(name)
        options = Options(stop=stop, quiet=quiet, drain_limit=drain_limit, force=force)
        op = self._operation("save", name, options, progress)
        await run(op, save_plan(stop=stop))
        op.report.duration_s = self.clock() - started
        return op.report

    async def restore(
        self,
        name: str,
        *,
        force: bool = False,
        verify: bool = False,
        progress: Progress | None = None,
    ) -> OperationReport:
        """Restore the whole group to state ``name``: new VMs, switched to at one instant.

        Every file of the state is checked first on every host (``verify``:
        the guests' RAM hashed too). The new VMs are prepared beside the
        running ones; only when every host is ready do the old VMs pause and
        the new ones resume, at a common instant (with libvirt domains, at two:
        every host swaps its domains in between). Then each guest's wall clock
        is set to true time, unless the group file says ``guest_time = "saved"``
        for it.

        Raises:
            OperationFailed: the state is missing or damaged somewhere (nothing
                touched), or a step failed (the restore was undone and the group
                runs on as it was; the message says).
            ClockError: clock sync predicts more skew than the budget (unless ``force``).
        """
        validate_name("state", name)
        started = self.clock()
        present = await self._hosts_with_state(name)
        missing = sorted(set(self.vm_hosts) - set(present))
        if missing:
            raise OperationFailed(
                f"state {name!r} is missing on host {', '.join(missing)}; nothing was changed"
                " (see `lockstep states`)"
            )
        set_time = frozenset(n for n, vm in self.group.vms.items() if vm.guest_time == "true")
        options = Options(force=force, verify=verify, set_guest_time=set_time)
        op = self._operation("restore", name, options, progress)
        # A libvirt domain cannot exist twice: it is swapped while the group is paused.
        swap_paused = any(vm.driver == "libvirt" for vm in self.group.vms.values())
        await run(op, restore_plan(swap_paused=swap_paused))
        op.report.duration_s = self.clock() - started
        return op.report

    # -- faults ---------------------------------------------------------------------

    async def fault(self, action: FaultAction) -> tuple[str, dict[str, HostResult[FaultReply]]]:
        """Inject ``action`` on every host concerned (:mod:`lockstep.caller.faults`).

        Returns the new fault's id ("" for heal and list) and one result per
        host; heal and list report a host's failure in its result.

        Raises:
            ConfigError: a VM named is not one of the group's.
            OperationFailed: a new fault failed on some host (healed where it took).
        """
        return await faults.inject(self.group, self.links, action)

    # -- check ----------------------------------------------------------------------

    async def check(self) -> tuple[dict[str, ClockEstimate], float]:
        """Each host's clock offset and delay, and the skew they predict (s).

        Raises:
            OperationFailed: a host could not be reached.
        """
        est = await self.sync()
        return est, predicted_skew(est)
