"""The real lab, shared by the integration tests (booting guests under TCG is slow).

One lab per test session: 2 hosts as namespaces, 4 VMs (p1, p2 on h1; s1, s2
on h2), h2's execd with its clock 2.5 s wrong so every operation exercises clock
sync. Its own name and subnets, so it never touches a user's lab. It is always
taken down, and on any failure the guests' console logs and execd logs are
copied to ``build/test-logs/`` next to the report.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from lockstep.caller.orchestrator import GroupCaller
from lockstep.group import GroupSpec, load_group
from lockstep.lab.guestctl import GuestControl
from lockstep.lab.lab import LabOptions, bring_up, clients_for, guest, lab_data_dir, take_down
from lockstep.proc import which

LAB_NAME = "lsit"
LOGS = Path(__file__).resolve().parents[2] / "build" / "test-logs"


def _skip_unless_lab_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (namespaces, taps, QEMU)")
    if which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (run `make setup`)")


@dataclass
class Lab:
    """A running lab and handy ways into it."""

    name: str
    group: GroupSpec
    group_file: Path
    data: Path

    @asynccontextmanager
    async def caller(self) -> AsyncIterator[GroupCaller]:
        """A caller over real gRPC + mutual TLS (create inside the test's event loop)."""
        clients = clients_for(self.group)
        try:
            yield GroupCaller(self.group, clients)
        finally:
            for c in clients.values():
                await c.close()

    def guest(self, vm: str) -> GuestControl:
        """The control channel of guest ``vm``."""
        return guest(self.group, vm, self.data)

    async def sh(self, vm: str, command: str, timeout: float = 30.0) -> str:
        """Run ``command`` in guest ``vm``; fail the test if it exits non-zero."""
        async with self.guest(vm) as ctl:
            rc, out = await ctl.run(command, timeout=timeout)
        assert rc == 0, f"{vm}: `{command}` exited {rc}: {out}"
        return out

    def console(self, vm: str) -> str:
        """Guest ``vm``'s console log so far."""
        host = self.group.vms[vm].host
        path = self.data / "hosts" / host / "root" / "run" / vm / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _keep_logs(data: Path, name: str) -> None:
    dest = LOGS / name
    shutil.rmtree(dest, ignore_errors=True)
    for log in list(data.glob("hosts/*/root/run/*/console.log")) + list(
        data.glob("hosts/*/execd.log")
    ):
        target = dest / log.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, target)


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The session's lab: up once, down at the end whatever happened."""
    _skip_unless_lab_possible()
    work = Path(tempfile.mkdtemp(prefix="lockstep-it-"))
    opts = LabOptions(
        name=LAB_NAME,
        clock_offsets={"h2": 2.5},
        group_file=work / "lockstep.toml",
        lan_subnet="10.127.0.0/24",
        vm_subnet="10.128.0.0/24",
    )
    data = lab_data_dir(LAB_NAME)
    if data.parent.exists():  # a crashed earlier session
        asyncio.run(take_down(LAB_NAME))
    try:
        group = asyncio.run(bring_up(opts))
        yield Lab(LAB_NAME, group, opts.group_file, data)
    finally:
        if request.session.testsfailed and data.exists():
            _keep_logs(data, LAB_NAME)
        if data.parent.exists():
            asyncio.run(take_down(LAB_NAME))
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def fresh(lab: Lab) -> Lab:
    """The lab with every VM running (tests may stop or replace VMs)."""

    async def up() -> None:
        async with lab.caller() as caller:
            await caller.up()
        from lockstep.lab.lab import wait_guests

        await wait_guests(lab.group, lab.data)

    asyncio.run(up())
    return lab


def reload(lab: Lab) -> GroupSpec:
    """The lab's group file, read again."""
    return load_group(lab.group_file)
