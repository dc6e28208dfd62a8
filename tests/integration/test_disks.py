"""Every disk of a VM is a layer of the state: the lab's VMs have a root and a data disk."""

from __future__ import annotations

import asyncio

from tests.integration.conftest import Lab

# The data disk is raw to the guest: a marker at its start, read back past the page cache.
_WRITE = (
    "printf '{text}\\n' > /opt/lockstep-marker && printf '{text}' |"
    " dd of=/dev/vdb bs=512 count=1 conv=sync,notrunc 2>/dev/null && sync"
)
_READ = (
    "echo 3 > /proc/sys/vm/drop_caches; cat /opt/lockstep-marker;"
    " dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | tr -d '\\000'; echo"
)


def test_a_state_keeps_every_disk_and_a_restore_puts_each_back(fresh: Lab) -> None:
    """Data written on the root and the data disk before a save is what a restore brings back.

    Each VM writes a marker on both disks, the group is saved, both markers
    are overwritten, and after the restore the guests read the saved markers
    from both disks with their page cache dropped (so from the restored
    layers, not from memory). The state's manifest lists both disks of every
    VM, each frozen at its own layer, and the restored VMs write new layers
    over them.
    """
    vms = sorted(fresh.group.vms)

    async def run() -> None:
        for vm in vms:
            await fresh.sh(vm, _WRITE.format(text=f"saved-{vm}"))
        async with fresh.caller() as caller:
            await caller.save("two-disks")
            for vm in vms:
                await fresh.sh(vm, _WRITE.format(text=f"later-{vm}"))
                assert (await fresh.sh(vm, _READ)).split() == [f"later-{vm}"] * 2
            await caller.restore("two-disks")
            for vm in vms:
                assert (await fresh.sh(vm, _READ)).split() == [f"saved-{vm}"] * 2, vm
            shown = await caller.state_show("two-disks")
            statuses = await caller.status()
        frozen = set()
        for host, result in shown.items():
            assert result.value is not None, (host, result.error)
            for vm, rec in result.value["vms"].items():
                assert [d["target"] for d in rec["disks"]] == ["vda", "vdb"], (vm, rec)
                assert rec["skipped"] == {}
                frozen |= {d["chain"][-1] for d in rec["disks"]}
        assert len(frozen) == 2 * len(vms)
        active = {
            layer
            for r in statuses.values()
            for s in r.value or []
            for layer in (s.layer or "").split(",")
        }
        assert len(active) == 2 * len(vms) and not active & frozen, (active, frozen)

    asyncio.run(run())
