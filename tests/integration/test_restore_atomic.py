"""A restore that cannot finish leaves the group as it was: verified first, then switched to.

On the real lab: a damaged state is refused before anything changes (the same
QEMU processes run, in the same runstates), a QEMU that dies while loading a
state leaves the running group alone, and a restore that succeeds swaps every
VM for a new one at one switch-over.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lockstep.errors import OperationFailed
from lockstep.lab.lab import host_root
from lockstep.vm.machine import ANNOUNCE_ROUNDS
from tests.integration.conftest import Lab
from tests.integration.test_faults import armed


def _vms(lab: Lab) -> dict[str, tuple[str, int | None]]:
    """Every VM of the group: (runstate, QEMU pid)."""

    async def look() -> dict[str, tuple[str, int | None]]:
        async with lab.caller() as caller:
            results = await caller.status()
        return {s.name: (s.runstate, s.pid) for r in results.values() for s in (r.value or [])}

    return asyncio.run(look())


def _save(lab: Lab, name: str) -> None:
    async def save() -> None:
        async with lab.caller() as caller:
            await caller.save(name)

    asyncio.run(save())


def _restore(lab: Lab, name: str) -> None:
    async def restore() -> None:
        async with lab.caller() as caller:
            await caller.restore(name)

    asyncio.run(restore())


def _file(lab: Lab, state: str, host: str, name: str) -> Path:
    return host_root(lab.data, host) / "states" / state / name


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(100_000)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE: dict[str, tuple[str, str, Callable[[Path], None], str]] = {
    "truncated device state": (
        "h2",
        "s1.mem",
        _truncate,
        r"VM s1's device state \S+/s1\.mem has 100000 bytes, not the \d+ committed",
    ),
    "changed frames": (
        "h1",
        "p1.nic0.pcap",
        _flip_a_byte,
        r"VM p1's held frames \S+/p1\.nic0\.pcap does not match its checksum",
    ),
    "missing RAM image": ("h2", "s2.ram", Path.unlink, r"VM s2's RAM image \S+/s2\.ram is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_state_is_refused_before_any_vm_changes(own_ram: Lab, damage: str) -> None:
    """A state with one damaged file on one host is refused, naming host, VM and file.

    The state is saved by the fast path (device state and a RAM image per
    VM), then one file is damaged. The restore's preflight checks every file
    of the state on every host against its manifest; it refuses in one
    sentence, and the same QEMU processes run as before, in the same runstates.
    """
    host, name, spoil, message = DAMAGE[damage]
    state = f"dmg-{secrets.token_hex(3)}"
    _save(own_ram, state)
    path = _file(own_ram, state, host, name)
    assert path.exists(), f"the fast path keeps {name} on {host}"
    spoil(path)
    before = _vms(own_ram)
    with pytest.raises(OperationFailed, match=rf"on host {host} is damaged: {message}") as info:
        _restore(own_ram, state)
    assert "nothing was changed" in str(info.value)
    assert "\n" not in str(info.value)
    assert _vms(own_ram) == before


def test_a_qemu_dying_while_loading_leaves_the_group_running_unchanged(fresh: Lab) -> None:
    """h2's new QEMUs die while loading the state: the restore fails, the group runs on as it was.

    The VMs being prepared are discarded on every host; the VMs that ran
    before still run (same QEMU pids, running) and their guests answer.
    """
    state = f"die-{secrets.token_hex(3)}"
    _save(fresh, state)
    before = _vms(fresh)
    with (
        armed(fresh, "h2", "prepare_restore:load:kill-qemu"),
        pytest.raises(OperationFailed, match="host h2") as info,
    ):
        _restore(fresh, state)
    assert "runs on as it was" in str(info.value), str(info.value)
    assert _vms(fresh) == before
    assert all(runstate == "running" for runstate, _ in before.values())
    for vm in before:
        asyncio.run(fresh.sh(vm, "true"))
    leftovers = list(fresh.data.glob("hosts/*/root/restoring/*/*"))
    assert leftovers == [], f"prepared VMs left behind: {leftovers}"


def test_a_restore_switches_every_vm_over_at_one_instant(any_driver: Lab) -> None:
    """A restore runs new QEMUs in place of the old ones, switched over in one go, on either driver.

    Every VM has a new QEMU pid; its report has the old VM's pause and the
    new VM's resume, the resume after the pause; and nothing of the restore
    is left in its own folders. (The switch-over's length is measured by
    bench.restore and bench.skew, not asserted here.)
    """
    fresh = any_driver
    state = f"sw-{secrets.token_hex(3)}"
    _save(fresh, state)
    before = _vms(fresh)

    async def restore() -> list[tuple[str, float | None, float | None]]:
        async with fresh.caller() as caller:
            report = await caller.restore(state)
        return [(v.name, v.paused_at, v.resumed_at) for v in report.vms]

    lines = asyncio.run(restore())
    after = _vms(fresh)
    assert sorted(after) == sorted(before)
    for vm, (runstate, pid) in after.items():
        assert runstate == "running" and pid != before[vm][1], (vm, before[vm], (runstate, pid))
    for vm, paused, resumed in lines:
        assert paused is not None and resumed is not None and paused < resumed, (vm, lines)
    assert list(fresh.data.glob("hosts/*/root/restoring/*/*")) == []
    for vm in after:
        asyncio.run(fresh.sh(vm, "true"))


def test_a_prepared_vm_says_nothing_on_the_network_before_the_switch_over(
    fresh: Lab, tmp_path: Path
) -> None:
    """No frame from a VM's new QEMU reaches the bridge before that VM's resume instant.

    QEMU announces a VM whose memory it has just loaded (RARP, several rounds)
    even while it stays paused; from a restore's prepared VM, beside the
    running one, that would teach the bridge the running VM's MAC on the new,
    frozen tap. So lockstep turns that announcement off and announces each VM
    after its resume instead: a capture on h1's VM bridge over a restore sees
    every RARP of h1's VMs after their resume, and at least one each (the
    running VMs' own announcement after the save, from the same MACs, is over
    before the capture starts).
    """
    state = f"ann-{secrets.token_hex(3)}"
    _save(fresh, state)
    # The save announced the running VMs after their resume, from the same MACs:
    # the capture starts once those rounds are over.
    r = ANNOUNCE_ROUNDS
    gaps = [min(r["initial"] + i * r["step"], r["max"]) for i in range(r["rounds"])]
    time.sleep(sum(gaps) / 1000 + 1.0)
    bridge = fresh.group.networks["lan"].bridge
    assert bridge is not None
    macs = {spec.nics[0].mac: vm for vm, spec in fresh.group.vms.items() if spec.host == "h1"}
    pcap = tmp_path / "h1.pcap"
    capture = ["tcpdump", "-i", bridge, "-nn", "-U", "--time-stamp-precision=micro"]
    dump = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            f"{fresh.name}-h1",
            *capture,
            "-w",
            str(pcap),
            "ether proto 0x8035",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(2)  # tcpdump is listening

        async def restore() -> dict[str, float | None]:
            async with fresh.caller() as caller:
                report = await caller.restore(state)
            return {v.name: v.resumed_at for v in report.vms}

        resumed = asyncio.run(restore())
        time.sleep(3)  # announce-self's rounds: 50 ms, then 150, 250, 350, 450 ms apart
    finally:
        dump.terminate()
        dump.wait(timeout=30)
    out = subprocess.run(
        ["tcpdump", "-r", str(pcap), "-nn", "-e", "-tt"], capture_output=True, text=True, check=True
    ).stdout
    seen: dict[str, list[float]] = {vm: [] for vm in macs.values()}
    for line in out.splitlines():
        t, src = line.split()[:2]
        if src in macs:
            seen[macs[src]].append(float(t))
    for vm, times in seen.items():
        at = resumed[vm]
        assert at is not None
        assert times, f"{vm}: no announcement after its resume"
        early = [round(at - t, 3) for t in times if t < at - 0.002]
        assert not early, f"{vm}: RARPs {early} s before its resume at {at}"
