"""The caller's commit/abort logic against stub hosts: every failure point of save and restore.

Three stub execds (:mod:`tests.helpers.hosts`) run the group; h2's clock is
2.5 s ahead of the caller's and h3's 1.25 s behind. In each case one call fails
on h2, and the test checks what the caller raised (one sentence naming the step
and the host), every call each host got (the abort, and its resume instant,
included), the state the hosts end in, and the phases the run went through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from lockstep.caller.clock import SyncPolicy
from lockstep.caller.operation import Runstate
from lockstep.caller.orchestrator import GroupCaller
from lockstep.caller.report import OperationReport
from lockstep.errors import ClockError, HostUnreachable, OperationFailed, RpcError
from lockstep.execd.ops import OpPhase
from lockstep.group import GroupSpec
from tests.helpers.hosts import (
    GUEST_BEHIND_MS,
    PAUSED,
    RUNNING,
    FakeClock,
    StubHost,
    stub_group,
    stub_hosts,
)
from tests.helpers.rpc import run

PLACEMENT = {"h1": ["p1", "p2"], "h2": ["s1"], "h3": ["w1"]}
OFFSETS = {"h1": 0.0, "h2": 2.5, "h3": -1.25}
ALL_RUNNING = {h: dict.fromkeys(vms, RUNNING) for h, vms in PLACEMENT.items()}
UNREACHABLE = HostUnreachable("host h2 (10.0.0.2:7443) is unreachable: connection refused")
ROLLED_BACK = "; the operation was rolled back on every host (VMs running as before)"
DISCARDED = (
    "; the restore of state 'base' was undone: the VMs it prepared were discarded, and the"
    " group runs on as it was"
)
SWITCHED_BACK = (
    "; the restore of state 'base' was undone: every host that had switched over to the"
    " restored VMs switched back, and the group runs on as it was"
)
SAVE = ["clock sync", "freeze NICs and pause", "save memory and freeze disk layers"]
SAVE += ["drain and save held frames"]
RESTORE = ["verify the state", "clock sync", "load VMs paused, frames held", "clock sync"]
RESTORE += ["switch over"]
NOT_RESTORED = {h: dict.fromkeys(vms, 0) for h, vms in PLACEMENT.items()}


def _group() -> GroupSpec:
    return stub_group(PLACEMENT)


@dataclass
class Rig:
    """A caller over three stub hosts, and the phases its progress callback was told of."""

    clock: FakeClock
    hosts: dict[str, StubHost]
    caller: GroupCaller
    phases: list[str] = field(default_factory=list)

    def progress(self, event: str, details: Mapping[str, Any]) -> None:
        if event == "phase":
            self.phases.append(str(details["name"]))

    def ran(self, *, failed: bool = True) -> list[str]:
        """The runner's history of the last operation: its phases, then its undo if one ran.

        The phases are the ones the progress callback was told of, in that
        order; the operation ended FAILED (or DONE, if not ``failed``).
        """
        op = self.caller.last_operation
        assert op is not None
        assert [p for p in op.history if not p.startswith("undo: ")] == self.phases
        assert op.runstate is (Runstate.FAILED if failed else Runstate.DONE)
        return op.history

    def vms(self) -> dict[str, dict[str, str]]:
        return {h: dict(stub.vms) for h, stub in self.hosts.items()}

    def states(self) -> dict[str, list[str]]:
        return {h: sorted(stub.saved) for h, stub in self.hosts.items()}

    def common(self, call: str, arg: str) -> float:
        """The one caller-clock instant behind ``arg`` of every host's last ``call``.

        Each host got it on its own clock; converted back with that host's
        offset it is the same instant everywhere.
        """
        instants = {h: stub.args(call)[-1][arg] - stub.offset for h, stub in self.hosts.items()}
        first = next(iter(instants.values()))
        assert instants == pytest.approx(dict.fromkeys(instants, first), abs=1e-9), instants
        assert isinstance(first, float)
        return first


def _rig(
    states: Sequence[str] = (),
    deadman: float = 30.0,
    group: GroupSpec | None = None,
    **per_host: Any,
) -> Rig:
    """Stub hosts (with ``states`` committed, and StubHost options ``per_host``) and a caller.

    Clock sync stops after 0.1 s of probing (probes with a ``delay`` never
    reach the sync target).
    """
    clock = FakeClock()
    options = {
        h: {"offset": OFFSETS[h], "states": states, **per_host.get(h, {})} for h in PLACEMENT
    }
    hosts = stub_hosts(PLACEMENT, clock, **options)
    policy = SyncPolicy(limit=0.1)
    caller = GroupCaller(group or _group(), hosts, clock=clock, sync_policy=policy, deadman=deadman)
    return Rig(clock, hosts, caller)


@dataclass(frozen=True)
class Case:
    """One failure point: the call that fails on h2 and all that must follow."""

    call: str
    message: str
    calls: list[str]  # every host's calls (clock probes left out)
    phases: list[str]  # the phases run (an abort is added where every host got one)
    after: int = 0  # calls of that name h2 answers before it fails
    error: RpcError | None = None  # what h2 raises (default: a RemoteError)
    stop: bool = False

    def __str__(self) -> str:
        return f"{self.call}{'#2' if self.after else ''}{' --stop' if self.stop else ''}"


def _fails_as(case: Case, rig: Rig, operation: Coroutine[Any, Any, OperationReport]) -> None:
    """Run ``operation`` with ``case``'s fault armed on h2; check the sentence, phases and calls.

    Every host got the case's calls and keeps no operation open; the runner
    went through the case's phases, then an abort where the hosts got one.
    """
    rig.hosts["h2"].fail(case.call, case.error, after=case.after)
    with pytest.raises(OperationFailed) as info:
        run(operation)
    assert str(info.value) == case.message
    undone = ["undo: abort"] if "abort" in case.calls else []
    assert rig.ran() == [*case.phases, *undone]
    for stub in rig.hosts.values():
        assert stub.called() == case.calls, stub
        assert not stub.open, stub


def _failed(step: str, call: str, tail: str = "") -> str:
    return f"{step} failed on host h2: h2: {call} failed (injected){tail}"


SAVE_CASES = [
    Case(
        "probe",
        "clock sync failed on host h2: " + str(UNREACHABLE),
        ["states"],
        SAVE[:1],
        error=UNREACHABLE,
    ),
    *(
        Case(
            call,
            _failed(step, call, ROLLED_BACK),
            ["states", *calls, "abort"],
            SAVE[: len(calls) + 1],
            stop=stop,
        )
        for stop in (False, True)
        for step, call, calls in (
            (SAVE[1], "pause", ["pause"]),
            (SAVE[2], "save_memory", ["pause", "save_memory"]),
            (SAVE[3], "drain", ["pause", "save_memory", "drain"]),
        )
    ),
    Case(
        "resume",
        _failed("resume and deliver frames", "resume", ROLLED_BACK),
        ["states", "pause", "save_memory", "drain", "resume", "abort"],
        [*SAVE, "resume and deliver frames"],
    ),
    *(
        Case(
            "commit",
            _failed(
                "commit",
                "commit",
                "; state 'snap' was removed from the hosts that had committed it",
            ),
            ["states", "pause", "save_memory", "drain", *calls, "commit", "abort"],
            [*SAVE, *phases, "commit"],
            stop=stop,
        )
        for stop, calls, phases in (
            (False, ["resume"], ["resume and deliver frames"]),
            (True, [], []),
        )
    ),
]


@pytest.mark.parametrize("case", SAVE_CASES, ids=str)
def test_save_fails_at_each_step(case: Case) -> None:
    """A save failing on one host at any step is undone everywhere, as the step calls for.

    Before anything is opened (clock sync) no host gets an abort; from the
    pause on, every host gets one with the same resume instant, so the VMs run
    again together; a host that committed drops the state again. No host lists
    the state, no operation stays open, every VM runs.
    """
    rig = _rig()
    _fails_as(case, rig, rig.caller.save("snap", stop=case.stop, progress=rig.progress))
    if "abort" in case.calls:
        rig.common("abort", "resume_at")
        ops = {op for stub in rig.hosts.values() for op in stub.operations}
        assert len(ops) == 1
    else:
        assert not any(stub.operations for stub in rig.hosts.values())
    assert rig.states() == {h: [] for h in PLACEMENT}
    assert rig.vms() == ALL_RUNNING


def test_save_commit_failure_undoes_the_hosts_that_committed() -> None:
    """h1 and h3 commit, h2 does not: the abort drops the state h1 and h3 had listed."""
    rig = _rig()
    rig.hosts["h2"].fail("commit")
    with pytest.raises(OperationFailed, match="commit failed on host h2"):
        run(rig.caller.save("snap"))
    (op,) = rig.hosts["h1"].operations
    committed = [OpPhase.OPEN, OpPhase.PAUSED, OpPhase.SAVED, OpPhase.DRAINED, OpPhase.RESUMED]
    assert rig.hosts["h1"].history(op) == [*committed, OpPhase.COMMITTED]
    assert rig.hosts["h3"].history(op) == [*committed, OpPhase.COMMITTED]
    assert rig.hosts["h2"].history(op) == [*committed, OpPhase.ABORTED]
    assert rig.states() == {h: [] for h in PLACEMENT}


def test_save_stop_failure_leaves_the_committed_state() -> None:
    """`save --stop` whose destroy fails on h2 raises naming it; the state stays committed.

    Nothing is aborted (the state is complete everywhere); h1's and h3's VMs
    are gone, h2's are still paused in their committed operation.
    """
    rig = _rig()
    rig.hosts["h2"].fail("stop")
    with pytest.raises(OperationFailed) as info:
        run(rig.caller.save("snap", stop=True, progress=rig.progress))
    assert str(info.value) == _failed("destroying VMs", "stop")
    assert rig.ran() == [*SAVE, "commit", "destroy VMs"]
    for stub in rig.hosts.values():
        assert stub.called() == ["states", "pause", "save_memory", "drain", "commit", "stop"]
    assert rig.states() == {h: ["snap"] for h in PLACEMENT}
    assert rig.vms() == {"h1": {}, "h2": {"s1": PAUSED}, "h3": {}}
    (op,) = rig.hosts["h2"].open
    assert rig.hosts["h2"].history(op)[-1] is OpPhase.COMMITTED


RESTORE_CASES = [
    Case(
        "verify_state",
        "verifying the state failed on host h2: h2: verify_state failed (injected)",
        ["states", "verify_state"],
        RESTORE[:1],
    ),
    Case(
        "probe",
        "clock sync failed on host h2: " + str(UNREACHABLE),
        ["states", "verify_state"],
        RESTORE[:2],
        error=UNREACHABLE,
    ),
    Case(
        "prepare_restore",
        _failed("load VMs paused, frames held", "prepare_restore", DISCARDED),
        ["states", "verify_state", "prepare_restore", "abort"],
        RESTORE[:3],
    ),
    Case(
        "probe_path",
        "clock sync failed on host h2: " + str(UNREACHABLE) + DISCARDED,
        ["states", "verify_state", "prepare_restore", "abort"],
        RESTORE[:4],
        after=1,
        error=UNREACHABLE,
    ),
    Case(
        "resume",
        _failed("switch over", "resume", SWITCHED_BACK),
        ["states", "verify_state", "prepare_restore", "resume", "abort"],
        RESTORE,
    ),
]


@pytest.mark.parametrize("case", RESTORE_CASES, ids=str)
def test_restore_fails_at_each_step(case: Case) -> None:
    """A restore failing on one host is undone everywhere: the group runs on as it was.

    Before anything is opened (the state's check, the first clock sync) no
    host gets an abort; after, every host gets one, with one common resume
    instant: what was prepared is discarded, and hosts that had switched over
    switch back. Every VM runs, the same generation as before, and the state
    itself is untouched.
    """
    rig = _rig(states=["base"])
    _fails_as(case, rig, rig.caller.restore("base", progress=rig.progress))
    assert rig.states() == {h: ["base"] for h in PLACEMENT}
    assert rig.vms() == ALL_RUNNING
    assert {h: stub.generation for h, stub in rig.hosts.items()} == NOT_RESTORED
    if "abort" not in case.calls:
        assert not any(stub.operations for stub in rig.hosts.values())
        return
    rig.common("abort", "resume_at")
    for stub in rig.hosts.values():
        for op in stub.operations:  # h2 opened none if its prepare failed
            assert stub.history(op)[-1] is OpPhase.ABORTED


def test_restore_verifies_deep_only_when_asked() -> None:
    """Every host checks the state before anything; the RAM's hashes only with verify."""
    rig = _rig(states=["base"])
    run(rig.caller.restore("base"))
    run(rig.caller.restore("base", verify=True))
    for stub in rig.hosts.values():
        assert [a["deep"] for a in stub.args("verify_state")] == [False, True]
        assert {vm: n for vm, n in stub.generation.items()} == {vm: 2 for vm in stub.generation}


def test_restore_sets_guest_clocks_from_the_callers_clock_unless_kept() -> None:
    """The switch-over asks every host to set its guests' wall clocks, from the caller's clock.

    Each host gets the resume instant on its own clock, but true time as the
    caller's clock at that instant: the same on every host (h2's clock is
    2.5 s ahead, h3's 1.25 s behind). A VM the group file keeps on its saved
    time (``guest_time = "saved"``) is not asked for; the report says so, and
    gives the others' corrections. A save asks for none.
    """
    group = _group()
    w1 = group.vms["w1"].model_copy(update={"guest_time": "saved"})
    rig = _rig(states=["base"], group=group.model_copy(update={"vms": {**group.vms, "w1": w1}}))
    report = run(rig.caller.restore("base"))
    resume = rig.common("resume", "at")
    asked = {h: stub.args("resume")[-1]["guest_time"] for h, stub in rig.hosts.items()}
    assert {h: g.vms for h, g in asked.items()} == {"h1": ("p1", "p2"), "h2": ("s1",), "h3": ()}
    assert {h: g.true_at for h, g in asked.items()} == pytest.approx(dict.fromkeys(asked, resume))
    clocks = {v.name: (v.clock_correction_ms, v.clock_note) for v in report.vms}
    assert clocks == {
        "p1": (GUEST_BEHIND_MS, ""),
        "p2": (GUEST_BEHIND_MS, ""),
        "s1": (GUEST_BEHIND_MS, ""),
        "w1": (None, 'the saved time kept (guest_time = "saved")'),
    }
    assert report.to_json()["vms"][0]["clock_correction_ms"] == GUEST_BEHIND_MS
    run(rig.caller.save("snap"))
    assert [a.get("guest_time") for a in rig.hosts["h1"].args("resume")[1:]] == [None]


def test_budget_refusal_touches_nothing() -> None:
    """Clock error that could break the skew budget refuses the save with the figures.

    h2's probes take 10 ms, so its offset may be off by 5 ms: a ClockError
    names it, and no host got anything but the state listing and probes.
    """
    rig = _rig(h2={"delay": 0.010})
    with pytest.raises(ClockError, match=r"predicts up to 5\.00 ms of skew.*h2: delay 10\.000 ms"):
        run(rig.caller.save("snap", progress=rig.progress))
    assert rig.ran() == ["clock sync"]
    for stub in rig.hosts.values():
        assert stub.called() == ["states"]
        assert not stub.operations


def test_save_pauses_and_resumes_at_one_instant_on_every_host() -> None:
    """Every host gets the same pause and resume instants, each on its own clock.

    Converted back with the host's offset, the pause instants are one caller
    instant, and so are the resume instants; the resume leaves the time
    the busiest host needs to queue its held frames, and each host's dead-man
    deadline is the pause instant plus the caller's dead-man time.
    """
    rig = _rig(h2={"frames": 1000})
    report = run(rig.caller.save("snap", progress=rig.progress))
    pause = rig.common("pause", "at")
    resume = rig.common("resume", "at")
    deadline = rig.common("pause", "deadline")
    assert pause == pytest.approx(rig.clock() + 0.35)
    assert resume == pytest.approx(rig.clock() + 0.05 + 1000 * 20e-6)
    assert deadline == pytest.approx(pause + 30.0)
    assert report.pause_skew_ms == pytest.approx(0.0, abs=1e-6)
    assert report.resume_skew_ms == pytest.approx(0.0, abs=1e-6)
    assert {v.name: v.paused_at for v in report.vms} == pytest.approx(
        dict.fromkeys(["p1", "p2", "s1", "w1"], pause)
    )
    offsets = {c.host: c.offset_ms / 1000 for c in report.clocks}
    assert offsets == pytest.approx(OFFSETS)
    assert rig.ran(failed=False) == [*SAVE, "resume and deliver frames", "commit"]
    assert rig.states() == {h: ["snap"] for h in PLACEMENT}
    assert rig.vms() == ALL_RUNNING


def test_cancelled_save_keeps_extending_then_stops_cleanly() -> None:
    """While h2 hangs in drain the caller keeps pushing back every host's dead-man deadline.

    Cancelling the save (the user's Ctrl-C) cancels the hanging call and the
    keepalive; it is not swallowed, and no abort is sent: the hosts' dead-man
    timers resume the VMs.
    """
    rig = _rig(deadman=0.3)
    rig.hosts["h2"].hang("drain")

    async def save_until_extended() -> None:
        task = asyncio.create_task(rig.caller.save("snap"))
        for stub in rig.hosts.values():
            await stub.reached("extend", 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not [t for t in others if t.get_name().startswith("keepalive")]
        assert len(others) <= 1  # the test's own bounding task at most

    run(save_until_extended(), limit=20)
    for stub in rig.hosts.values():
        assert "abort" not in stub.called()
        assert stub.open  # left to the host's dead-man timer
    rig.common("extend", "deadline")


def test_restore_commit_failure_names_the_state_and_what_it_means() -> None:
    """A restore whose commit fails on h2 names the state and says what h2 will do.

    The switch-over took effect everywhere, so nothing is aborted: h1 and h3
    keep the restored VMs; h2's operation stays open, and its dead-man timer
    switches it back at the deadline, which the sentence says.
    """
    rig = _rig(states=["base"])
    rig.hosts["h2"].fail("commit")
    with pytest.raises(OperationFailed) as info:
        run(rig.caller.restore("base", progress=rig.progress))
    assert str(info.value) == _failed(
        "commit",
        "commit",
        "; the restore of state 'base' took effect on every host, but host h2 could not be"
        " told to keep it: at the operation's deadline it switches back to the VMs it ran"
        " before (run `lockstep restore base` again)",
    )
    assert rig.ran() == [*RESTORE, "commit", "undo: report"]
    for stub in rig.hosts.values():
        assert stub.called() == ["states", "verify_state", "prepare_restore", "resume", "commit"]
    (op,) = rig.hosts["h1"].operations
    resumed = [OpPhase.OPEN, OpPhase.PREPARED, OpPhase.SWITCHED, OpPhase.RESUMED]
    assert rig.hosts["h1"].history(op) == [*resumed, OpPhase.COMMITTED]
    assert rig.hosts["h2"].history(op) == resumed
    assert rig.hosts["h2"].open and not rig.hosts["h1"].open
    assert rig.vms() == ALL_RUNNING
    assert rig.states() == {h: ["base"] for h in PLACEMENT}


def test_restore_abort_that_cannot_reach_a_host_says_it_undoes_by_itself() -> None:
    """h2 fails the switch-over and cannot be reached to abort: the sentence says what it does."""
    rig = _rig(states=["base"])
    rig.hosts["h2"].fail("resume")
    rig.hosts["h2"].fail("abort", UNREACHABLE)
    with pytest.raises(OperationFailed) as info:
        run(rig.caller.restore("base"))
    assert str(info.value).endswith(
        "and the group runs on as it was (host h2 could not be told: it undoes the restore by"
        " itself at the operation's deadline)"
    )
    assert rig.hosts["h2"].open and not rig.hosts["h1"].open


def test_restore_of_a_group_with_a_libvirt_domain_swaps_paused_between_two_instants() -> None:
    """With a libvirt domain in the group, every host pauses and swaps, then all resume.

    A domain cannot exist twice, so the switch-over is two phases: every host
    gets ``switch`` at one common instant (its old VMs pause, its new ones
    take their place, paused), then ``resume`` at a later common instant.
    The report has each VM's pause from the switch and resume from the resume.
    A failure in the resume swaps back on every host.
    """
    group = _group()
    db = group.vms["w1"].model_copy(update={"driver": "libvirt", "kernel": None})
    mixed = group.model_copy(update={"vms": {**group.vms, "w1": db}})
    rig = _rig(states=["base"], group=mixed)
    report = run(rig.caller.restore("base", progress=rig.progress))
    assert rig.ran(failed=False) == [
        *RESTORE[:-1],
        "pause and swap in the restored VMs",
        "resume and deliver frames",
        "commit",
    ]
    for stub in rig.hosts.values():
        assert stub.called() == [
            "states", "verify_state", "prepare_restore", "switch", "resume", "commit",
        ]  # fmt: skip
    switched, resumed = rig.common("switch", "at"), rig.common("resume", "at")
    assert resumed >= switched  # taken after every host swapped (no time passes here)
    paused = {v.name: v.paused_at for v in report.vms}
    assert paused == pytest.approx(dict.fromkeys(paused, switched))
    assert rig.vms() == ALL_RUNNING

    failing = _rig(states=["base"], group=mixed)
    failing.hosts["h2"].fail("resume")
    with pytest.raises(OperationFailed, match="switched back"):
        run(failing.caller.restore("base", progress=failing.progress))
    assert failing.vms() == ALL_RUNNING
    assert [s.called()[-1] for s in failing.hosts.values()] == ["abort"] * 3
