"""The fast memory path on real guests: exact memory back, a frozen RAM image, fallbacks.

Guests fill a tmpfs file (guest RAM) through the lab's control channel and
checksum it inside the guest; the RAM images are hashed on the host.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from lockstep.caller.report import OperationReport
from lockstep.lab.lab import host_root, vm_run_dir
from tests.integration.conftest import Lab

pytestmark = pytest.mark.integration

VMS = ("p1", "s1")  # one on each host


def _fill(mib: int, path: str = "/dev/shm/buf") -> str:
    """Write ``mib`` MiB no two alike (a random MiB, numbered) to ``path``; print its sha256."""
    return (
        'head -c 1048576 /dev/urandom > /dev/shm/seed && python3 -c "import sys;'
        " s=open('/dev/shm/seed','rb').read()[8:]; f=open(sys.argv[1],'wb');"
        f" [f.write(i.to_bytes(8,'little')+s) for i in range({mib})]\" {path}"
        f" && sha256sum {path}"
    )


async def _sums(lab: Lab, command: str) -> dict[str, str]:
    outs = await asyncio.gather(*(lab.sh(vm, command, timeout=120) for vm in VMS))
    return {vm: out.split()[0] for vm, out in zip(VMS, outs, strict=True)}


def _paths(report: OperationReport) -> dict[str, tuple[str, str]]:
    return {v.name: (v.memory_path, v.memory_note) for v in report.vms}


def _image(lab: Lab, state: str, vm: str) -> Path:
    return host_root(lab.data, lab.group.vms[vm].host) / "states" / state / f"{vm}.ram"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_fast_restore_gives_back_exactly_the_saved_memory(own_ram: Lab) -> None:
    """A guest's 48 MiB buffer, overwritten after a fast save, is bit for bit back after restore.

    Every VM's save and restore took the fast path (device state only, RAM
    image kept by reflink or copy and mapped back), and the report says how.
    """

    async def run() -> None:
        before = await _sums(own_ram, _fill(48))
        async with own_ram.caller() as caller:
            saved = await caller.save("fast-exact")
            for vm, (path, note) in _paths(saved).items():
                assert path == "fast", (vm, note)
                assert "reflinked" in note or "copied" in note, (vm, note)
                # device state only: the stream is small next to the 48 MiB written
            overwritten = await _sums(own_ram, _fill(48))
            assert all(overwritten[vm] != before[vm] for vm in VMS)
            restored = await caller.restore("fast-exact")
            for vm, (path, note) in _paths(restored).items():
                assert path == "fast", (vm, note)
                assert note, vm
        after = await _sums(own_ram, "sha256sum /dev/shm/buf")
        assert after == before

    asyncio.run(run())


def test_saved_ram_image_is_unchanged_after_the_vm_runs_on(own_ram: Lab) -> None:
    """The RAM image a save keeps is frozen: the VM writing 32 MiB more does not touch it.

    Hashed right after the save (and equal to the checksum the commit recorded),
    then again after the guest wrote: the same; the VM's own RAM file changed.
    """

    async def run() -> None:
        async with own_ram.caller() as caller:
            saved = await caller.save("ram-frozen")
        assert {path for path, _ in _paths(saved).values()} == {"fast"}
        first = {
            vm: await asyncio.to_thread(_sha256, _image(own_ram, "ram-frozen", vm)) for vm in VMS
        }
        for vm in VMS:
            manifest = json.loads(
                _image(own_ram, "ram-frozen", vm).with_name("manifest.json").read_text()
            )
            assert manifest["vms"][vm]["ram"] == f"{vm}.ram"
            assert manifest["files"][f"{vm}.ram"]["sha256"] == first[vm]
        await _sums(own_ram, _fill(32, "/dev/shm/later") + " && sync")
        again = {
            vm: await asyncio.to_thread(_sha256, _image(own_ram, "ram-frozen", vm)) for vm in VMS
        }
        assert again == first
        own = vm_run_dir(own_ram.data, own_ram.group.vms["p1"].host, "p1") / "guest.ram"
        assert await asyncio.to_thread(_sha256, own) != first["p1"]

    asyncio.run(run())


def test_vm_mapped_privately_saves_standard_and_says_why(own_ram: Lab) -> None:
    """After a fast restore without reflink, the next save falls back to standard, with a reason.

    Without reflink a restored VM maps the state's image privately; QEMU cannot
    move that RAM to a file, so its next save streams all RAM (standard) and the
    report says why. Restoring that standard state brings the memory back
    exactly and gives the VM its own RAM file, so the save after it is fast again.
    """

    async def run() -> None:
        before = await _sums(own_ram, _fill(24))
        async with own_ram.caller() as caller:
            await caller.save("private-a")
            restored = await caller.restore("private-a")
            reflinked = {vm: "reflinked" in note for vm, (_, note) in _paths(restored).items()}
            again = await caller.save("private-b")
            for vm, (path, note) in _paths(again).items():
                if reflinked[vm]:
                    assert path == "fast", (vm, note)
                else:
                    assert path == "standard", (vm, note)
                    assert (
                        "private copy-on-write mapping of the RAM image of state 'private-a'"
                        in note
                    ), note
            await _sums(own_ram, _fill(24))
            back = await caller.restore("private-b")
            for vm, (path, note) in _paths(back).items():
                if not reflinked[vm]:
                    assert path == "standard", (vm, note)
                    assert "saved by the standard path" in note, note
            assert await _sums(own_ram, "sha256sum /dev/shm/buf") == before
            third = await caller.save("private-c")
            assert {path for path, _ in _paths(third).values()} == {"fast"}

    asyncio.run(run())


def test_save_stop_links_the_ram_file_and_restores_it(own_ram: Lab) -> None:
    """``save --stop`` keeps the RAM file by a hard link (no copy); restore brings it back exactly."""

    async def run() -> None:
        before = await _sums(own_ram, _fill(16))
        async with own_ram.caller() as caller:
            saved = await caller.save("fast-stop", stop=True)
            for vm, (path, note) in _paths(saved).items():
                assert path == "fast", (vm, note)
                assert note.startswith("RAM file linked into the state"), (vm, note)
            await caller.restore("fast-stop")
        assert await _sums(own_ram, "sha256sum /dev/shm/buf") == before

    asyncio.run(run())
