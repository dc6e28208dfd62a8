"""Faults during save and restore, on the real lab: nothing stuck, nothing half-saved.

Every case ends the same way: the VMs run as before (a failed restore never
touches the running group), no partial state is listed,
no staging directory is left, and the error is one sentence naming the step
and the host. Faults are injected for real: execds and callers are killed
(SIGKILL / os._exit) at named steps through the execd's test fault hook
(``LOCKSTEP_FAULT``), QEMU is killed, a host is stopped with SIGSTOP, and a
small tmpfs fills up.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lockstep.caller.connect import clients_for
from lockstep.caller.orchestrator import GroupCaller
from lockstep.errors import ClockError, OperationFailed
from lockstep.lab.lab import execd_pid, restart_execd, wait_execds, wait_guests
from lockstep.rpc import Timeout
from tests.integration.conftest import Lab

DEADMAN = 4.0
# This 2-core machine runs TCG guests and maybe other tests: clock delays of a
# few ms are normal here. The budget refusal has its own test below.
BUDGET = 0.05
TIMEOUTS = {Timeout.FAST: 3.0, Timeout.NORMAL: 20.0, Timeout.SLOW: 40.0}
# Where a test stalls a host on purpose, the call it stalls times out: sooner,
# still several times what the other host takes (its VMs' memory: under 1 s).
STALLED = {Timeout.FAST: 3.0, Timeout.NORMAL: 6.0, Timeout.SLOW: 12.0}


def _caller(
    lab: Lab, budget: float = BUDGET, timeouts: dict[Timeout, float] = TIMEOUTS
) -> GroupCaller:
    return GroupCaller(
        lab.group, clients_for(lab.group, timeouts), deadman=DEADMAN, skew_budget=budget
    )


async def _close(caller: GroupCaller) -> None:
    for link in caller.links.values():
        await link.close()  # type: ignore[attr-defined]


def _kill_execd(lab: Lab, host: str) -> None:
    pid = execd_pid(lab.name, host)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while execd_pid(lab.name, host) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


@contextmanager
def armed(lab: Lab, host: str, fault: str) -> Iterator[None]:
    """Run ``host``'s execd with ``LOCKSTEP_FAULT=fault``; a clean one again afterwards."""
    _kill_execd(lab, host)
    restart_execd(lab.name, host, env={"LOCKSTEP_FAULT": fault})
    asyncio.run(wait_execds(lab.group))
    try:
        yield
    finally:
        _kill_execd(lab, host)
        restart_execd(lab.name, host)
        asyncio.run(wait_execds(lab.group))


async def _vms(caller: GroupCaller) -> dict[str, str]:
    results = await caller.status()
    return {s.name: s.runstate for r in results.values() for s in (r.value or [])}


async def _settle(lab: Lab, *, allow_stopped: bool = False) -> dict[str, str]:
    """Wait (dead-man included) until no VM is paused; return name -> runstate."""
    caller = _caller(lab)
    try:
        deadline = time.monotonic() + DEADMAN + 15
        while True:
            try:
                vms: dict[str, str] | None = await _vms(caller)
            except OperationFailed:
                vms = None
            running = vms is not None and all(s == "running" for s in vms.values())
            if (
                vms is not None
                and running
                and (allow_stopped or sorted(vms) == sorted(lab.group.vms))
            ):
                return vms
            if time.monotonic() > deadline:
                raise AssertionError(f"VMs did not settle running: {vms}")
            await asyncio.sleep(0.5)
    finally:
        await _close(caller)


def _no_partial_state(lab: Lab, name: str) -> None:
    """No staging is left (waiting out the dead-man deadline), and no state ``name``."""
    deadline = time.monotonic() + DEADMAN + 5
    while (staging := list(lab.data.glob("hosts/*/root/staging/*"))) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert not staging, f"staging left behind: {staging}"
    states = list(lab.data.glob(f"hosts/*/root/states/{name}"))
    assert not states, f"partial state {name!r} is listed: {states}"


async def _recover(lab: Lab) -> None:
    """Bring every VM of the group up again (after a case that stopped some)."""
    caller = _caller(lab)
    try:
        await caller.up()
    finally:
        await _close(caller)
    await wait_guests(lab.group, lab.data)


async def _save(
    lab: Lab,
    name: str,
    budget: float = BUDGET,
    timeouts: dict[Timeout, float] = TIMEOUTS,
    **kw: object,
) -> None:
    caller = _caller(lab, budget, timeouts)
    try:
        await caller.save(name, **kw)  # type: ignore[arg-type]
    finally:
        await _close(caller)


async def _restore(lab: Lab, name: str) -> None:
    caller = _caller(lab)
    try:
        await caller.restore(name)
    finally:
        await _close(caller)


@pytest.mark.parametrize(
    "point", ["pause:after", "save_memory:after", "drain:after", "resume:before", "commit:before"]
)
def test_execd_killed_during_save(fresh: Lab, point: str) -> None:
    """An execd dying at any step of a save is cleaned up after.

    The error is one sentence naming h2; the VMs run again (the restarted execd
    resumes its paused VMs at the dead-man deadline); no state is left.
    """
    name = f"f-save-{point.replace(':', '-')}"
    with armed(fresh, "h2", point), pytest.raises(OperationFailed, match="host h2") as info:
        asyncio.run(_save(fresh, name))
    assert "\n" not in str(info.value)
    asyncio.run(_settle(fresh))
    _no_partial_state(fresh, name)


def _restore_ended(lab: Lab) -> None:
    """Wait (dead-man included) until no host holds a restore's new VMs any more."""
    deadline = time.monotonic() + DEADMAN + 15
    while list(lab.data.glob("hosts/*/root/restoring/*/*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(lab.data.glob("hosts/*/root/restoring/*/*")) == []


async def _pids(lab: Lab) -> dict[str, int | None]:
    caller = _caller(lab)
    try:
        results = await caller.status()
    finally:
        await _close(caller)
    return {s.name: s.pid for r in results.values() for s in (r.value or [])}


def _mark(lab: Lab, text: str) -> None:
    """Write ``text`` into every guest's memory (a tmpfs file)."""
    for vm in lab.group.vms:
        asyncio.run(lab.sh(vm, f"echo {text} > /run/lockstep-mark"))


def _marks(lab: Lab) -> dict[str, str]:
    """What every guest's memory holds (see :func:`_mark`)."""
    return {vm: asyncio.run(lab.sh(vm, "cat /run/lockstep-mark")).strip() for vm in lab.group.vms}


@pytest.mark.parametrize(
    "point",
    ["prepare_restore:before", "prepare_restore:after", "resume:before", "resume:after"],
)
def test_execd_killed_during_restore(any_driver: Lab, point: str) -> None:
    """An execd dying during a restore leaves the group running as it was; restore works again.

    On either driver. Before the switch-over nothing that runs was touched:
    the VMs prepared are discarded (h2's by its restarted execd). At the
    switch-over (h2 dies just after switching) the hosts that switched
    switch back, h2's at its deadline. Either way the guests run on with
    what they held before the restore (a mark written after the save), with
    a message saying so; with the QEMU driver the very same QEMU processes
    (a libvirt domain set aside at its switch-over comes back as the same
    domain in a new QEMU).
    """
    fresh = any_driver
    base = f"f-base-{secrets.token_hex(3)}"
    asyncio.run(_save(fresh, base))
    _mark(fresh, "after-the-save")
    before = asyncio.run(_pids(fresh))
    with armed(fresh, "h2", point), pytest.raises(OperationFailed, match="host h2") as info:
        asyncio.run(_restore(fresh, base))
    assert "runs on as it was" in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    _restore_ended(fresh)
    assert sorted(asyncio.run(_settle(fresh))) == sorted(fresh.group.vms)
    assert _marks(fresh) == dict.fromkeys(fresh.group.vms, "after-the-save")
    qemu = fresh.group.vms["p1"].driver == "qemu"
    if qemu or point.startswith("prepare"):
        assert asyncio.run(_pids(fresh)) == before
    _no_partial_state(fresh, "none")
    asyncio.run(_restore(fresh, base))
    assert sorted(asyncio.run(_settle(fresh))) == sorted(fresh.group.vms)


_CALLER_SCRIPT = """
import asyncio, os, sys
from lockstep.caller.orchestrator import GroupCaller
from lockstep.group import load_group
from lockstep.lab.lab import clients_for
group = load_group(__import__("pathlib").Path(sys.argv[1]))
kill_at, op, name = sys.argv[2], sys.argv[3], sys.argv[4]
phase, _, nth = kill_at.partition("#")
seen = []
def progress(event, details):
    if event == "phase" and details["name"] == phase:
        seen.append(phase)
        if len(seen) == int(nth or 1):
            os._exit(9)
async def main():
    caller = GroupCaller(group, clients_for(group), deadman=float(sys.argv[5]), skew_budget=0.05)
    if op == "save":
        await caller.save(name, progress=progress)
    else:
        await caller.restore(name, progress=progress)
asyncio.run(main())
"""


def _run_caller_until(lab: Lab, op: str, name: str, kill_at: str) -> None:
    """Run a caller in its own process and kill it (os._exit) at phase ``kill_at``."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CALLER_SCRIPT,
            str(lab.group_file),
            kill_at,
            op,
            name,
            str(DEADMAN),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 9, f"caller exited {proc.returncode}: {proc.stderr.decode()[-2000:]}"


@pytest.mark.parametrize(
    "kill_at",
    [
        "save memory and freeze disk layers",  # after every VM paused
        "drain and save held frames",  # after memory was written
        "resume and deliver frames",  # after draining, before the resume
        "commit",  # after the resume, before any commit
    ],
)
def test_caller_killed_during_save(fresh: Lab, kill_at: str) -> None:
    """A caller that dies mid-save never leaves the cluster paused.

    The dead-man's timer resumes every VM at the deadline and the staging state
    is dropped.
    """
    name = f"f-caller-{kill_at.split()[0]}-{len(kill_at)}"
    _run_caller_until(fresh, "save", name, kill_at)
    asyncio.run(_settle(fresh))
    time.sleep(0.5)
    _no_partial_state(fresh, name)


def test_caller_killed_during_restore(fresh: Lab) -> None:
    """A caller that dies after every host prepared the state leaves the group as it was.

    At the dead-man deadline every host discards the VMs it prepared; the VMs
    that ran before never stopped (same QEMU processes, same state).
    """
    asyncio.run(_save(fresh, "f-caller-restore"))
    before = asyncio.run(_pids(fresh))
    _run_caller_until(fresh, "restore", "f-caller-restore", "switch over")
    _restore_ended(fresh)
    assert sorted(asyncio.run(_settle(fresh))) == sorted(fresh.group.vms)
    assert asyncio.run(_pids(fresh)) == before


def test_stalled_host_is_refused_before_anything_pauses(fresh: Lab) -> None:
    """A host that does not answer (SIGSTOP) fails the clock sync: nothing is touched."""
    pid = execd_pid(fresh.name, "h2")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(OperationFailed, match="failed on host h2"):
            asyncio.run(_save(fresh, "f-stalled", timeouts=STALLED))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert asyncio.run(_settle(fresh))
    _no_partial_state(fresh, "f-stalled")


def test_host_stalling_mid_save_is_rolled_back(fresh: Lab) -> None:
    """A host that hangs while writing memory times out and the save is rolled back.

    Every VM runs again.
    """
    with (
        armed(fresh, "h2", "save_memory:before:hang"),
        pytest.raises(OperationFailed, match="host h2"),
    ):
        asyncio.run(_save(fresh, "f-hang", timeouts=STALLED))
    asyncio.run(_settle(fresh))
    _no_partial_state(fresh, "f-hang")


def test_unreachable_host_is_refused(fresh: Lab) -> None:
    """A host whose execd is down: refused at clock sync, naming it; nothing touched."""
    _kill_execd(fresh, "h2")
    try:
        with pytest.raises(OperationFailed, match="host h2"):
            asyncio.run(_save(fresh, "f-down"))
    finally:
        restart_execd(fresh.name, "h2")
        asyncio.run(wait_execds(fresh.group))
    asyncio.run(_settle(fresh))
    _no_partial_state(fresh, "f-down")


def test_qemu_crash_mid_save(fresh: Lab) -> None:
    """QEMU dying while its memory is written fails the save, naming the VM.

    The other VMs run again, no state is left, and `up` brings the crashed VM back.
    """
    with (
        armed(fresh, "h1", "save_memory:before:kill-qemu"),
        pytest.raises(OperationFailed, match="p1"),
    ):
        asyncio.run(_save(fresh, "f-crash"))
    vms = asyncio.run(_settle(fresh, allow_stopped=True))
    assert {"p2", "s1", "s2"} <= set(vms)
    _no_partial_state(fresh, "f-crash")
    asyncio.run(_recover(fresh))


def test_disk_full_while_writing_memory(fresh: Lab) -> None:
    """No room for the memory file: the save fails, is rolled back, VMs run, no state."""
    staging = fresh.data / "hosts" / "h2" / "root" / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    # `ip netns exec` gave the execd its own mount namespace: mount in there.
    pid = execd_pid(fresh.name, "h2")
    assert pid is not None
    in_execd = ["nsenter", "-t", str(pid), "-m"]
    subprocess.run(
        [*in_execd, "mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(staging)], check=True
    )
    try:
        with pytest.raises(OperationFailed, match="host h2"):
            asyncio.run(_save(fresh, "f-full"))
    finally:
        subprocess.run([*in_execd, "umount", str(staging)], check=True)
    asyncio.run(_settle(fresh))
    _no_partial_state(fresh, "f-full")


def test_duplicate_state_name_refused_before_pausing(fresh: Lab) -> None:
    """Saving under a taken name is refused up front; no VM was paused or replaced."""
    asyncio.run(_save(fresh, "f-dup"))

    async def pids() -> dict[str, int | None]:
        caller = _caller(fresh)
        try:
            results = await caller.status()
        finally:
            await _close(caller)
        return {s.name: s.pid for r in results.values() for s in (r.value or [])}

    before = asyncio.run(pids())
    with pytest.raises(OperationFailed, match="already exists on host h1, h2; nothing was changed"):
        asyncio.run(_save(fresh, "f-dup"))
    assert asyncio.run(pids()) == before


@pytest.mark.parametrize("damage", ["missing", "incomplete"])
def test_restore_of_state_missing_on_one_host(fresh: Lab, damage: str) -> None:
    """A state missing (or with a corrupt manifest) on h2 is refused, naming h2.

    Nothing changes: the same QEMU processes run before and after.
    """
    name = f"f-{damage}"
    asyncio.run(_save(fresh, name))
    state_dir = fresh.data / "hosts" / "h2" / "root" / "states" / name
    if damage == "missing":
        subprocess.run(["rm", "-rf", str(state_dir)], check=True)
    else:
        (state_dir / "manifest.json").write_text("{ not json")

    async def pids() -> dict[str, int | None]:
        caller = _caller(fresh)
        try:
            results = await caller.status()
        finally:
            await _close(caller)
        return {s.name: s.pid for r in results.values() for s in (r.value or [])}

    before = asyncio.run(pids())
    with pytest.raises(OperationFailed, match=f"state '{name}' is missing on host h2"):
        asyncio.run(_restore(fresh, name))
    assert asyncio.run(pids()) == before


def test_noisy_clock_refused_with_figures_or_forced(fresh: Lab) -> None:
    """Probes delayed on the way in (5-30 ms) predict too much skew and are refused.

    The refusal gives the figures and touches nothing; --force goes on and saves.
    """
    with armed(fresh, "h2", "probe:slow"):
        with pytest.raises(ClockError, match=r"predicts up to .* ms of skew.*h2: delay"):
            asyncio.run(_save(fresh, "f-noisy", budget=0.002))
        _no_partial_state(fresh, "f-noisy")
        asyncio.run(_save(fresh, "f-noisy", budget=0.002, force=True))
    assert list(fresh.data.glob("hosts/*/root/states/f-noisy"))
