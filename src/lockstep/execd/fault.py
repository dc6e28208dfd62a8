"""A fault hook for the fault-injection tests: make an execd die or stall at a named step.

Set ``LOCKSTEP_FAULT=POINT[:ACTION]`` in an execd's environment (tests only):
at ``POINT`` the execd ``exit``s at once (as if killed; the default),
``hang``s (as a stalled host), ``slow``s down (at ``probe``: a noisy, asymmetric
path), or ``kill-qemu``s the operation's first VM (a QEMU crash).
Unset, it costs one comparison per point.

Points: ``pause:before``, ``pause:after``, ``save_memory:before``,
``save_memory:after``, ``drain:after``, ``resume:before``, ``resume:after``,
``commit:before``, ``prepare_restore:before``, ``prepare_restore:load`` (a new VM's
QEMU is about to load its memory; ``kill-qemu`` kills that new VM), ``prepare_restore:after``,
``probe``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["POINTS", "Fault"]

log = logging.getLogger(__name__)

POINTS = frozenset(
    {
        "pause:before",
        "pause:after",
        "save_memory:before",
        "save_memory:after",
        "drain:after",
        "resume:before",
        "resume:after",
        "commit:before",
        "prepare_restore:before",
        "prepare_restore:load",
        "prepare_restore:after",
        "probe",
    }
)
_ACTIONS = frozenset({"exit", "hang", "slow", "kill-qemu"})


@dataclass(frozen=True)
class Fault:
    """Where (``point``) and how (``action``) to fail; ``point`` None: never."""

    point: str | None = None
    action: str = "exit"

    @classmethod
    def from_env(cls) -> Fault:
        """Read ``$LOCKSTEP_FAULT``; an unknown point or action is ignored with a warning."""
        spec = os.environ.get("LOCKSTEP_FAULT", "")
        if not spec:
            return cls()
        point, action = spec, "exit"
        head, _, tail = spec.rpartition(":")
        if tail in _ACTIONS:
            point, action = head, tail
        if point not in POINTS or action not in _ACTIONS:
            log.warning("ignoring LOCKSTEP_FAULT=%s (unknown point or action)", spec)
            return cls()
        log.warning("fault injection armed: %s at %s", action, point)
        return cls(point, action)

    def slow_probe(self) -> None:
        """At ``probe`` with ``slow``: delay the probe outside the execd's two stamps (blocking).

        The gRPC path calls it before stamping receipt, the UDP path (whose
        receipt the kernel stamps) after stamping the reply and before sending
        it, so clock sync sees it as network delay, as a congested path would look.
        """
        if self.point == "probe" and self.action == "slow":
            time.sleep(random.uniform(0.005, 0.03))  # noqa: S311 (test jitter)

    async def at(self, point: str, kill_vm: Callable[[], None] | None = None) -> None:
        """Fail here if armed for ``point`` (``kill_vm`` kills the operation's first VM)."""
        if point != self.point:
            return
        if self.action == "kill-qemu":
            log.warning("fault injection: killing a VM's QEMU at %s", point)
            if kill_vm is not None:
                kill_vm()
            return
        if self.action == "exit":
            log.warning("fault injection: exiting at %s", point)
            os._exit(70)
        elif self.action == "hang":
            log.warning("fault injection: hanging at %s", point)
            await asyncio.sleep(3600)
