"""What a machine outside the group sees after a restore: its ARP cache follows the address back.

The lab's client (namespace ``<lab>-client``, on the guests' L2 segment, in no
group) learns where a virtual address lives from ARP, as a router or a user
would. A restore puts the address back on the VM that had it at the save; the
restored guests' NICs are announced right after they resume (QMP
announce-self: the guest sends gratuitous ARPs for every address it has), so
the client's cache points at that VM again at once, not when its entry expires.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import time
from contextlib import suppress

from lockstep.errors import LockstepError
from lockstep.lab.client import client_mac, client_ping
from tests.integration.conftest import Lab

VIP_INDEX = 200  # the virtual address: .200 of the VM subnet (guests are .11 up, the client .2)
POLL = 0.02  # s between looks at the client's ARP cache


async def until_mac(lab: str, address: str, mac: str, timeout: float) -> float:
    """Wait until lab ``lab``'s client sends ``address`` to ``mac``; when it first did (wall clock)."""
    deadline = time.monotonic() + timeout
    while await client_mac(lab, address) != mac:
        assert time.monotonic() < deadline, (
            f"after {timeout:g} s the client still sends {address} to"
            f" {await client_mac(lab, address)}, not {mac}"
        )
        await asyncio.sleep(POLL)
    return time.time()


def test_client_arp_entry_points_back_at_the_restored_owner_within_1s(fresh: Lab) -> None:
    """A virtual address moved to s1 after a save is p1's again in the client's ARP cache after the restore.

    p1 holds the address and the client talks to it (its entry: p1's MAC);
    save; the address moves to s1, which announces it (arping -U), and the
    client's entry follows (s1's MAC); restore: within 1 s of the restore
    returning the entry is p1's MAC again, though the client sent nothing.
    """
    options = json.loads((fresh.data / "lab.json").read_text())["options"]
    vip = str(ipaddress.ip_network(options["vm_subnet"])[VIP_INDEX])
    lab = fresh.name
    p1_mac, s1_mac = (fresh.group.vms[vm].nics[0].mac for vm in ("p1", "s1"))
    state = f"arp-{secrets.token_hex(3)}"

    async def scenario() -> tuple[float, float, float]:
        try:
            await fresh.sh("p1", f"ip addr add {vip}/24 dev eth0")
            assert await client_ping(lab, vip)
            assert await client_mac(lab, vip) == p1_mac
            async with fresh.caller() as caller:
                await caller.save(state)
                await fresh.sh("p1", f"ip addr del {vip}/24 dev eth0")
                await fresh.sh(
                    "s1", f"ip addr add {vip}/24 dev eth0 && arping -U -c 1 -I eth0 {vip}"
                )
                await until_mac(lab, vip, s1_mac, timeout=5)
                assert await client_ping(lab, vip)
                watch = asyncio.create_task(until_mac(lab, vip, p1_mac, timeout=30))
                report = await caller.restore(state)
                returned = time.time()
                seen = await watch
                resumed = report.vm("p1").resumed_at
                assert resumed is not None
                return returned, seen, resumed
        finally:  # the restored p1 has the address again: other tests expect none
            for vm in ("p1", "s1"):
                with suppress(LockstepError, AssertionError):
                    await fresh.sh(vm, f"ip addr del {vip}/24 dev eth0 2>/dev/null; true")

    returned, seen, resumed = asyncio.run(scenario())
    print(
        f"\nclient's entry back on p1 {seen - resumed:+.3f} s after p1 resumed;"
        f" the restore returned {returned - resumed:+.3f} s after it"
    )
    assert seen - returned < 1.0
