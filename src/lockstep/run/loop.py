"""The loop: for every case, put the group back to the state, run the case, collect what happened.

A case never runs on a half-restored group: if the restore fails, the case is
an error and did not run (the restore itself left the group as it was). What
the group noticed in the case's window comes from ``lockstep lab verify`` on
the embedded lab, or from a check command the user names (run after the
case, with the same environment). Ctrl-C stops the case running, puts the
group back to the state once more, and ends the run with what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockstep.caller.orchestrator import GroupCaller
from lockstep.errors import LockstepError
from lockstep.group import GroupSpec
from lockstep.lab.lab import lab_data_dir
from lockstep.lab.verify import console_since, log_marks, verify_lab
from lockstep.run.cases import Case
from lockstep.run.execute import Outcome, execute
from lockstep.run.results import CaseResult, RunResult

__all__ = ["RunOptions", "case_env", "lab_of", "run_cases"]

Say = Callable[[str], None]
_CONSOLE_LINES = 400  # console lines kept per VM and case


@dataclass(frozen=True)
class RunOptions:
    """How cases run: their time limit, a check command (outside the lab), a deep verify."""

    timeout: float = 600.0
    check: Sequence[str] = ()
    verify: bool = False


class _Interrupted(Exception):
    """Ctrl-C while a case ran: the case, stopped, with what it printed until then."""

    def __init__(self, case: CaseResult) -> None:
        super().__init__(case.message)
        self.case = case


def _key(name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


def case_env(
    group: GroupSpec, group_file: Path, state: str, case: Case, lab: str | None
) -> dict[str, str]:
    """The environment a case runs in: this process's, plus the group's details.

    ``LOCKSTEP_GROUP`` (the group file: ``lockstep`` commands work as they
    are), ``LOCKSTEP_FROM_STATE``, ``LOCKSTEP_CASE``, ``LOCKSTEP_HOSTS`` and
    ``LOCKSTEP_VMS`` (space-separated), ``LOCKSTEP_HOST_<H>`` (its execd's
    address), ``LOCKSTEP_VM_<VM>_HOST`` and ``LOCKSTEP_VM_<VM>_MAC`` (its first
    NIC); on the lab also ``LOCKSTEP_LAB`` and ``LOCKSTEP_VM_<VM>_IP``. Names
    are upper-cased with anything but letters and digits as ``_``.
    """
    env = dict(os.environ)
    env.update(
        {
            "LOCKSTEP_GROUP": str(group_file.resolve()),
            "LOCKSTEP_FROM_STATE": state,
            "LOCKSTEP_CASE": case.name,
            "LOCKSTEP_HOSTS": " ".join(sorted(group.hosts)),
            "LOCKSTEP_VMS": " ".join(sorted(group.vms)),
        }
    )
    for name, host in group.hosts.items():
        env[f"LOCKSTEP_HOST_{_key(name)}"] = host.address
    for name, vm in group.vms.items():
        env[f"LOCKSTEP_VM_{_key(name)}_HOST"] = vm.host
        if vm.nics:
            env[f"LOCKSTEP_VM_{_key(name)}_MAC"] = vm.nics[0].mac
    if lab is not None:
        env["LOCKSTEP_LAB"] = lab
        for name, ip in _lab_addresses(lab).items():
            env[f"LOCKSTEP_VM_{_key(name)}_IP"] = ip
    return env


def _lab_addresses(lab: str) -> dict[str, str]:
    try:
        placed = json.loads((lab_data_dir(lab) / "lab.json").read_text())["vms"]
        return {str(v["name"]): str(v["ip"]) for v in placed}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


async def _check(command: Sequence[str], env: Mapping[str, str]) -> dict[str, Any]:
    """Run the user's check command; its exit status and output."""
    started = time.time()
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
        )
    except OSError as exc:
        return {"check": list(command), "ok": False, "error": str(exc)}
    out, _ = await proc.communicate()
    return {
        "check": list(command),
        "ok": proc.returncode == 0,
        "exit_code": proc.returncode,
        "output": out.decode("utf-8", "replace").splitlines()[-_CONSOLE_LINES:],
        "duration_s": time.time() - started,
    }


def _verdict(case: Case, outcome: Outcome, timeout: float) -> tuple[str, str]:
    if outcome.timed_out:
        return "timeout", f"case {case.name} did not end within {timeout:g} s and was stopped"
    if outcome.exit_code == 0:
        return "passed", ""
    return "failed", f"case {case.name} exited with status {outcome.exit_code}"


async def _one(
    caller: GroupCaller,
    group_file: Path,
    state: str,
    case: Case,
    options: RunOptions,
    lab: str | None,
    say: Say,
) -> CaseResult:
    marks = log_marks(lab) if lab is not None else {}
    say(f"{case.name}: restoring state {state!r}")
    began = time.time()
    try:
        restored = await caller.restore(state, verify=options.verify)
    except LockstepError as exc:
        return CaseResult(
            case.name,
            str(case.path),
            "error",
            message=f"the group could not be put back to state {state!r}, so case"
            f" {case.name} did not run: {exc}",
            reset_s=time.time() - began,
        )
    env = case_env(caller.group, group_file, state, case, lab)
    say(f"{case.name}: running (restore took {restored.duration_s:.2f} s)")
    outcome = Outcome(started=time.time())

    def ran(status: str, message: str, **more: Any) -> CaseResult:
        return CaseResult(
            case.name,
            str(case.path),
            status,  # type: ignore[arg-type]
            message=message,
            exit_code=outcome.exit_code,
            started=outcome.started,
            duration_s=outcome.duration,
            reset_s=restored.duration_s,
            restore=restored.to_json(),
            output=outcome.lines,
            dropped=outcome.dropped,
            **more,
        )

    try:
        await execute(case, env, options.timeout, outcome)
    except asyncio.CancelledError:
        outcome.ended = outcome.ended or time.time()
        stopped = f"case {case.name} was stopped by Ctrl-C after {outcome.duration:.1f} s"
        raise _Interrupted(ran("interrupted", stopped)) from None
    except OSError as exc:
        outcome.ended = time.time()
        return ran("error", f"case {case.name} could not be started: {exc}")
    status, message = _verdict(case, outcome, options.timeout)
    if lab is not None:
        noticed: dict[str, Any] | None = verify_lab(lab, marks=marks).to_json()
        console = console_since(lab, marks, _CONSOLE_LINES)
    else:
        noticed = await _check(options.check, env) if options.check else None
        console = {}
    say(f"{case.name}: {status} in {outcome.duration:.2f} s")
    return ran(status, message, noticed=noticed, console=console)


def lab_of(group: GroupSpec) -> str | None:
    """The embedded lab's name when ``group`` is one (its data folder exists), else None."""
    return group.name if lab_data_dir(group.name).exists() else None


async def run_cases(
    caller: GroupCaller,
    group_file: Path,
    state: str,
    cases: Sequence[Case],
    options: RunOptions,
    say: Say,
) -> RunResult:
    """Run every case from ``state``; Ctrl-C ends the run after putting the group back.

    Raises:
        LockstepError: a lab's logs could not be read.
    """
    lab = lab_of(caller.group)
    result = RunResult(caller.group.name, state, started=time.time())
    try:
        for case in cases:
            result.cases.append(await _one(caller, group_file, state, case, options, lab, say))
    except (asyncio.CancelledError, _Interrupted) as exc:
        if isinstance(exc, _Interrupted):
            result.cases.append(exc.case)
        result.interrupted = True
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        say(f"interrupted: putting the group back to state {state!r} (Ctrl-C again to stop now)")
        with contextlib.suppress(LockstepError):
            await caller.restore(state)
    result.duration_s = time.time() - result.started
    return result
