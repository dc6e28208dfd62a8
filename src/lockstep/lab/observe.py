"""The middleware's view of a running lab, before and after an operation (demo, benches, tests).

A demo or a bench brings a middleware lab up with
``bring_up(LabOptions(..., cluster=ClusterSpec("pacemaker", token_ms=1000)))``
(:func:`lockstep.lab.lab.bring_up`), then wraps each operation (a save, a
restore, a killed VM) in :func:`around`: it takes a :class:`Snapshot` before
(every console log's length, and what crm_mon or the addresses say in every
guest), runs the operation, waits, takes one after, and reads what the
guests logged in between (:func:`lockstep.lab.verify.verify_lab` from the
marks), with the view after it attached::

    seen = await around(lab, lambda: caller.save("start"), settle_s=10)
    seen.report.middleware.count("token_losses"), seen.after.placement()

``lab verify`` asks the same view (:func:`verify_with_view`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lockstep.errors import LabError
from lockstep.lab.cluster import read_view
from lockstep.lab.guestctl import GuestControl
from lockstep.lab.lab import lab_cluster, lab_data_dir, vm_paths
from lockstep.lab.ledger import ProcessEntry
from lockstep.lab.verify import EVERYTHING, Since, VerifyReport, lab_vms, log_marks, verify_lab
from lockstep.vm.argv import VmPaths

__all__ = [
    "Observed",
    "Snapshot",
    "around",
    "cluster_view",
    "placement",
    "snapshot",
    "verify_with_view",
]

T = TypeVar("T")


async def cluster_view(name: str) -> dict[str, Any]:
    """What lab ``name``'s middleware says now, asked in every guest (see cluster.read_view).

    Raises:
        LabError: there is no such lab.
    """
    plan = lab_cluster(name)
    data = lab_data_dir(name)
    running = [vm for vm in lab_vms(data) if _qemu_runs(vm_paths(data, vm.host, vm.name))]
    shells = {vm.name: GuestControl(vm_paths(data, vm.host, vm.name).channel) for vm in running}
    try:
        return await read_view(plan, shells)
    finally:
        for shell in shells.values():
            await shell.close()


def _qemu_runs(paths: VmPaths) -> bool:
    """Whether the guest's QEMU runs (a killed one leaves its channel's socket, refusing).

    A killed QEMU stays a zombie until its execd reaps it: that is not running.
    """
    try:
        return ProcessEntry.of(int(paths.pidfile.read_text().strip()), "QEMU").alive()
    except (OSError, ValueError, LabError):
        return False


def placement(view: dict[str, Any]) -> dict[str, list[str]]:
    """Where things run in a view: each Pacemaker resource, or each VRRP address, -> its VMs.

    Pacemaker: as the first node that answered with a view says it (every
    node's own view stays in ``view["nodes"]``).
    """
    if view.get("kind") == "keepalived":
        return {name: list(v["holders"]) for name, v in view.get("vips", {}).items()}
    for node_view in view.get("nodes", {}).values():
        if "resources" in node_view:
            return {r: list(v["on"]) for r, v in node_view["resources"].items()}
    return {}


@dataclass(frozen=True)
class Snapshot:
    """A lab at one instant: its console logs' lengths and its middleware's view."""

    at: float  # host wall clock
    marks: dict[str, int]
    view: dict[str, Any]

    def placement(self) -> dict[str, list[str]]:
        """See :func:`placement`."""
        return placement(self.view)


async def snapshot(name: str) -> Snapshot:
    """Lab ``name`` now.

    Raises:
        LabError: there is no such lab.
    """
    at, marks = time.time(), log_marks(name)
    return Snapshot(at, marks, await cluster_view(name))


@dataclass(frozen=True)
class Observed(Generic[T]):
    """An operation, the lab before and after it, and what the guests logged in between."""

    before: Snapshot
    result: T
    after: Snapshot
    report: VerifyReport


async def around(
    name: str, operation: Callable[[], Awaitable[T]], settle_s: float = 5.0
) -> Observed[T]:
    """Run ``operation`` on lab ``name``; the middleware's view before and after, and its log.

    ``settle_s``: how long to wait after the operation before looking (a
    token loss or a failover takes the middleware's own timeouts to show).

    Raises:
        LabError: there is no such lab.
        Exception: whatever ``operation`` raises.
    """
    before = await snapshot(name)
    result = await operation()
    await asyncio.sleep(settle_s)
    after = await snapshot(name)
    report = verify_lab(name, EVERYTHING, before.marks)
    report.view = after.view
    return Observed(before, result, after, report)


async def verify_with_view(
    name: str, since: Since = EVERYTHING, marks: dict[str, int] | None = None
) -> VerifyReport:
    """``lab verify``: what the guests logged (verify_lab), with the middleware's view now.

    Raises:
        LabError: as verify_lab.
    """
    report = verify_lab(name, since, marks)
    if report.cluster != "agent":
        report.view = await cluster_view(name)
    return report
