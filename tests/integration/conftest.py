"""The real lab, shared by the integration tests (booting guests under TCG is slow).

One lab per test session: 2 hosts as namespaces, 4 VMs (p1, p2 on h1; s1, s2
on h2) with two disks each (the root disk and an empty data disk), h2's execd with its clock 2.5 s wrong so every operation exercises clock
sync; and, once a test asks for it, one in libvirt mode (``lvlab``: p1 and
s1 as domains of a libvirtd per host). Tests that hold for both drivers take
``any_driver`` and run on each lab. A lab's name and subnets are picked anew for each session (free ones), so it
never touches a user's lab nor another test session's. It is always
taken down (unless ``LOCKSTEP_KEEP_LAB=1``, for debugging), and on any failure
the guests' console logs and execd logs are copied to ``build/test-logs/``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import secrets
import shutil
import string
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.common import free_subnets
from lockstep.caller.connect import clients_for
from lockstep.caller.orchestrator import GroupCaller
from lockstep.group import GroupSpec, load_group
from lockstep.lab.guestctl import GuestControl
from lockstep.lab.lab import (
    LabOptions,
    bring_up,
    guest,
    lab_data_dir,
    take_down,
    vm_run_dir,
    wait_guests,
)
from lockstep.proc import which

LOGS = Path(__file__).resolve().parents[2] / "build" / "test-logs"
LOCKSTEP = Path(sys.executable).parent / "lockstep"  # the venv's command


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
        """A caller over real gRPC + mutual TLS (create inside the test's event loop).

        Its skew budget is wide: on this small shared machine clock delays of a
        few ms are normal; the budget's refusal is tested on its own.
        """
        clients = clients_for(self.group)
        try:
            yield GroupCaller(self.group, clients, skew_budget=0.05)
        finally:
            for c in clients.values():
                await c.close()

    def ip(self, vm: str) -> str:
        """Guest ``vm``'s address on the VM network, as the lab planned it (either driver)."""
        planned = json.loads((self.data / "lab.json").read_text())["vms"]
        return next(str(v["ip"]) for v in planned if v["name"] == vm)

    def guest(self, vm: str) -> GuestControl:
        """The control channel of guest ``vm``."""
        return guest(self.group, vm, self.data)

    async def sh(self, vm: str, command: str, timeout: float = 30.0) -> str:
        """Run ``command`` in guest ``vm``; fail the test if it exits non-zero."""
        async with self.guest(vm) as ctl:
            rc, out = await ctl.run(command, timeout=timeout)
        assert rc == 0, f"{vm}: `{command}` exited {rc}: {out}"
        return out

    def cli(
        self, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``lockstep -g GROUP ARGS...`` as a user runs it (its exit status is the caller's)."""
        return subprocess.run(
            [str(LOCKSTEP), "-g", str(self.group_file), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )

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


def _free_subnets() -> tuple[str, str]:
    """Two /24s in 10.160-10.239 that no route of this machine overlaps."""
    return free_subnets(160, 240)


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The session's lab: up once, down at the end whatever happened."""
    _skip_unless_lab_possible()
    yield from lab_of(request, "lsit", clock_offsets={"h2": 2.5}, disks=2)


def lab_of(request: pytest.FixtureRequest, prefix: str, **options: Any) -> Iterator[Lab]:
    """A lab named ``prefix`` + 3 letters, on free subnets, with ``options``; always taken down.

    On a failure of the session the guests' console logs and the execd logs
    are kept first (``build/test-logs/``).
    """
    name = prefix + "".join(random.choices(string.ascii_lowercase, k=3))
    lan, vms = _free_subnets()
    work = Path(tempfile.mkdtemp(prefix="lockstep-it-"))
    opts = LabOptions(
        name=name,
        group_file=work / "lockstep.toml",
        lan_subnet=lan,
        vm_subnet=vms,
        **options,
    )
    data = lab_data_dir(name)
    try:
        group = asyncio.run(bring_up(opts))
        yield Lab(name, group, opts.group_file, data)
    finally:
        if request.session.testsfailed and data.exists():
            _keep_logs(data, name)
        if data.parent.exists() and not os.environ.get("LOCKSTEP_KEEP_LAB"):
            asyncio.run(take_down(name))
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def lvlab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The session's libvirt lab: p1 on h1 and s1 on h2, domains of a libvirtd per host.

    Each domain has two disks of its own (a qcow2 root over the guest image,
    an empty qcow2 data disk); h2's execd clock is 2.5 s wrong.
    """
    _skip_unless_lab_possible()
    if importlib.util.find_spec("libvirt") is None:
        pytest.skip("libvirt-python is not installed (run `make setup`)")
    options = {"vms": 2, "disks": 2, "driver": "libvirt", "clock_offsets": {"h2": 2.5}}
    yield from lab_of(request, "lslv", **options)


def _every_vm_up(lab: Lab) -> Lab:
    async def up() -> None:
        async with lab.caller() as caller:
            await caller.up()
        await wait_guests(lab.group, lab.data)

    asyncio.run(up())
    return lab


@pytest.fixture
def fresh(lab: Lab) -> Lab:
    """The lab with every VM running (tests may stop or replace VMs)."""
    return _every_vm_up(lab)


@pytest.fixture(params=["qemu", "libvirt"])
def any_driver(request: pytest.FixtureRequest) -> Lab:
    """The QEMU driver's lab, then the libvirt one, every VM running: a test for both drivers."""
    return _every_vm_up(request.getfixturevalue("lab" if request.param == "qemu" else "lvlab"))


def runtime_of(lab: Lab, vm: str) -> dict[str, object]:
    """Guest ``vm``'s runtime record, as its execd keeps it (``vm.json``)."""
    folder = vm_run_dir(lab.data, lab.group.vms[vm].host, vm)
    data: dict[str, object] = json.loads((folder / "vm.json").read_text())
    return data


@pytest.fixture
def own_ram(fresh: Lab) -> Lab:
    """The lab with every VM on a RAM file of its own, so its next save can be fast.

    A VM restored without reflink maps a state's image privately (an earlier
    test may have left it so); a save (standard) and restore moves it back.
    """
    if all(runtime_of(fresh, vm)["ram_shared"] for vm in fresh.group.vms):
        return fresh

    async def cycle() -> None:
        name = f"own-ram-{secrets.token_hex(3)}"
        async with fresh.caller() as caller:
            await caller.save(name)
            await caller.restore(name)

    asyncio.run(cycle())
    if not all(runtime_of(fresh, vm)["ram_shared"] for vm in fresh.group.vms):
        # Still mapped privately somewhere: fresh VMs always boot on RAM of their own.
        async def reboot() -> None:
            async with fresh.caller() as caller:
                await caller.down()
                await caller.up()
            await wait_guests(fresh.group, fresh.data)

        asyncio.run(reboot())
    assert all(runtime_of(fresh, vm)["ram_shared"] for vm in fresh.group.vms)
    return fresh


def reload(lab: Lab) -> GroupSpec:
    """The lab's group file, read again."""
    return load_group(lab.group_file)


def _session_lab(item: pytest.Item) -> str | None:
    """Which session lab ``item`` runs on: "lab" (QEMU), "lvlab" (libvirt), or None (its own)."""
    callspec: Any = getattr(item, "callspec", None)
    driver = callspec.params.get("any_driver") if callspec is not None else None
    if driver is not None:
        return "lab" if driver == "qemu" else "lvlab"
    info: Any = getattr(item, "_fixtureinfo", None)
    for name, fixture in (("lab", lab), ("lvlab", lvlab)):
        defs: Any = info.name2fixturedefs.get(name) if info is not None else None
        if defs and defs[-1].func is getattr(fixture, "__wrapped__", fixture):
            return name
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything in this folder needs the real lab: mark it `integration`.

    Tests that bring their own VMs (or none) run before the session's labs
    come up, then those on the QEMU lab, then those on the libvirt lab: this
    machine has 2 cores, and two labs of TCG guests on them at once would
    each see the other's load (a lab under test starved by another's guests
    is not what any test means to measure). The QEMU lab stays up (a
    session's) while the libvirt lab's few tests run.
    """
    here = Path(__file__).parent
    ours = [item for item in items if here in Path(str(item.fspath)).parents]
    for item in ours:
        item.add_marker(pytest.mark.integration)
    order = {None: 0, "lab": 1, "lvlab": 2}
    rank = {id(item): order[_session_lab(item)] for item in ours}
    items[:] = sorted(items, key=lambda item: rank.get(id(item), 1))
