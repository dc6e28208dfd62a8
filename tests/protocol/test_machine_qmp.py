"""Machine against a scripted QMP stub: the QEMU driver's QMP side without QEMU.

Each test runs the stub (:mod:`tests.helpers.qmp_stub`) as a process that looks
like a running QEMU (a pid file, a QMP socket, a stderr file), attaches a
:class:`Machine` to it and drives one scenario: how QEMU's status maps to a
runstate, the pause and resume instants under split and coalesced frames,
refused commands, a QEMU that dies or never answers, saving and loading memory
through a descriptor passed with SCM_RIGHTS. Each asserts the exact runstate
history, and what reached the stub where that is the point.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from qemu.qmp import ExecInterruptedError, ExecuteError

from lockstep.errors import QemuStartError, QmpError, VmError, VmStateError
from lockstep.execd.clock import ExecdClock
from lockstep.execd.fault import Fault
from lockstep.execd.host import Host
from lockstep.execd.inject import FaultBook
from lockstep.execd.instants import resume_at
from lockstep.execd.journal import Journal
from lockstep.execd.model import ExecdConfig
from lockstep.execd.qemu_driver import QemuDriver
from lockstep.execd.vms import HostVm, VmRegistry, VmRuntime
from lockstep.group import NicSpec
from lockstep.store import StateStore
from lockstep.vm.machine import Machine, VmRunstate
from tests.helpers.loop import longest_stall
from tests.helpers.qmp_stub import Script, Split, Step, event
from tests.helpers.rpc import run
from tests.helpers.stub_qemu import LIMIT, SPEC, StubQemu, attached, status

T = TypeVar("T")
V = VmRunstate

# QEMU's own instants: years before the test runs, so never a reply's arrival time.
STOP = event("STOP", 1_700_000_000, 123_456)
RESUME = event("RESUME", 1_700_000_001, 654_321)
QUICK = 0.5  # s: the command timeout where a test waits for it to pass
CRASH = "qemu-system-x86_64: ../system/cpus.c:504: qemu_mutex_lock_iothread_impl: Assertion failed."
STREAM = "QEVM\x00\x00\x00\x03 device state and RAM, as QEMU writes it"
SPLITS: list[Split] = ["whole", "coalesce", "bytes", "random"]


def migration_caps(ignore_shared: bool | None) -> tuple[Step, ...]:
    """query-migrate-capabilities answered with x-ignore-shared in that state (None: QEMU lacks it)."""
    caps = [{"capability": "xbzrle", "state": False}]
    if ignore_shared is not None:
        caps.append({"capability": "x-ignore-shared", "state": ignore_shared})
    return (Step(returns=caps),)


def plain(machine: Machine) -> Callable[[], Awaitable[VmRunstate]]:
    """A body that only looks at the runstate attach left."""

    async def look() -> VmRunstate:
        return machine.runstate

    return look


# --- attach ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qemu_status", "runstate"),
    [
        ("running", V.RUNNING),
        ("paused", V.PAUSED),
        ("prelaunch", V.PAUSED),
        ("postmigrate", V.SAVED),
        ("finish-migrate", V.SAVED),
        ("inmigrate", V.INCOMING),
    ],
)
def test_attach_maps_qemu_status_to_runstate(
    qemu: StubQemu, qemu_status: str, runstate: VmRunstate
) -> None:
    """attach() negotiates QMP, asks query-status once and takes the runstate QEMU's status means.

    prelaunch (started with -S) is paused; postmigrate and finish-migrate are a
    paused VM whose memory was written out; inmigrate waits for its memory.
    """
    machine, stub = qemu(Script({"query-status": status(qemu_status)}))
    assert attached(machine, plain(machine)) is runstate
    assert machine.history == [V.NEW, V.STARTING, runstate, V.GONE]
    assert stub.names() == ["qmp_capabilities", "query-status"]
    assert machine.pid == stub.proc.pid


def test_attach_refuses_a_status_reply_without_status(qemu: StubQemu) -> None:
    """A query-status reply that names no status is a QmpError naming the VM, not a KeyError.

    The QEMU that gave it is killed: one lockstep cannot drive must not hold its taps.
    """
    machine, stub = qemu(Script({"query-status": (Step(returns={"running": True}),)}))
    with pytest.raises(QmpError) as info:
        run(machine.attach(), LIMIT)
    assert str(info.value) == "VM p1: QEMU's query-status reply names no status: {'running': True}"
    assert machine.history == [V.NEW, V.STARTING, V.GONE]
    assert stub.proc.wait(5) == -signal.SIGKILL


def test_attach_to_a_qemu_that_never_greets_fails_in_time(qemu: StubQemu) -> None:
    """attach() to a QMP socket that accepts but never greets gives up within its timeout.

    A QEMU whose main loop is stuck still has its socket accept: the wait for
    the greeting is bounded too. The error names the VM and that QEMU is killed.
    """
    machine, stub = qemu(Script(greet=False))
    started = time.monotonic()
    with pytest.raises(QemuStartError) as info:
        run(machine.attach(timeout=QUICK), LIMIT)
    assert time.monotonic() - started < QUICK + 5
    assert str(info.value).startswith(
        f"VM p1: QEMU offered no QMP on {machine.paths.qmp} within 0.5 s"
    )
    assert machine.history == [V.NEW, V.STARTING, V.GONE]
    assert stub.proc.wait(5) == -signal.SIGKILL


def test_attach_to_a_qemu_that_never_answers_fails_in_time(qemu: StubQemu) -> None:
    """attach() to a QEMU that greets but never answers query-status fails after the command timeout.

    The QmpError names the VM, the command and the seconds, and that QEMU is killed.
    """
    machine, stub = qemu(Script({"query-status": (Step(end="hang"),)}), command_timeout=QUICK)
    with pytest.raises(QmpError) as info:
        run(machine.attach(), LIMIT)
    assert str(info.value) == "VM p1: QEMU did not answer query-status within 0.5 s"
    assert machine.history == [V.NEW, V.STARTING, V.GONE]
    assert stub.proc.wait(5) == -signal.SIGKILL


# --- pause and resume ------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("event_first", [True, False], ids=["event-first", "reply-first"])
def test_pause_and_resume_return_qemus_event_instants(
    qemu: StubQemu, split: Split, event_first: bool
) -> None:
    """pause() and resume() return the timestamps of QEMU's STOP and RESUME events.

    Not the time the reply came: the events carry instants years ago. It holds
    with the event before the reply (as QEMU sends them) or after it, and with
    every message written whole, coalesced with the next, one byte a write, or
    in random pieces across message boundaries (the log of writes proves the
    stub did split or coalesce).
    """

    def answer(ev: dict[str, object]) -> tuple[Step, ...]:
        return (Step(before=(ev,)) if event_first else Step(after=(ev,)),)

    script = Script(
        {"query-status": status("running"), "stop": answer(STOP), "cont": answer(RESUME)},
        split=split,
        seed=7,
    )
    machine, stub = qemu(script)

    async def cycle() -> tuple[float, float]:
        return await machine.pause(), await machine.resume()

    paused_at, resumed_at = attached(machine, cycle)
    assert paused_at == pytest.approx(1_700_000_000.123456, abs=1e-6)
    assert resumed_at == pytest.approx(1_700_000_001.654321, abs=1e-6)
    assert machine.history == [V.NEW, V.STARTING, V.RUNNING, V.PAUSED, V.RUNNING, V.GONE]
    writes = {c["execute"]: c["writes"] for c in stub.commands()}
    stop_writes = writes["stop"]
    expected_count = {"whole": 2, "coalesce": 1}.get(split)
    if expected_count is not None:
        assert len(stop_writes) == expected_count
    elif split == "bytes":
        assert set(stop_writes) == {1}
    else:
        assert len(stop_writes) > 2 and max(stop_writes) <= 16


def test_stop_answered_without_its_event_fails_in_time(qemu: StubQemu) -> None:
    """A QEMU that answers stop but never sends STOP fails pause() within the command timeout.

    The reply and its event share one deadline; the VM is not taken for paused.
    """
    machine, _ = qemu(
        Script({"query-status": status("running"), "stop": (Step(),)}), command_timeout=QUICK
    )
    with pytest.raises(QmpError) as info:
        attached(machine, machine.pause)
    assert str(info.value) == "VM p1: QEMU answered stop but sent no STOP event within 0.5 s"
    assert machine.history == [V.NEW, V.STARTING, V.RUNNING, V.GONE]


# --- errors ----------------------------------------------------------------------


def test_refused_command_is_one_sentence_naming_vm_and_command(qemu: StubQemu) -> None:
    """A command QEMU refuses raises QmpError: the VM, the command and QEMU's reason in one sentence.

    qemu.qmp's ExecuteError stays as the cause, and the VM stays where it was.
    """
    reason = "Could not create '/no/layer.qcow2': Permission denied"
    machine, _ = qemu(
        Script(
            {
                "query-status": status("paused"),
                "transaction": (Step(error=("GenericError", reason)),),
            }
        )
    )
    with pytest.raises(QmpError) as info:
        attached(machine, lambda: machine.snapshot_disks({0: Path("/no/layer.qcow2")}))
    assert str(info.value) == f"VM p1: QEMU refused transaction: {reason}"
    assert isinstance(info.value.__cause__, ExecuteError)
    assert machine.history == [V.NEW, V.STARTING, V.PAUSED, V.GONE]


@pytest.mark.parametrize(
    "death",
    [
        Step(end="die", stderr=CRASH + "\n"),
        Step(end="die", before=(STOP,), stderr=CRASH + "\n"),
        Step(end="die", cut=12, stderr=CRASH + "\n"),
    ],
    ids=["before-anything", "after-its-event", "inside-its-reply"],
)
def test_qemu_dying_mid_command_is_a_qmp_error_with_its_last_words(
    qemu: StubQemu, death: Step
) -> None:
    """A QEMU that dies running stop makes pause() raise QmpError naming the VM and the command.

    Wherever it dies (before answering, after its STOP event, halfway through
    its reply), the error carries QEMU's last words from its stderr, keeps
    qemu.qmp's error as the cause, and comes at once: never a hang, never
    qemu.qmp's own exception or an OSError.
    """
    machine, stub = qemu(Script({"query-status": status("running"), "stop": (death,)}))
    with pytest.raises(QmpError) as info:
        attached(machine, machine.pause)
    assert str(info.value) == f"VM p1: QEMU exited during stop: {CRASH}"
    assert isinstance(info.value.__cause__, ExecInterruptedError)
    assert machine.history == [V.NEW, V.STARTING, V.RUNNING, V.GONE]
    assert stub.proc.wait(5) == 1  # it died by itself


def test_qemu_that_never_answers_fails_the_command_in_time(qemu: StubQemu) -> None:
    """A QEMU that takes stop and never answers fails pause() after the command timeout.

    The QmpError names the VM, the command and the seconds waited; the VM can
    still be killed at once afterwards.
    """
    machine, stub = qemu(
        Script({"query-status": status("running"), "stop": (Step(end="hang"),)}),
        command_timeout=QUICK,
    )
    started = time.monotonic()
    with pytest.raises(QmpError) as info:
        attached(machine, machine.pause)
    assert QUICK <= time.monotonic() - started < QUICK + 5
    assert str(info.value) == "VM p1: QEMU did not answer stop within 0.5 s"
    assert machine.history == [V.NEW, V.STARTING, V.RUNNING, V.GONE]
    assert stub.proc.wait(5) == -signal.SIGKILL


# --- quit --------------------------------------------------------------------------


def test_quit_lets_qemu_exit_by_itself(qemu: StubQemu) -> None:
    """quit() sends quit and QEMU exits by itself (status 0, not killed); the VM is gone."""
    machine, stub = qemu(Script({"query-status": status("running")}))

    async def scenario() -> None:
        await machine.attach()
        await machine.quit()

    run(scenario(), LIMIT)
    assert stub.proc.wait(5) == 0
    assert stub.names() == ["qmp_capabilities", "query-status", "quit"]
    assert machine.history == [V.NEW, V.STARTING, V.RUNNING, V.GONE]
    assert not machine.paths.pidfile.exists()


def test_quit_of_a_qemu_that_never_answers_kills_it_in_time(qemu: StubQemu) -> None:
    """quit(timeout) of a QEMU that never answers kills it within about twice that timeout.

    The quit command waits ``timeout`` (not the longer command timeout), then
    the exit does; then QEMU is killed and the VM is gone.
    """
    machine, stub = qemu(
        Script({"query-status": status("running"), "quit": (Step(end="hang"),)}),
        command_timeout=LIMIT,
    )

    async def scenario() -> float:
        await machine.attach()
        started = time.monotonic()
        await machine.quit(timeout=QUICK)
        return time.monotonic() - started

    assert run(scenario(), LIMIT) < 2 * QUICK + 5
    assert stub.proc.wait(5) == -signal.SIGKILL
    assert machine.history == [V.NEW, V.STARTING, V.RUNNING, V.GONE]


# --- announce, right after a resume -------------------------------------------------


def test_announce_asks_qemu_for_a_migrations_announcement(qemu: StubQemu) -> None:
    """announce() sends announce-self with the rounds QEMU uses after a migration.

    A paused VM is refused before anything reaches QEMU: its guest could not
    answer QEMU's request to announce itself.
    """
    script = {"query-status": status("paused"), "cont": (Step(after=(RESUME,)),)}
    machine, stub = qemu(Script({**script, "announce-self": (Step(),)}))

    async def scenario() -> None:
        with pytest.raises(VmStateError, match="VM p1 is paused; this needs it running"):
            await machine.announce()
        await machine.resume()
        await machine.announce()

    attached(machine, scenario)
    sent = [c for c in stub.commands() if c["execute"] == "announce-self"]
    assert stub.names()[-2:] == ["cont", "announce-self"]
    assert sent[0]["arguments"] == {"initial": 50, "max": 550, "rounds": 5, "step": 100}


def _stub_vm(machine: Machine, tmp_path: Path) -> tuple[Host, HostVm]:
    """An execd host with one VM, driven by ``machine`` (a stub QEMU), with one NIC."""
    config = ExecdConfig(host="h1", root=tmp_path / "root")
    store = StateStore(config.root)
    vms = VmRegistry(config, store)
    journal = Journal(config.root / "ops")
    host = Host(config, ExecdClock(), store, vms, journal, Fault(), FaultBook("h1", vms), dict)
    spec = SPEC.model_copy(
        update={"nics": [NicSpec(network="lan", mac="52:54:00:00:00:01", bridge="lsvm")]}
    )
    vm = HostVm(VmRuntime(spec, "lab", ["tap0"]), machine, machine.paths.rundir, QemuDriver(host))
    vms.register(vm)
    return host, vm


@pytest.mark.parametrize("refused", [False, True], ids=["announced", "qemu-refuses"])
def test_resume_announces_the_vms_after_they_resumed(
    qemu: StubQemu, tmp_path: Path, caplog: pytest.LogCaptureFixture, refused: bool
) -> None:
    """The execd's resume sends announce-self once the VM runs, never before its cont.

    A QEMU that refuses it (one without announce-self) costs a warning, not
    the resume: the VM runs and its report has its resume instant.
    """
    answer = Step(error=("CommandNotFound", "The command announce-self has not been found"))
    script = Script(
        {
            "query-status": status("paused"),
            "cont": (Step(after=(RESUME,)),),
            "announce-self": (answer if refused else Step(),),
        }
    )
    machine, stub = qemu(script)
    host, vm = _stub_vm(machine, tmp_path)

    reports = attached(machine, lambda: resume_at(host, [vm], None))
    assert stub.names() == ["qmp_capabilities", "query-status", "cont", "announce-self"]
    assert reports[0].resumed_at == pytest.approx(1_700_000_001.654321, abs=1e-6)
    warned = [r.message for r in caplog.records if "not announced" in r.message]
    assert len(warned) == (1 if refused else 0)


# --- memory ------------------------------------------------------------------------


def migration_script(status_name: str, *migrate: Step, **more: tuple[Step, ...]) -> Script:
    """A QEMU in ``status_name`` that sets migration up and reports ``migrate`` on query-migrate."""
    return Script(
        {
            "query-status": status(status_name),
            "query-migrate-capabilities": migration_caps(False),
            "migrate-set-capabilities": (Step(),),
            "migrate-set-parameters": (Step(),),
            "query-migrate": migrate,
            **more,
        }
    )


@pytest.mark.parametrize(
    ("ignore_shared", "qemu_has", "asks", "sets"),
    [
        (False, False, True, False),
        (True, False, False, True),
        (False, True, True, True),
        (False, None, True, False),
    ],
    ids=["standard", "fast", "standard-after-fast", "qemu-lacks-it"],
)
def test_save_memory_migrates_to_the_passed_file(
    qemu: StubQemu,
    tmp_path: Path,
    ignore_shared: bool,
    qemu_has: bool | None,
    asks: bool,
    sets: bool,
) -> None:
    """save_memory() hands QEMU its file over SCM_RIGHTS and migrates into it until completed.

    In order: x-ignore-shared set as asked where QEMU has it in another state
    (a capability stays as the last save set it), the bandwidth cap lifted,
    getfd naming the passed descriptor, migrate to fd:memfile, then
    query-migrate until completed, with progress reported while active. What
    QEMU wrote through the descriptor is the file, its size is returned, and
    the VM is saved.
    """
    machine, stub = qemu(
        migration_script(
            "paused",
            Step(returns={"status": "active", "ram": {"transferred": 4096, "total": 8192}}),
            Step(returns={"status": "completed"}),
            migrate=(Step(stream=STREAM),),
            **{"query-migrate-capabilities": migration_caps(qemu_has)},
        )
    )
    target = tmp_path / "p1.mem"
    progress: list[tuple[int, int]] = []

    def seen(done: int, total: int) -> None:
        progress.append((done, total))

    size = attached(
        machine, lambda: machine.save_memory(target, ignore_shared=ignore_shared, progress=seen)
    )
    assert size == len(STREAM.encode())
    assert target.read_text() == STREAM
    assert progress == [(4096, 8192)]
    assert machine.history == [V.NEW, V.STARTING, V.PAUSED, V.SAVED, V.GONE]
    setup = ["query-migrate-capabilities"] * asks + ["migrate-set-capabilities"] * sets
    assert stub.names() == [
        "qmp_capabilities",
        "query-status",
        *setup,
        "migrate-set-parameters",
        "getfd",
        "migrate",
        "query-migrate",
        "query-migrate",
    ]
    sent = {c["execute"]: c for c in stub.commands()}
    if sets:
        assert sent["migrate-set-capabilities"]["arguments"] == {
            "capabilities": [{"capability": "x-ignore-shared", "state": ignore_shared}]
        }
    assert sent["migrate-set-parameters"]["arguments"]["max-bandwidth"] >= 1 << 40
    assert sent["getfd"]["fd"] == "memfile"
    assert sent["migrate"]["arguments"] == {"uri": "fd:memfile"}
    assert sent["migrate"]["wrote"] == size


def test_flushing_the_memory_file_leaves_the_event_loop_free(
    qemu: StubQemu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fsync of a saved memory file (gigabytes) runs on a worker thread.

    On the event loop it stalled every other call of the execd meanwhile:
    probes, extends, the other VMs' migrations. Here a flush takes 0.4 s and a
    task ticking every 10 ms must not miss a beat.
    """
    machine, _ = qemu(
        migration_script(
            "paused", Step(returns={"status": "completed"}), migrate=(Step(stream=STREAM),)
        )
    )
    flushed = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.4)
        flushed.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    async def save_while_watched() -> float:
        _, longest = await longest_stall(machine.save_memory(tmp_path / "p1.mem"))
        return longest

    longest = attached(machine, save_while_watched)
    assert flushed, "the memory file must be flushed"
    assert longest < 0.2, f"the event loop stalled for {longest:.2f} s"


def test_failed_save_carries_qemus_reason(qemu: StubQemu, tmp_path: Path) -> None:
    """A save that query-migrate reports failed raises VmError with QEMU's error-desc.

    The VM stays paused, not saved.
    """
    reason = "Unable to write to file: No space left on device"
    machine, _ = qemu(
        migration_script(
            "paused",
            Step(returns={"status": "active"}),
            Step(returns={"status": "failed", "error-desc": reason}),
        )
    )
    with pytest.raises(VmError) as info:
        attached(machine, lambda: machine.save_memory(tmp_path / "p1.mem"))
    assert str(info.value) == f"VM p1: saving memory failed: {reason}"
    assert machine.history == [V.NEW, V.STARTING, V.PAUSED, V.GONE]


def test_load_memory_feeds_qemu_the_file(qemu: StubQemu, tmp_path: Path) -> None:
    """load_memory() hands an incoming QEMU the saved file and waits for the load to complete.

    In order: getfd naming the passed descriptor, migration set up, QEMU's
    own announcement of the loaded VM turned off (a prepared VM must not
    speak on the network before its resume), then migrate-incoming from
    fd:memfile and query-migrate until completed. QEMU read exactly the file
    through the descriptor, and the VM is paused.
    """
    source = tmp_path / "p1.mem"
    source.write_text(STREAM)
    machine, stub = qemu(
        migration_script(
            "inmigrate", Step(returns={"status": "active"}), Step(returns={"status": "completed"})
        )
    )
    attached(machine, lambda: machine.load_memory(source))
    assert machine.history == [V.NEW, V.STARTING, V.INCOMING, V.PAUSED, V.GONE]
    assert stub.names() == [
        "qmp_capabilities",
        "query-status",
        "getfd",
        "query-migrate-capabilities",
        "migrate-set-parameters",
        "migrate-set-parameters",
        "migrate-incoming",
        "query-migrate",
        "query-migrate",
    ]
    sent = {c["execute"]: c for c in stub.commands()}
    params = [c["arguments"] for c in stub.commands() if c["execute"] == "migrate-set-parameters"]
    assert {"announce-rounds": 0} in params
    assert sent["migrate-incoming"]["arguments"] == {"uri": "fd:memfile"}
    assert sent["migrate-incoming"]["read"] == STREAM


LOAD_FAILED = "Invalid argument"
LOAD_CRASH = "qemu-system-x86_64: load of migration failed: Invalid argument"


@pytest.mark.parametrize(
    ("last", "message"),
    [
        (
            Step(returns={"status": "failed", "error-desc": LOAD_FAILED}),
            "VM p1: loading memory from {source} failed: " + LOAD_FAILED,
        ),
        (
            Step(end="die", stderr=LOAD_CRASH + "\n"),
            "VM p1: QEMU exited during loading memory from {source}: " + LOAD_CRASH,
        ),
    ],
    ids=["reported-failed", "qemu-exits"],
)
def test_failed_load_carries_qemus_reason(
    qemu: StubQemu, tmp_path: Path, last: Step, message: str
) -> None:
    """A load that fails raises VmError with QEMU's reason: its error-desc, or its last words.

    A real QEMU exits when a stream does not load, so query-migrate may never
    say failed: the connection drops and its stderr tells why. The VM stays
    incoming until it is killed.
    """
    source = tmp_path / "p1.mem"
    source.write_text(STREAM)
    machine, _ = qemu(migration_script("inmigrate", Step(returns={"status": "active"}), last))
    with pytest.raises(VmError) as info:
        attached(machine, lambda: machine.load_memory(source))
    assert str(info.value) == message.format(source=source)
    assert machine.history == [V.NEW, V.STARTING, V.INCOMING, V.GONE]
