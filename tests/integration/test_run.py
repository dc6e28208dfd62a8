"""`lockstep run` on the real lab: each case on the group put back, results people and CI read.

Cases are real shell scripts; the group is the session's lab (4 TCG guests on
2 namespace hosts), put back by real restores; what the guests noticed comes
from their own console logs. The HTML report is opened in headless chromium.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from lockstep.lab.verify import verify_lab
from lockstep.run.report import ROLE_COLOURS
from tests.helpers.browser import bands_of, screenshot
from tests.helpers.signals import sigint_default
from tests.integration.conftest import LOCKSTEP, Lab


def _case(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def _saved(lab: Lab, state: str) -> None:
    proc = lab.cli("save", state, timeout=300)
    assert proc.returncode == 0, proc.stderr
    time.sleep(1.5)  # a restore shows in a guest's log once it logged a line after the save


def test_a_pass_a_failure_and_a_hang_each_from_the_state(fresh: Lab, tmp_path: Path) -> None:
    """Three cases, each after its own restore: passed, failed (exit 3), timeout (stopped at 5 s).

    The passing case sees the group's details in its environment (its VMs and
    their addresses) and the guests noticed nothing in its window; every case
    has its restore's report and its guests' console lines; the JUnit XML
    counts one failure and one error; the HTML report, drawn by chromium,
    shows each case's roles in a picture of its own.
    """
    _saved(fresh, "run-origin")
    cases = tmp_path / "cases"
    _case(cases, "10-pass", 'echo "action: look"; test -n "$LOCKSTEP_VM_P1_IP" && sleep 2')
    _case(cases, "20-fail", "echo 'VIP not on s1' >&2; exit 3")
    _case(cases, "30-hang", "sleep 600")
    junit, html = tmp_path / "junit.xml", tmp_path / "report.html"
    proc = fresh.cli(
        *("run", "--from", "run-origin", str(cases), "--timeout", "5s"),
        *("--junit", str(junit), "--html", str(html), "--json"),
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    run: dict[str, Any] = json.loads(proc.stdout)
    by_name = {c["name"]: c for c in run["cases"]}
    assert {n: c["status"] for n, c in by_name.items()} == {
        "10-pass": "passed",
        "20-fail": "failed",
        "30-hang": "timeout",
    }
    assert by_name["20-fail"]["exit_code"] == 3
    assert 5 <= by_name["30-hang"]["duration_s"] < 30, "stopped at its limit"
    passed = by_name["10-pass"]
    assert passed["noticed"]["ok"] and passed["noticed"]["transitions"] == 0, passed["noticed"]
    for case in run["cases"]:
        assert (
            case["restore"]["operation"] == "restore" and case["restore"]["state"] == "run-origin"
        )
        assert sorted(case["console"]) == ["p1", "p2", "s1", "s2"]
        assert all(case["console"][vm] for vm in case["console"]), f"{case['name']}: no lines"
    suite = ET.parse(junit).getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    image = screenshot(html, tmp_path / "report.png")
    primary = bands_of(image, [ROLE_COLOURS["primary"]])
    assert len(primary) == 3, f"a picture with primaries per case; bands at rows {primary}"


def test_ctrl_c_stops_the_case_and_puts_the_group_back(fresh: Lab, tmp_path: Path) -> None:
    """SIGINT while a case runs: the case is stopped, the group restored, exit status 130.

    The case stops every VM of the group (`lockstep down`) and then waits; after
    the Ctrl-C every VM runs again, and the guests' logs show two restores in
    the run's window (before the case, and after the interrupt).
    """
    _saved(fresh, "run-ctrlc")
    marks = {vm: len(fresh.console(vm).encode()) for vm in fresh.group.vms}
    pidfile = tmp_path / "case.pid"
    case = _case(tmp_path / "cases", "10-down", f"echo $$ > {pidfile}; lockstep down; sleep 600")
    env = {**os.environ, "PATH": f"{LOCKSTEP.parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [
            str(LOCKSTEP),
            "-g",
            str(fresh.group_file),
            "run",
            "--from",
            "run-ctrlc",
            str(case),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=sigint_default,
    )
    deadline = time.monotonic() + 300
    while not _all_down(fresh):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the case never stopped the group"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (out, err)
    assert "interrupted: putting the group back to state 'run-ctrlc'" in err
    assert [c["status"] for c in json.loads(out)["cases"]] == ["interrupted"]
    case_pid = int(pidfile.read_text())
    assert not Path(f"/proc/{case_pid}").exists(), "the case was stopped"
    status = fresh.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    hosts = json.loads(status.stdout)["hosts"]
    running = {vm["name"]: vm["runstate"] for vms in hosts.values() for vm in vms}
    assert running == dict.fromkeys(fresh.group.vms, "running"), running
    noticed = verify_lab(fresh.name, marks=marks).to_json()
    restores = {v["name"]: v["restores"] for v in noticed["vms"]}
    assert restores == dict.fromkeys(fresh.group.vms, 2), restores


def _all_down(lab: Lab) -> bool:
    status = lab.cli("status", "--json")
    if status.returncode != 0:
        return False
    states = [vm["runstate"] for vms in json.loads(status.stdout)["hosts"].values() for vm in vms]
    return all(s != "running" for s in states)  # stopped VMs may also leave the listing
