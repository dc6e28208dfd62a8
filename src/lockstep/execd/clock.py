"""The execd's clock, and acting at an absolute instant on it.

The execd's clock is the host's wall clock plus ``--clock-offset`` (tests make
it wrong on purpose; the caller's sync must compensate). Waiting is done on the
monotonic clock: sleep until shortly before the instant, then spin.

On a busy host (think many TCG vCPUs on few cores) a spinning execd and a
QEMU that has to act on ``stop``/``cont`` still queue behind vCPU threads for
milliseconds. So for the few milliseconds around the instant, the execd's
thread and the QEMU threads that carry the command (main loop and monitor I/O)
run SCHED_FIFO, then go back to what they were. Nothing stays real-time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator

__all__ = ["SPIN_SECONDS", "ExecdClock", "background", "realtime"]

SPIN_SECONDS = 0.003
# SCHED_FIFO levels around an instant: the execd's own thread must never queue
# behind what it drives; QEMU's command path beats vCPUs that have to stop.
PRIO_EXECD = 3
PRIO_QEMU = 2
PRIO_VCPU = 1

log = logging.getLogger(__name__)
_warned = False


@contextlib.contextmanager
def realtime(tids: Iterable[int], priority: int) -> Iterator[None]:
    """Run threads ``tids`` (0: the calling thread) SCHED_FIFO, then restore them.

    Threads that are gone, or a kernel that refuses (no CAP_SYS_NICE), are
    skipped with one warning: precision degrades, correctness does not.
    """
    global _warned
    saved: list[tuple[int, int, os.sched_param]] = []
    for tid in tids:
        try:
            saved.append((tid, os.sched_getscheduler(tid), os.sched_getparam(tid)))
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(priority))
        except ProcessLookupError:
            continue
        except PermissionError:
            if not _warned:
                log.warning("cannot use real-time priority here; skews may grow under load")
                _warned = True
    try:
        yield
    finally:
        for tid, policy, param in reversed(saved):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.sched_setscheduler(tid, policy, param)


BACKGROUND_NICE = 19


@contextlib.contextmanager
def background() -> Iterator[None]:
    """Run the calling thread at the lowest CPU priority (nice 19), then restore it.

    For work done while VMs run (hashing and syncing a state at commit): the
    guests' vCPUs must not wait behind it, or their heartbeats would be late.
    On Linux the nice value of a thread id affects that thread only.
    """
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICE)
    try:
        yield
    finally:
        with contextlib.suppress(PermissionError):  # raising it back needs CAP_SYS_NICE
            os.setpriority(os.PRIO_PROCESS, tid, before)


class ExecdClock:
    """Wall clock plus a fixed offset; converts its instants to monotonic time."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def now(self) -> float:
        """Seconds on this execd's clock."""
        return time.time() + self.offset

    def from_wall(self, wall: float) -> float:
        """A host wall-clock instant (as QEMU stamps its events) on this clock."""
        return wall + self.offset

    @contextlib.asynccontextmanager
    async def at_instant(
        self, at: float, qemu: Iterable[int] = (), vcpus: Iterable[int] = ()
    ) -> AsyncIterator[float]:
        """Enter at instant ``at`` with this thread, ``qemu`` and ``vcpus`` threads real-time.

        Yields how late the instant was met (s); the body is the action (it
        should be short: pause or resume). Priorities are restored on exit.
        """
        target = time.monotonic() + (at - self.now())
        coarse = target - time.monotonic() - SPIN_SECONDS
        if coarse > 0:
            await asyncio.sleep(coarse)
        with (
            realtime([0], PRIO_EXECD),
            realtime(qemu, PRIO_QEMU),
            realtime(vcpus, PRIO_VCPU),
        ):
            while time.monotonic() < target:
                pass
            yield max(0.0, time.monotonic() - target)
