"""Faults injected on purpose (``lockstep fault``): one execd's part, and what it holds.

Not the test-only hook that makes the execd itself fail (:mod:`lockstep.execd.fault`):
these are the failures a user injects into the group to watch the cluster
inside react, each on this host's own VMs.

- :class:`~lockstep.execd.model.Kill`: the VM's QEMU gets SIGKILL
  (:meth:`~lockstep.vm.machine.Machine.kill`), as a node that crashed; it shows
  as crashed until a restore or ``lockstep up``. Done at once; nothing is held.
- :class:`~lockstep.execd.model.Freeze`: the VM alone pauses (QMP ``stop``) and
  resumes by itself after the given seconds (``cont``), as a stalled node.
- :class:`~lockstep.execd.model.Partition`: every frame between a VM of one side
  and a VM of the other is dropped, both ways, broadcasts included;
  :class:`~lockstep.execd.model.Loss`: a share of the frames to and from one VM,
  at random. Both are rules in the group's nftables table on this host
  (:mod:`lockstep.net.nft`), made from every network fault the group holds, on
  the taps its VMs have now. For a partition, a frame that leaves by a tap of a
  local VM of one side is dropped when its source MAC is one of the other side's
  (the group file's MACs, so frames that came over VXLAN from another host are
  cut at this end) or when it came in by a tap of a local VM of the other side
  (whatever its MAC).

Every fault held (freeze, partition, loss) is on record until it is healed
(:class:`~lockstep.execd.model.Heal`) or a restore of its group switches over:
its freezes end as the switch-over begins (:meth:`FaultBook.end_freezes`: the
frozen VM is replaced, or resumed with the others if the restore switches
back), its network faults once the new VMs run (:meth:`FaultBook.switched_over`:
they run on other taps, which no rule names). An execd holds none after a
restart: its start resumes paused VMs and removes its groups' tables
(:meth:`FaultBook.remove_tables`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lockstep.errors import LockstepError, VmError
from lockstep.execd.model import (
    FaultAction,
    FaultReply,
    Freeze,
    Heal,
    HeldFault,
    Kill,
    ListFaults,
    Loss,
    Partition,
)
from lockstep.execd.ops import OperationError
from lockstep.execd.vms import HostVm, VmRegistry
from lockstep.group import validate_name
from lockstep.net import nft
from lockstep.proc import which
from lockstep.vm.machine import VmRunstate

__all__ = ["FaultBook", "drops"]

log = logging.getLogger(__name__)

NetFault = Partition | Loss


@dataclass
class _Held:
    """One fault on record: its id, group and what it is; a freeze's timer and end."""

    id: str
    group: str
    fault: Freeze | Partition | Loss
    timer: asyncio.Task[None] | None = None
    until: float = 0.0  # a freeze: time.monotonic() at which its VM resumes
    vm: HostVm | None = None  # a freeze: the VM it paused


def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def drops(
    faults: Iterable[tuple[str, Partition | Loss]], taps: Mapping[str, Sequence[str]]
) -> list[nft.Drop]:
    """The drops that make ``faults`` (id, fault) on a host whose VMs have ``taps``.

    ``taps``: each VM this host runs -> its taps (VMs of other hosts are not
    in it). A loss drops its share of the frames in by, and out by, its VM's
    taps. A partition, for each side with VMs here: frames out by their taps
    from the other side's MACs (wherever those VMs run) and, when VMs of the
    other side run here too, frames that came in by their taps.
    """
    out: list[nft.Drop] = []

    def taps_of(names: Iterable[str]) -> tuple[str, ...]:
        return tuple(t for n in names for t in taps.get(n, ()))

    for fid, f in sorted(faults, key=lambda item: item[0]):
        if isinstance(f, Loss):
            mine = taps_of([f.vm])
            if mine:
                out.append(nft.Drop(f"{fid} loss", in_ports=mine, percent=f.percent))
                out.append(nft.Drop(f"{fid} loss", out_ports=mine, percent=f.percent))
            continue
        for side, other in ((f.a, f.b), (f.b, f.a)):
            mine = taps_of(v.name for v in side)
            if not mine:
                continue
            macs = tuple(m for v in other for m in v.macs)
            out.append(nft.Drop(f"{fid} partition", out_ports=mine, macs=macs))
            theirs = taps_of(v.name for v in other)
            if theirs:
                out.append(nft.Drop(f"{fid} partition", out_ports=mine, in_ports=theirs))
    return out


class FaultBook:
    """The faults one execd injected and holds, by id; see the module's docstring."""

    def __init__(self, host: str, vms: VmRegistry, *, netns: str | None = None) -> None:
        self.host = host
        self.vms = vms
        self.netns = netns
        self._held: dict[str, _Held] = {}
        self._applied: dict[str, list[nft.Drop]] = {}  # each group's table as last set here
        self._lock = asyncio.Lock()

    # -- what is held ------------------------------------------------------------

    def _local(self, group: str, name: str) -> HostVm | None:
        vm = self.vms.get(name)
        return vm if vm is not None and vm.runtime.group == group else None

    def _vm(self, group: str, name: str) -> HostVm:
        vm = self._local(group, name)
        if vm is None:
            raise VmError(f"host {self.host} runs no VM {name} of group {group}")
        return vm

    def frozen(self) -> dict[str, str]:
        """The VMs a freeze holds paused now: VM name -> the fault's id.

        A freeze whose VM was stopped or replaced meanwhile holds nothing (its
        timer lets it go).
        """
        out = {}
        for h in self._held.values():
            if isinstance(h.fault, Freeze) and self.vms.get(h.fault.vm) is h.vm:
                out[h.fault.vm] = h.id
        return out

    def held(self, group: str) -> list[HeldFault]:
        """The faults of ``group`` this host holds, as they act here now."""
        out = []
        for h in sorted(self._held.values(), key=lambda h: h.id):
            if h.group != group:
                continue
            f = h.fault
            if isinstance(f, Freeze):
                if h.id not in self.frozen().values():
                    continue
                left = max(0.0, h.until - time.monotonic())
                what = f"{f.vm} paused; it resumes by itself in {left:.1f} s"
                out.append(HeldFault(h.id, "freeze", [f.vm], what, seconds_left=left))
            elif isinstance(f, Partition):
                sides = [{v.name for v in f.a}, {v.name for v in f.b}]
                here = sorted(n for n in sides[0] | sides[1] if self._local(group, n))
                what = f"frames between {_names(sides[0])} and {_names(sides[1])} dropped"
                out.append(HeldFault(h.id, "partition", here, what))
            else:
                here = [f.vm] if self._local(group, f.vm) else []
                what = f"{f.percent} % of the frames to and from {f.vm} dropped at random"
                out.append(HeldFault(h.id, "loss", here, what))
        return out

    def _drops(self, group: str, leave_out: Iterable[str] = ()) -> list[nft.Drop]:
        """The drops of ``group``'s network faults (but ``leave_out``) on its VMs' taps now."""
        skip = set(leave_out)
        held = [
            (h.id, h.fault)
            for h in self._held.values()
            if h.group == group and h.id not in skip and not isinstance(h.fault, Freeze)
        ]
        taps = {n: vm.runtime.taps for n, vm in self.vms.vms.items() if vm.runtime.group == group}
        return drops(held, taps)

    async def _apply(self, group: str, wanted: list[nft.Drop]) -> None:
        """Make ``group``'s table hold ``wanted``; nft runs only when that changes something.

        Raises:
            NetError: nft is missing or refused the rules (they stay as they were).
        """
        if wanted == self._applied.get(group, []):
            return
        taps = {t for vm in self.vms.vms.values() for t in vm.runtime.taps}
        await nft.apply(group, wanted, ports=taps, netns=self.netns)
        self._applied[group] = wanted

    def _has_net(self, group: str) -> bool:
        return any(
            h.group == group and not isinstance(h.fault, Freeze) for h in self._held.values()
        )

    # -- acting ----------------------------------------------------------------------

    async def act(self, group: str, fault_id: str, action: FaultAction) -> FaultReply:
        """Inject ``action`` as fault ``fault_id`` of ``group``, heal, or only list.

        Raises:
            InvalidName: the group or fault id is not a valid name.
            OperationError: a fault ``fault_id`` is held already, or the VM
                loses frames already.
            VmError: the VM is not this host's, is not running (kill, freeze),
                or QEMU failed the stop.
            NetError: nft is missing or refused the rules (nothing changed).
        """
        validate_name("group", group)
        async with self._lock:
            if isinstance(action, ListFaults):
                did: list[str] = []
            elif isinstance(action, Heal):
                did = await self._heal(group, action.ids)
            else:
                validate_name("fault", fault_id)
                if fault_id in self._held:
                    raise OperationError(f"host {self.host} holds a fault {fault_id} already")
                if isinstance(action, Kill):
                    did = [await self._kill(group, action)]
                elif isinstance(action, Freeze):
                    did = [await self._freeze(group, fault_id, action)]
                else:
                    did = [await self._net(group, fault_id, action)]
        return FaultReply(did=did, held=self.held(group))

    async def _kill(self, group: str, kill: Kill) -> str:
        vm = self._vm(group, kill.vm)
        if not vm.machine.alive():
            raise VmError(f"VM {kill.vm} on host {self.host} is not running: nothing to kill")
        pid = vm.machine.pid
        self._end_freezes(group, {kill.vm})  # a frozen VM killed is no longer frozen
        await vm.machine.kill()
        return (
            f"killed {kill.vm}'s QEMU (pid {pid}): it shows as crashed until a restore"
            " or `lockstep up`"
        )

    async def _freeze(self, group: str, fault_id: str, freeze: Freeze) -> str:
        vm = self._vm(group, freeze.vm)
        if not vm.machine.alive() or vm.machine.runstate is not VmRunstate.RUNNING:
            now = vm.machine.runstate.value if vm.machine.alive() else "crashed"
            by = self.frozen().get(freeze.vm)
            why = f" (frozen by fault {by})" if by else ""
            raise VmError(
                f"VM {freeze.vm} on host {self.host} is {now}{why}; only a running VM can be frozen"
            )
        await vm.machine.pause()
        held = _Held(fault_id, group, freeze, until=time.monotonic() + freeze.seconds, vm=vm)
        held.timer = asyncio.create_task(self._thaw_later(held, vm))
        self._held[fault_id] = held
        return f"paused {freeze.vm}; it resumes by itself in {freeze.seconds:g} s"

    async def _thaw_later(self, held: _Held, vm: HostVm) -> None:
        """At the freeze's end, resume its VM (if it is still the one the freeze paused)."""
        await asyncio.sleep(max(0.0, held.until - time.monotonic()))
        async with self._lock:
            if self._held.get(held.id) is not held:
                return
            del self._held[held.id]
            log.info("fault %s: %s", held.id, await self._thaw(vm))

    async def _thaw(self, vm: HostVm) -> str:
        if self.vms.get(vm.name) is not vm or vm.machine.runstate is not VmRunstate.PAUSED:
            return f"{vm.name} was not resumed: it is no longer the VM the freeze paused"
        try:
            await vm.machine.resume()
        except VmError as exc:
            return f"{vm.name} could not be resumed: {exc}"
        return f"resumed {vm.name}"

    async def _net(self, group: str, fault_id: str, fault: NetFault) -> str:
        if isinstance(fault, Loss):
            self._vm(group, fault.vm)
            for h in self._held.values():
                if h.group == group and isinstance(h.fault, Loss) and h.fault.vm == fault.vm:
                    raise OperationError(
                        f"VM {fault.vm} loses {h.fault.percent} % of its frames already"
                        f" (fault {h.id}); heal that first"
                    )
        held = _Held(fault_id, group, fault)
        self._held[fault_id] = held
        try:
            await self._apply(group, self._drops(group))
        except BaseException:
            del self._held[fault_id]
            raise
        if isinstance(fault, Loss):
            return f"dropping {fault.percent} % of the frames to and from {fault.vm} at random"
        here = [
            (sorted(v.name for v in side if self._local(group, v.name)), other)
            for side, other in ((fault.a, fault.b), (fault.b, fault.a))
        ]
        cuts = [
            f"to {', '.join(mine)} from {_names(v.name for v in other)}"
            for mine, other in here
            if mine
        ]
        if not cuts:
            return "no VM of either side runs here now; the cut applies to them once they do"
        return "dropping frames " + " and ".join(cuts)

    async def _heal(self, group: str, ids: Iterable[str]) -> list[str]:
        wanted = set(ids)
        mine = [h for h in self._held.values() if h.group == group]
        chosen = [h for h in mine if not wanted or h.id in wanted]
        did = [
            f"holds no fault {i} of group {group}" for i in sorted(wanted - {h.id for h in mine})
        ]
        net = [h.id for h in chosen if not isinstance(h.fault, Freeze)]
        if net:  # first, so that a refusal by nft leaves every record as it was
            await self._apply(group, self._drops(group, leave_out=net))
        for h in sorted(chosen, key=lambda h: h.id):
            del self._held[h.id]
            if isinstance(h.fault, Freeze):
                if h.timer is not None:
                    h.timer.cancel()
                vm = self._local(group, h.fault.vm)
                thawed = await self._thaw(vm) if vm else f"{h.fault.vm} runs here no more"
                did.append(f"{h.id}: {thawed}")
            else:
                did.append(f"{h.id}: its rules are removed")
        return did or [f"holds no fault of group {group}"]

    # -- restores, VMs started, the execd's own life -------------------------------------

    def _end_freezes(self, group: str, vms: Iterable[str] | None = None) -> None:
        names = None if vms is None else set(vms)
        for h in list(self._held.values()):
            f = h.fault
            if h.group == group and isinstance(f, Freeze) and (names is None or f.vm in names):
                if h.timer is not None:
                    h.timer.cancel()
                del self._held[h.id]

    def end_freezes(self, group: str) -> None:
        """A restore of ``group`` switches over: its frozen VMs stay paused, to be replaced.

        Their timers are cancelled; a restore that switches back resumes them
        with the other VMs it put back.
        """
        self._end_freezes(group)

    async def switched_over(self, group: str) -> None:
        """A restore of ``group`` switched over: its network faults go (never raises).

        The new VMs run on other taps than the ones the rules name, so this
        waits until they run, off the switch-over's timing. If nft fails, the
        faults stay on record (heal can try again) and the failure is logged.
        """
        if not self._has_net(group):
            return
        async with self._lock:
            try:
                await self._apply(group, [])
            except LockstepError as exc:
                log.warning("the restore of group %s could not heal its faults: %s", group, exc)
                return
            for h in [h for h in self._held.values() if h.group == group]:
                del self._held[h.id]

    async def refresh(self, group: str) -> None:
        """VMs of ``group`` started: its network faults' rules follow them (never raises).

        A VM started afresh may run on the other set of tap names than the one
        the rules were made for (after a restore). If nft fails, the failure
        is logged and the faults stay on record.
        """
        if not self._has_net(group):
            return
        async with self._lock:
            try:
                await self._apply(group, self._drops(group))
            except LockstepError as exc:
                log.warning("group %s's fault rules could not follow its VMs: %s", group, exc)

    async def remove_tables(self, groups: Iterable[str]) -> None:
        """At start: remove the fault tables a previous execd left for ``groups`` (never raises)."""
        if which("nft") is None:
            return
        for group in sorted(set(groups)):
            try:
                await nft.apply(group, [], netns=self.netns)
            except LockstepError as exc:
                log.warning("could not remove the fault rules of group %s: %s", group, exc)
            else:
                self._applied[group] = []

    def close(self) -> None:
        """Cancel the freezes' timers; the VMs stay paused (a restarted execd resumes them)."""
        for h in self._held.values():
            if h.timer is not None:
                h.timer.cancel()
        self._held.clear()
