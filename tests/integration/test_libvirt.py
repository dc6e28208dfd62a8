"""A group of libvirt domains saved and restored: the lab in libvirt mode (``--driver libvirt``).

The session's libvirt lab (``lvlab`` in conftest): 2 hosts, p1 on h1 and s1
on h2, each a domain of its host's own libvirtd (started by the lab) with
two disks of its own. What holds for both drivers (skew, frames, atomic
restore, faults) is tested on both labs where it is (``any_driver``); this
module has what is libvirt's own: the domains' identity, their disks, their
taps, and a group of both drivers (a lab of its own, ``--driver mixed``).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from lockstep.caller.faults import partition
from lockstep.caller.report import OperationReport
from lockstep.errors import OperationFailed
from lockstep.execd.model import Heal, Kill, VmStatus
from lockstep.lab.lab import wait_guests
from lockstep.lab.verify import LAST_RESTORE, Since, verify_lab
from lockstep.net.freeze import in_netns
from lockstep.proc import run as run_in
from lockstep.vm.domainxml import disks, identity, nics
from tests.integration.conftest import Lab, lab_of
from tests.integration.test_disks import _READ, _WRITE
from tests.integration.test_faults_injected import _held, _reaches
from tests.integration.test_freeze import _raw_socket

pytestmark = pytest.mark.integration


def _domains(statuses: dict[str, list[VmStatus]]) -> dict[str, tuple[str, str, str]]:
    """Each VM's (domain name, UUID, live XML) as ``lockstep status`` has them."""
    out = {}
    for listing in statuses.values():
        for s in listing:
            assert s.driver == "libvirt" and s.domain and s.uuid and s.xml, s
            out[s.name] = (s.domain, s.uuid, s.xml)
    return out


async def _status(lab: Lab) -> dict[str, tuple[str, str, str]]:
    async with lab.caller() as caller:
        results = await caller.status()
    return _domains({h: r.value or [] for h, r in results.items()})


def _not_devices(xml: str) -> list[bytes]:
    """A domain's live XML but its devices (where the disks are) and security labels."""
    return [ET.tostring(e) for e in ET.fromstring(xml) if e.tag not in ("devices", "seclabel")]


def _virsh(lab: Lab, vm: str, *args: str) -> str:
    """``virsh`` on the libvirtd of ``vm``'s host, as a user would run it there."""
    uri = lab.group.hosts[lab.group.vms[vm].host].libvirt
    return run_in(["virsh", "-c", uri, *args]).stdout.decode()


def _figures(report: OperationReport) -> str:
    lines = [f"{report.operation} {report.state}: {report.duration_s:.2f} s"]
    lines += [f"pause skew {report.pause_skew_ms} ms, resume skew {report.resume_skew_ms} ms"]
    lines += [f"switch-over {report.switch_over_ms} ms"]
    lines += [
        f"{v.name}: held {v.frames_held} delivered {v.frames_delivered} dropped {v.frames_dropped}"
        f" clock moved {v.clock_correction_ms} ms {v.clock_note}"
        for v in report.vms
    ]
    return "; ".join(lines)


async def _disks_saved_and_restored(
    lab: Lab, state: str
) -> tuple[OperationReport, OperationReport]:
    """Markers on both disks of every guest, saved, overwritten, restored: the saved ones read."""
    vms = sorted(lab.group.vms)
    await wait_guests(lab.group, lab.data)
    for vm in vms:
        await lab.sh(vm, _WRITE.format(text=f"saved-{vm}"))
    async with lab.caller() as caller:
        saved = await caller.save(state)
        for vm in vms:
            await lab.sh(vm, _WRITE.format(text=f"later-{vm}"))
            assert (await lab.sh(vm, _READ)).split() == [f"later-{vm}"] * 2
        restored = await caller.restore(state)
        for vm in vms:
            assert (await lab.sh(vm, _READ)).split() == [f"saved-{vm}"] * 2, vm
    return saved, restored


def test_domains_come_back_with_both_disks_as_the_same_domains(lvlab: Lab) -> None:
    """A group of two domains, two disks each, saved and restored: the same domains, their data.

    Each guest writes a marker on its root and its data disk, the group is
    saved, the markers are overwritten, the group is restored: the guests
    read the saved markers from both disks (page cache dropped). After the
    restore each domain has the name and UUID it had, in ``lockstep status``
    and in ``virsh list`` and ``virsh dumpxml`` on its host's libvirtd, where
    it runs; its live XML differs only in its disks, now on fresh overlays
    in lockstep's layers;
    each guest's wall clock was set through libvirt's guest agent calls.
    Every frame held at the instants was delivered, none dropped; since the
    restore the guests' streams lost nothing and no role changed.
    """
    vms = sorted(lvlab.group.vms)
    before = asyncio.run(_status(lvlab))
    saved, restored = asyncio.run(_disks_saved_and_restored(lvlab, "two-disks"))
    after = asyncio.run(_status(lvlab))
    figures = f"{_figures(saved)} | {_figures(restored)}"
    print(figures)
    for vm in vms:
        (name, uuid, xml), (name2, uuid2, xml2) = before[vm], after[vm]
        assert (name2, uuid2) == (name, uuid), vm
        assert identity(xml2) == (name, uuid.lower())
        old = [d.source for d in disks(xml)]
        new = [d.source for d in disks(xml2)]
        assert [d.target for d in disks(xml2)] == ["vda", "vdb"]
        assert len(new) == len(old)
        assert all(
            n is not None and n != o and "layers" in str(n) for o, n in zip(old, new, strict=True)
        )
        assert _not_devices(xml2) == _not_devices(xml), vm
        assert name in _virsh(lvlab, vm, "list", "--name", "--state-running").split(), vm
        dumped = _virsh(lvlab, vm, "dumpxml", name)
        assert identity(dumped) == (name, uuid.lower()), vm
        assert [d.source for d in disks(dumped)] == new, vm
    for report in (saved, restored):
        for line in report.vms:
            assert line.frames_dropped == 0, figures
    # Each guest's wall clock set to true time through libvirt's guest agent calls.
    assert all(line.clock_correction_ms is not None for line in restored.vms), figures
    for report in (saved,):
        assert sum(v.frames_held for v in report.vms) == sum(
            v.frames_delivered for v in report.vms
        ), figures
    since = verify_lab(lvlab.name, Since(LAST_RESTORE)).to_json()
    assert (since["lost"], since["transitions"], since["split_brain"]) == (0, 0, 0), since


def test_a_killed_primary_domain_is_put_back_with_no_takeover(lvlab: Lab) -> None:
    """The primary's QEMU killed (a crash), the group restored: it runs again, nobody took over.

    The state is saved while both guests run; then p1's QEMU is killed
    through ``lockstep fault kill`` (libvirt sees the domain shut off) and
    the group is restored at once: since the restore the guests logged no
    role change and lost nothing, and p1 is the same domain (name, UUID).
    """

    async def run() -> None:
        await wait_guests(lvlab.group, lvlab.data)
        async with lvlab.caller() as caller:
            await caller.save("before-kill")
            await caller.fault(Kill(vm="p1"))
            await caller.restore("before-kill")
        await wait_guests(lvlab.group, lvlab.data, timeout=60)

    before = asyncio.run(_status(lvlab))
    asyncio.run(run())
    after = asyncio.run(_status(lvlab))
    assert {v: s[:2] for v, s in after.items()} == {v: s[:2] for v, s in before.items()}
    since = verify_lab(lvlab.name, Since(LAST_RESTORE)).to_json()
    assert (since["transitions"], since["split_brain"], since["lost"]) == (0, 0, 0), since


def test_frames_from_outside_are_held_on_libvirts_taps_and_delivered(lvlab: Lab) -> None:
    """Frames sent to s1 from outside the group while the group is saved: held, then delivered.

    A sender on h1's VM bridge (a veth of its own, not a VM of the group)
    sends about 500 frames a second to s1's MAC, on h2 across the VXLAN,
    throughout a save. The freeze on the tap libvirt made for s1 (found in
    its live XML) holds those that arrive while s1 is paused, and all of
    them are delivered as it resumes: none dropped, and the guests' own
    streams lose nothing.
    """
    (_name, _uuid, xml) = asyncio.run(_status(lvlab))["s1"]
    mac = bytes.fromhex(nics(xml)[0].mac.replace(":", ""))
    ns = f"{lvlab.name}-h1"
    run_in(["ip", "link", "add", "lslvfl0", "type", "veth", "peer", "name", "lslvfl1"], netns=ns)
    stop = threading.Event()
    try:
        run_in(["ip", "link", "set", "lslvfl1", "master", "lsvm", "up"], netns=ns)
        run_in(["ip", "link", "set", "lslvfl0", "up"], netns=ns)
        sock = in_netns(ns, lambda: _raw_socket("lslvfl0"))
        frame = mac + bytes.fromhex("02000000f101") + b"\x88\xb5" + bytes(100)

        def send() -> None:
            while not stop.is_set():
                for _ in range(5):
                    sock.send(frame)
                time.sleep(0.01)

        async def save() -> OperationReport:
            await wait_guests(lvlab.group, lvlab.data)
            async with lvlab.caller() as caller:
                return await caller.save("outside-frames")

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            report = asyncio.run(save())
        finally:
            stop.set()
            sender.join()
            sock.close()
    finally:
        run_in(["ip", "link", "del", "lslvfl0"], netns=ns, check=False)
    print(_figures(report))
    s1 = report.vm("s1")
    assert s1.frames_held > 0, _figures(report)
    assert (s1.frames_delivered, s1.frames_dropped) == (s1.frames_held, 0), _figures(report)
    assert verify_lab(lvlab.name, Since(LAST_RESTORE)).to_json()["lost"] == 0


def test_a_state_a_domain_stands_on_stays_through_down_and_up(lvlab: Lab) -> None:
    """A domain restored from a state, stopped and started again, still stands on that state.

    After the restore its disks are fresh overlays over the state's layers;
    ``lockstep down`` stops the domain (it stays defined) and ``lockstep up``
    starts it again on the same disks. Deleting the state is then refused,
    naming the VMs that depend on it, and the guests still read what they
    wrote on both disks before the save (page cache dropped).
    """
    vms = sorted(lvlab.group.vms)
    name = f"under-{secrets.token_hex(3)}"

    async def run() -> None:
        await wait_guests(lvlab.group, lvlab.data)
        for vm in vms:
            await lvlab.sh(vm, _WRITE.format(text=f"kept-{vm}"))
        async with lvlab.caller() as caller:
            await caller.save(name)
            await caller.restore(name)
            await caller.down()
            await caller.up()
        await wait_guests(lvlab.group, lvlab.data, timeout=120)
        async with lvlab.caller() as caller:
            with pytest.raises(OperationFailed, match=r"VMs 'p1'.* depend on its disk"):
                await caller.state_delete(name)
        for vm in vms:
            assert (await lvlab.sh(vm, _READ)).split() == [f"kept-{vm}"] * 2, vm

    asyncio.run(run())


def test_a_partition_cuts_domains_apart_by_the_macs_in_their_live_xml(lvlab: Lab) -> None:
    """p1 | s1, both libvirt domains: the caller reads their MACs from their hosts; heal.

    The group file names no MAC for a domain; the partition still cuts every
    frame between them both ways (pings fail), and after ``heal`` they reach
    each other again and no host holds the fault.
    """

    async def run() -> None:
        await wait_guests(lvlab.group, lvlab.data)
        async with lvlab.caller() as caller:
            fid, results = await caller.fault(partition(caller.group, "p1", "s1"))
            assert all(r.ok for r in results.values()), results
            assert not await _reaches(lvlab, "p1", "s1")
            assert not await _reaches(lvlab, "s1", "p1")
            _, healed = await caller.fault(Heal())
            assert all(r.value and r.value.did for r in healed.values()), healed
            assert await _reaches(lvlab, "p1", "s1")
            assert await _reaches(lvlab, "s1", "p1")
            assert await _held(caller) == {"h1": [], "h2": []}, fid

    asyncio.run(run())


@pytest.fixture(scope="module")
def mixed(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A lab of one group in both drivers: p1 a QEMU VM on h1, s1 a libvirt domain on h2."""
    options = {"vms": 2, "disks": 2, "driver": "mixed", "clock_offsets": {"h2": 2.5}}
    yield from lab_of(request, "lsmx", **options)


def test_a_mixed_group_of_a_qemu_vm_and_a_domain_saves_and_restores_as_one(mixed: Lab) -> None:
    """p1 (lockstep's QEMU driver) and s1 (a libvirt domain) are saved and restored together.

    Both guests write a marker on both disks, the group is saved, the
    markers are overwritten, the group is restored: both read the saved
    markers. ``lockstep status`` gives each VM its driver; both VMs are in
    both reports with their pause and resume instants; since the restore
    the guests lost nothing and no role changed.
    """
    vms = sorted(mixed.group.vms)
    assert {vm: mixed.group.vms[vm].driver for vm in vms} == {"p1": "qemu", "s1": "libvirt"}

    async def run() -> tuple[OperationReport, OperationReport, dict[str, str]]:
        saved, restored = await _disks_saved_and_restored(mixed, "mixed")
        async with mixed.caller() as caller:
            status = await caller.status()
        drivers = {s.name: s.driver for r in status.values() for s in r.value or []}
        return saved, restored, drivers

    saved, restored, drivers = asyncio.run(run())
    print(f"{_figures(saved)} | {_figures(restored)}")
    assert drivers == {"p1": "qemu", "s1": "libvirt"}
    for report in (saved, restored):
        assert sorted(v.name for v in report.vms) == vms
        assert all(v.resumed_at is not None and v.frames_dropped == 0 for v in report.vms)
    assert all(v.paused_at is not None for v in saved.vms)
    since = verify_lab(mixed.name, Since(LAST_RESTORE)).to_json()
    assert (since["lost"], since["transitions"], since["split_brain"]) == (0, 0, 0), since
