"""A group of libvirt domains saved and restored: the lab in libvirt mode (``--driver libvirt``).

One lab for this module: 2 hosts, p1 on h1 and s1 on h2, each a domain of
its host's embedded libvirt (in the execd) with two disks of its own (a
qcow2 root over the guest image, an empty qcow2 data disk), h2's execd
clock 2.5 s wrong. Its name ("lslv" + 3 letters) and subnets are its own.
It is always taken down; on failure the console and execd logs are kept in
``build/test-logs/``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from lockstep.caller.report import OperationReport
from lockstep.execd.model import Kill, VmStatus
from lockstep.lab.lab import wait_guests
from lockstep.lab.verify import LAST_RESTORE, Since, verify_lab
from lockstep.proc import which
from lockstep.vm.domainxml import disks, identity
from tests.integration.conftest import Lab, lab_of
from tests.integration.test_disks import _READ, _WRITE

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (namespaces, taps, QEMU)"),
    pytest.mark.skipif(which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64"),
]

if importlib.util.find_spec("libvirt") is None:
    pytestmark.append(pytest.mark.skip(reason="libvirt-python is not installed"))


@pytest.fixture(scope="module")
def lvlab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The module's libvirt lab: up once, down at the end whatever happened."""
    options = {"vms": 2, "disks": 2, "driver": "libvirt", "clock_offsets": {"h2": 2.5}}
    yield from lab_of(request, "lslv", **options)


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


def _figures(report: OperationReport) -> str:
    lines = [f"{report.operation} {report.state}: {report.duration_s:.2f} s"]
    lines += [f"pause skew {report.pause_skew_ms} ms, resume skew {report.resume_skew_ms} ms"]
    lines += [f"switch-over {report.switch_over_ms} ms"]
    lines += [
        f"{v.name}: held {v.frames_held} delivered {v.frames_delivered} dropped {v.frames_dropped}"
        for v in report.vms
    ]
    return "; ".join(lines)


def test_domains_come_back_with_both_disks_as_the_same_domains(lvlab: Lab) -> None:
    """A group of two domains, two disks each, saved and restored: the same domains, their data.

    Each guest writes a marker on its root and its data disk, the group is
    saved, the markers are overwritten, the group is restored: the guests
    read the saved markers from both disks (page cache dropped). After the
    restore each domain has the name and UUID it had (``lockstep status``
    gives what ``virsh list`` and ``virsh dumpxml`` show), and its live XML
    differs only in its disks, now on fresh overlays in lockstep's layers.
    Every frame held at the instants was delivered, none dropped; since the
    restore the guests' streams lost nothing and no role changed.
    """
    vms = sorted(lvlab.group.vms)

    async def run() -> tuple[OperationReport, OperationReport]:
        await wait_guests(lvlab.group, lvlab.data)
        for vm in vms:
            await lvlab.sh(vm, _WRITE.format(text=f"saved-{vm}"))
        async with lvlab.caller() as caller:
            saved = await caller.save("two-disks")
            for vm in vms:
                await lvlab.sh(vm, _WRITE.format(text=f"later-{vm}"))
                assert (await lvlab.sh(vm, _READ)).split() == [f"later-{vm}"] * 2
            restored = await caller.restore("two-disks")
            for vm in vms:
                assert (await lvlab.sh(vm, _READ)).split() == [f"saved-{vm}"] * 2, vm
        return saved, restored

    before = asyncio.run(_status(lvlab))
    saved, restored = asyncio.run(run())
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
    for report in (saved, restored):
        for line in report.vms:
            assert line.frames_dropped == 0, figures
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
