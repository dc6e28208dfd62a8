"""Real guests on real lab hosts: the network, and save/restore of memory and disk."""

from __future__ import annotations

import asyncio
import time

from tests.integration.conftest import Lab


def test_guests_on_two_hosts_ping_each_other_across_vxlan(fresh: Lab) -> None:
    """p1 (host h1) and s1 (host h2) ping each other over the VXLAN-joined VM bridges."""
    out_p1 = asyncio.run(fresh.sh("p1", f"ping -c 3 -W 3 {fresh.ip('s1')}", timeout=20))
    out_s1 = asyncio.run(fresh.sh("s1", f"ping -c 3 -W 3 {fresh.ip('p1')}", timeout=20))
    for out in (out_p1, out_s1):
        assert " 0% packet loss" in out, out


def _uptime(text: str) -> float:
    return float(text.split()[0])


def test_save_stop_restore_keeps_memory_and_disk(fresh: Lab) -> None:
    """After `save --stop` and `restore`, a VM continues where it paused.

    Its uptime goes on from the save (the minutes it was gone do not count), a
    file written before the save is there, one written after it is not, and a
    second restore of the same state gives the same result.
    """

    async def run() -> None:
        await fresh.sh("p1", "echo before > /root/before && sync")
        before = _uptime(await fresh.sh("p1", "cat /proc/uptime"))
        async with fresh.caller() as caller:
            saved = await caller.save("disk-memory", stop=True)
            assert {v.name for v in saved.vms} == {"p1", "p2", "s1", "s2"}
            statuses = await caller.status()
            assert all(not r.value for r in statuses.values()), "VMs must be gone after --stop"
            gone_at = time.monotonic()
            await asyncio.sleep(6)
            for attempt in range(2):
                await caller.restore("disk-memory")
                restored_at = time.monotonic()
                up = _uptime(await fresh.sh("p1", "cat /proc/uptime"))
                since_restore = time.monotonic() - restored_at
                # Uptime went on from `before` by at most the time it really ran:
                # the few seconds before the save and since the restore, never the 6 s away.
                assert before <= up < before + 3.0 + since_restore, (attempt, before, up)
                assert time.monotonic() - gone_at > 6
                out = await fresh.sh("p1", "cat /root/before; ls /root")
                assert out.split() == ["before", "before"], out
                await fresh.sh("p1", "echo after > /root/after && sync")

    asyncio.run(run())
