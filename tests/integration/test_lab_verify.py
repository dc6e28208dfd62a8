"""The cluster agent in real lab guests, and ``lockstep lab verify`` reading what they said.

Each test brings up a lab of its own (but for the 1 s/3 s lab, which the
save/restore test and then the idle test share): a unique name ("lsv" + 3
letters) and free subnets in 10.200-10.250, so it never meets a user's or
another session's lab. A fixture finalizer always takes it down; on failure the guests' console
logs are first copied to ``build/test-logs/<lab>/`` and their agent lines are
in the assertion message. Labs are brought up one at a time (2 cores).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lockstep.caller.connect import clients_for
from lockstep.caller.orchestrator import GroupCaller
from lockstep.caller.report import OperationReport
from lockstep.group import GroupSpec
from lockstep.lab.lab import (
    LabOptions,
    bring_up,
    lab_data_dir,
    take_down,
    vm_run_dir,
)
from lockstep.lab.verify import (
    EVERYTHING,
    LAST_RESTORE,
    Since,
    VmInfo,
    lab_vms,
    read_logs,
    verify_lab,
)
from lockstep.proc import run, which
from tests.integration.test_topology import free_subnets

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (namespaces, taps, QEMU)"),
    pytest.mark.skipif(which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64"),
]

IDLE_S = 30.0  # the control case: this long with nothing done to the lab
SETTLE_S = 5.0  # after the last agent started, before the idle window opens
LOGS = Path(__file__).resolve().parents[2] / "build" / "test-logs"


@dataclass
class OwnLab:
    """A lab this test brought up."""

    name: str
    opts: LabOptions
    group: GroupSpec
    data: Path

    def verify(self, since: Since = EVERYTHING) -> dict[str, Any]:
        """``lockstep lab verify --json`` of this lab, as a dict."""
        return verify_lab(self.name, since).to_json()

    def group_operation(self, operation: str, state: str) -> str:
        """``lockstep save STATE`` or ``restore STATE`` on this lab; its figures, for messages."""

        async def act() -> OperationReport:
            clients = clients_for(self.group)
            try:
                caller = GroupCaller(self.group, clients)
                if operation == "save":
                    return await caller.save(state)
                return await caller.restore(state)
            finally:
                for c in clients.values():
                    await c.close()

        d = asyncio.run(act()).to_json()
        held = {v["name"]: (v["frames_held"], v["frames_delivered"]) for v in d["vms"]}
        return (
            f"{operation} {state}: pause skew {d.get('pause_skew_ms')} ms, resume skew "
            f"{d.get('resume_skew_ms')} ms, frames (held, delivered) {held}, "
            f"dropped {d['frames_dropped']}"
        )

    def vms(self) -> list[VmInfo]:
        """The VMs as ``lab up`` placed them."""
        return lab_vms(self.data)

    def explain(self, report: dict[str, Any]) -> str:
        """An assertion message: the figures, then every guest's agent lines (no stats)."""
        lines = [f"lab {self.name}: {_figures(report)}", f"load: {_loadavg()}"]
        for vm, text in read_logs(self.data, self.vms()).items():
            agent = [raw for raw in text.splitlines() if '{"t":' in raw and "_stats" not in raw]
            lines += [f"--- {vm} ({len(agent)} lines, last 40):", *agent[-40:]]
        return "\n".join(lines)


def _figures(d: dict[str, Any]) -> str:
    keys = ("transitions", "split_brain", "lost", "duplicated", "reordered", "received")
    gaps = {v["name"]: v["heartbeat_gap_max_s"] for v in d["vms"]}
    misses = {v["name"]: v["heartbeat_misses"] for v in d["vms"]}
    counts = ", ".join(f"{k} {d[k]}" for k in keys)
    return f"{counts}; heartbeat gap max {gaps}; heartbeat misses {misses}"


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def _unused_name() -> str:
    """A lab name, "lsv" + 3 random letters, naming no namespace or lab dir yet."""
    taken = run(["ip", "netns", "list"]).text
    for _ in range(50):
        name = "lsv" + "".join(random.choices(string.ascii_lowercase, k=3))
        if f"{name}-" not in taken and not lab_data_dir(name).parent.exists():
            return name
    pytest.skip("found no unused lab name")


def _bring_up(folder: Path, **options: Any) -> OwnLab:
    """A lab of these options, under an unused name and free subnets."""
    name = _unused_name()
    lan, vms = free_subnets()
    opts = LabOptions(
        name=name, lan_subnet=lan, vm_subnet=vms, group_file=folder / f"{name}.toml", **options
    )
    group = asyncio.run(bring_up(opts))
    return OwnLab(name, opts, group, lab_data_dir(name))


def _take_down(name: str, *, keep_logs: bool) -> None:
    """Take lab ``name`` down (if it was made); with ``keep_logs`` its consoles are kept first."""
    data = lab_data_dir(name)
    if keep_logs and data.exists():
        dest = LOGS / name
        shutil.rmtree(dest, ignore_errors=True)
        for log in data.glob("hosts/*/root/run/*/console.log"):
            target = dest / log.relative_to(data)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(log, target)
    if data.parent.exists():
        asyncio.run(take_down(name))


@pytest.fixture
def own_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., OwnLab]]:
    """Factory: bring up a lab with these options; always taken down, logs kept on failure."""
    made: list[OwnLab] = []
    failed_before = request.session.testsfailed

    def make(**options: Any) -> OwnLab:
        made.append(_bring_up(tmp_path, **options))
        return made[-1]

    yield make
    for lab in made:
        _take_down(lab.name, keep_logs=request.session.testsfailed > failed_before)


@pytest.fixture(scope="module")
def steady_lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OwnLab]:
    """The lab at the agent's 1 s/3 s, for the tests of this module in order.

    The save/restore test has it first; the idle test kills a primary at
    its end, last. One boot instead of two.
    """
    failed_before = request.session.testsfailed
    lab = _bring_up(tmp_path_factory.mktemp("steady"), heartbeat=1.0, timeout=3.0)
    yield lab
    _take_down(lab.name, keep_logs=request.session.testsfailed > failed_before)


def _wait_for(
    lab: OwnLab, done: Callable[[dict[str, Any]], bool], seconds: float
) -> dict[str, Any]:
    """Verify every half second until ``done`` says yes or ``seconds`` pass; the last report."""
    deadline = time.monotonic() + seconds
    while True:
        report = lab.verify()
        if done(report) or time.monotonic() > deadline:
            return report
        time.sleep(0.5)


def test_save_and_restore_go_unnoticed(steady_lab: OwnLab) -> None:
    """A save (VMs go on) and a restore to it, at 1 s/3 s: the guests notice nothing.

    Since the restore: nothing at all (``lab verify`` says ok). Over the whole
    log, the save included: no takeover, no split brain, no stream packet lost
    or duplicated. (The lab's first test: its whole log is this test's.)
    """
    lab = steady_lab
    time.sleep(10)
    saved = lab.group_operation("save", "base")
    time.sleep(5)
    restored = lab.group_operation("restore", "base")
    time.sleep(10)
    everything, since = lab.verify(), lab.verify(Since(LAST_RESTORE))
    print(f"\n{saved}\n{restored}")
    print(f"whole log: {_figures(everything)}\nsince the restore: {_figures(since)}")
    why = f"{saved}\n{restored}\n{lab.explain(since)}"
    assert all(v["restores"] == 1 for v in since["vms"]), why
    assert since["ok"], why
    # Over the save's own window too: nothing lost, duplicated or taken over.
    # (A packet or two reordered at the freeze's lift is reported, not failed.)
    noticed = {k: everything[k] for k in ("transitions", "split_brain", "lost", "duplicated")}
    assert set(noticed.values()) == {0}, f"the save's freeze: {_figures(everything)}; {saved}"


@pytest.mark.parametrize(
    ("heartbeat", "timeout"), [(1.0, 3.0), (0.1, 0.3)], ids=["1s-3s", "100ms-300ms"]
)
def test_idle_lab_notices_nothing_then_a_killed_primary_is_taken_over(
    request: pytest.FixtureRequest,
    own_lab: Callable[..., OwnLab],
    heartbeat: float,
    timeout: float,
) -> None:
    """Control case, then a real failure, both as the guests tell it.

    Idle for IDLE_S seconds with no save or restore: no takeover, no split
    brain, nothing lost, duplicated or reordered, every guest in the role it
    started in, while every stream carried packets (so a quiet report is not a
    dead lab). The window opens SETTLE_S after the last agent started: the lab
    is not idle while guests still boot (seen here: a 0.39 s heartbeat gap while
    another lab booted on the same 2 cores). Then p1's QEMU is killed: its
    standby s1 takes over after the timeout, and nothing else changes role.
    At 1 s/3 s the lab is the one the save/restore test used before.
    """
    if (heartbeat, timeout) == (1.0, 3.0):
        lab: OwnLab = request.getfixturevalue("steady_lab")
    else:
        lab = own_lab(heartbeat=heartbeat, timeout=timeout)
    _wait_for(lab, lambda d: all(v["lines"] for v in d["vms"]), 120)
    time.sleep(SETTLE_S)
    window = Since("time", time.time())  # guests' clocks follow the host's until a pause
    time.sleep(IDLE_S)
    idle, whole = lab.verify(window), lab.verify()
    print(f"\nidle {IDLE_S:.0f} s at {heartbeat:g}/{timeout:g} s: {_figures(idle)}")
    print(f"whole log, boot included: {_figures(whole)}; load {_loadavg()}")
    why = lab.explain(idle)
    assert not idle["warnings"], why
    quiet = {k: idle[k] for k in ("transitions", "split_brain", "lost", "duplicated", "reordered")}
    assert quiet == dict.fromkeys(quiet, 0), why
    assert idle["ok"], why
    roles = {vm: role for p in idle["pairs"] for vm, role in p["roles_now"].items()}
    assert roles == {v.name: v.role for v in lab.vms()}, why
    assert len(idle["streams"]) == 12, why  # every guest hears every other guest
    floor = 0.3 * lab.opts.stream_rate * IDLE_S
    assert all(s["received"] > floor for s in idle["streams"]), why

    pid = int((vm_run_dir(lab.data, "h1", "p1") / "qemu.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    _wait_for(lab, lambda d: d["transitions"] > 0, timeout + 20)
    time.sleep(2 * timeout)  # room for any second, wrong, takeover to show
    after = lab.verify(window)
    why = lab.explain(after)
    pairs = {p["pair"]: p for p in after["pairs"]}
    assert pairs["p1/s1"]["transitions"] == 1, why
    assert pairs["p1/s1"]["roles_now"]["s1"] == "primary", why
    assert pairs["p2/s2"]["transitions"] == 0 and after["split_brain"] == 0, why
    s1 = next(v for v in after["vms"] if v["name"] == "s1")
    # The agent takes over once the silence reaches the timeout, and logs it in ms.
    assert s1["transitions"][0]["silent_s"] >= timeout, why
