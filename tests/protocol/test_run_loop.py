"""`lockstep run`'s loop against stub hosts: a restore before every case, and Ctrl-C.

A case never runs on a half-restored group, and Ctrl-C puts the group back. The group is three stub execds (:mod:`tests.helpers.hosts`); the cases are real
shell scripts.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from lockstep.caller.clock import SyncPolicy
from lockstep.caller.orchestrator import GroupCaller
from lockstep.group import GroupSpec
from lockstep.run.cases import Case
from lockstep.run.loop import RunOptions, case_env, run_cases
from tests.helpers.hosts import FakeClock, StubHost, stub_group, stub_hosts

PLACEMENT = {"h1": ["p1"], "h2": ["s1"]}


def _group() -> GroupSpec:
    return stub_group(PLACEMENT, "lsnolab", network="lan")


def _caller() -> tuple[GroupCaller, dict[str, StubHost]]:
    clock = FakeClock()
    hosts = stub_hosts(PLACEMENT, clock, **{h: {"states": ["origin"]} for h in PLACEMENT})
    return GroupCaller(_group(), hosts, clock=clock, sync_policy=SyncPolicy(limit=0.1)), hosts


def _case(tmp: Path, name: str, body: str) -> Case:
    path = tmp / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return Case(name, path)


def _restores(hosts: dict[str, StubHost]) -> int:
    return len(hosts["h1"].args("prepare_restore"))


def test_every_case_runs_on_the_group_just_put_back(tmp_path: Path) -> None:
    """Each case follows its own restore; pass, fail and timeout are told apart.

    The check command runs after each case, in its environment, and its result
    is what the group noticed.
    """
    caller, hosts = _caller()
    cases = [
        _case(tmp_path, "a-pass", "exit 0"),
        _case(tmp_path, "b-fail", "exit 4"),
        _case(tmp_path, "c-hang", "sleep 60"),
    ]
    check = ["sh", "-c", 'echo "checked $LOCKSTEP_CASE"']
    seen: list[int] = []

    def say(line: str) -> None:
        if line.endswith(": running") or "running" in line:
            seen.append(_restores(hosts))

    options = RunOptions(timeout=0.5, check=check)
    result = asyncio.run(run_cases(caller, tmp_path / "g.toml", "origin", cases, options, say))
    assert [c.status for c in result.cases] == ["passed", "failed", "timeout"]
    assert seen == [1, 2, 3], "every case starts right after a restore of its own"
    assert [c.exit_code for c in result.cases] == [0, 4, None]
    assert result.cases[1].message == "case b-fail exited with status 4"
    noticed = [c.noticed for c in result.cases]
    assert all(n is not None and n["ok"] for n in noticed)
    assert noticed[2] is not None and noticed[2]["output"] == ["checked c-hang"]
    assert all(c.restore is not None and c.restore["operation"] == "restore" for c in result.cases)
    assert not result.passed and not result.interrupted


def test_a_case_never_runs_on_a_group_that_could_not_be_put_back(tmp_path: Path) -> None:
    """The restore fails on h2: the case is an error and never started; the next one runs."""
    caller, hosts = _caller()
    hosts["h2"].fail("prepare_restore", after=0)
    marker = tmp_path / "ran"
    first = _case(tmp_path, "first", f"touch {marker}")
    result = asyncio.run(
        run_cases(caller, tmp_path / "g.toml", "origin", [first], RunOptions(), lambda _l: None)
    )
    (case,) = result.cases
    assert case.status == "error"
    assert "could not be put back to state 'origin', so case first did not run" in case.message
    assert "runs on as it was" in case.message
    assert not marker.exists()


def test_ctrl_c_stops_the_case_and_puts_the_group_back(tmp_path: Path) -> None:
    """Cancelled mid-case (Ctrl-C), the run stops the case, restores once more, and says so.

    The case is reported as interrupted, with what it printed before; the next
    case never runs.
    """
    caller, hosts = _caller()
    started = tmp_path / "started"
    cases = [
        _case(tmp_path, "long", f"echo 'action: wait'; touch {started}; sleep 60"),
        _case(tmp_path, "next", "true"),
    ]

    async def interrupt() -> object:
        task = asyncio.create_task(
            run_cases(caller, tmp_path / "g.toml", "origin", cases, RunOptions(), lambda _l: None)
        )
        while not started.exists():  # noqa: ASYNC110 (the case, another process, makes it)
            await asyncio.sleep(0.02)
        task.cancel()
        return await task

    result = asyncio.run(interrupt())
    assert result.interrupted  # type: ignore[attr-defined]
    (case,) = result.cases  # type: ignore[attr-defined]
    assert (case.name, case.status) == ("long", "interrupted")
    assert case.message.startswith("case long was stopped by Ctrl-C after")
    assert [line.text for line in case.output] == ["action: wait"]
    assert _restores(hosts) == 2, "one restore for the case, one to put the group back"


def test_the_case_environment_names_the_group_its_hosts_and_vms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A case finds the group file, the state and every host and VM in its environment.

    ``$LOCKSTEP_STATE`` (where lockstep keeps the labs) stays what it was, so
    ``lockstep lab exec`` and ``lab verify`` work inside a case.
    """
    monkeypatch.setenv("LOCKSTEP_STATE", str(tmp_path / "state"))
    env = case_env(_group(), tmp_path / "g.toml", "origin", Case("x", tmp_path / "x"), None)
    assert env["LOCKSTEP_GROUP"] == str((tmp_path / "g.toml").resolve())
    assert (env["LOCKSTEP_FROM_STATE"], env["LOCKSTEP_CASE"]) == ("origin", "x")
    assert env["LOCKSTEP_STATE"] == str(tmp_path / "state")
    assert (env["LOCKSTEP_HOSTS"], env["LOCKSTEP_VMS"]) == ("h1 h2", "p1 s1")
    assert env["LOCKSTEP_HOST_H2"] == "10.0.0.2:7443"
    assert (env["LOCKSTEP_VM_S1_HOST"], env["LOCKSTEP_VM_S1_MAC"]) == ("h2", "52:54:00:00:00:02")
    assert env["PATH"] == os.environ["PATH"]
