"""The memory paths' rules and the RAM image's file handling (lockstep.vm.memory)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lockstep.errors import ConfigError, VmError
from lockstep.group import VmSpec
from lockstep.vm.argv import RamFile
from lockstep.vm.memory import (
    ImageKept,
    boot_ram,
    discard_ram_file,
    keep_ram_image,
    memory_conflict,
    plan_save,
    reflink,
    restore_ram,
    sparse_copy,
)

MiB = 1 << 20


def _spec(**kw: object) -> VmSpec:
    base: dict[str, object] = {"name": "p1", "host": "h1", "kernel": "/img/vmlinuz"}
    base.update(kw)
    return VmSpec.model_validate(base)


def _sparse_file(path: Path, size: int, chunks: dict[int, bytes]) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)


def test_memory_path_defaults_to_auto() -> None:
    """A VM that says nothing takes the fast path where it works (auto)."""
    assert _spec().memory_path == "auto"


@pytest.mark.parametrize(
    "extra", [["-m", "1G"], ["-numa", "node"], ["-object", "memory-backend-ram,id=x,size=1G"]]
)
def test_extra_args_that_set_up_memory_are_found(extra: list[str]) -> None:
    """Options that would clash with lockstep's RAM file are named in the reason."""
    reason = memory_conflict(_spec(extra_args=extra))
    assert reason is not None
    assert repr(extra[0] if extra[0] != "-object" else extra[1]) in reason
    assert memory_conflict(_spec(extra_args=["-rtc", "base=utc"])) is None


def test_boot_gives_auto_and_fast_a_fresh_ram_file_and_standard_none(tmp_path: Path) -> None:
    """auto and fast boot on a fresh shared RAM file (a stale one goes); standard on anonymous RAM."""
    own = tmp_path / "guest.ram"
    own.write_bytes(b"stale")
    assert boot_ram(_spec(), own) == (RamFile(own, shared=True), "")
    assert not own.exists()
    assert boot_ram(_spec(memory_path="fast"), own) == (RamFile(own, shared=True), "")
    assert boot_ram(_spec(memory_path="standard"), own) == (None, "")


def test_boot_with_clashing_extra_args_falls_back_or_fails(tmp_path: Path) -> None:
    """auto boots on anonymous RAM and keeps the reason; fast refuses in one sentence."""
    ram, reason = boot_ram(_spec(extra_args=["-numa", "node"]), tmp_path / "r")
    assert ram is None
    assert "'-numa'" in reason
    with pytest.raises(ConfigError, match='VM p1: memory_path is "fast" but its extra_args'):
        boot_ram(_spec(memory_path="fast", extra_args=["-numa", "node"]), tmp_path / "r")


def test_save_is_fast_only_from_a_shared_ram_file_with_x_ignore_shared() -> None:
    """The rules of a save: which path, and the reason when auto falls back."""
    own = RamFile(Path("/r/guest.ram"), shared=True)
    private = RamFile(Path("/s/p1.ram"), shared=False)
    auto, fast, std = _spec(), _spec(memory_path="fast"), _spec(memory_path="standard")

    assert plan_save(auto, own, "", qemu_ignores_shared=True).fast
    assert plan_save(fast, own, "", qemu_ignores_shared=True).fast
    assert plan_save(std, own, "", qemu_ignores_shared=True) == plan_save(
        std, None, "", qemu_ignores_shared=True
    )
    assert not plan_save(std, None, "", qemu_ignores_shared=True).fast
    assert plan_save(std, None, "", qemu_ignores_shared=True).reason == ""

    no_cap = plan_save(auto, own, "", qemu_ignores_shared=False)
    assert not no_cap.fast
    assert "x-ignore-shared" in no_cap.reason
    mapped = plan_save(auto, private, "restored privately", qemu_ignores_shared=True)
    assert (mapped.fast, mapped.reason) == (False, "restored privately")
    anonymous = plan_save(auto, None, "", qemu_ignores_shared=True)
    assert not anonymous.fast
    assert "anonymous memory" in anonymous.reason

    with pytest.raises(VmError, match='memory_path is "fast" but its QEMU lacks'):
        plan_save(fast, own, "", qemu_ignores_shared=False)
    with pytest.raises(VmError, match="private copy-on-write mapping"):
        plan_save(fast, private, "", qemu_ignores_shared=True)


def test_sparse_copy_keeps_bytes_and_holes(tmp_path: Path) -> None:
    """The copy is byte for byte the same, copies only the data and leaves holes as holes."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    chunks = {0: os.urandom(MiB), 10 * MiB: os.urandom(3 * MiB), 60 * MiB + 17: b"tail"}
    _sparse_file(src, 64 * MiB, chunks)
    copied = sparse_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert copied < 16 * MiB  # data ranges (block-rounded), not the 64 MiB
    assert dst.stat().st_blocks * 512 < 16 * MiB
    with pytest.raises(FileExistsError):
        sparse_copy(src, dst)


def test_sparse_copy_of_an_empty_ram_file(tmp_path: Path) -> None:
    """A RAM file the guest never touched (all hole) copies to an all-hole file of its size."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _sparse_file(src, 8 * MiB, {})
    assert sparse_copy(src, dst) == 0
    assert dst.stat().st_size == 8 * MiB


def test_kept_image_does_not_change_when_the_ram_file_does(tmp_path: Path) -> None:
    """A running VM's image (reflink or copy) is frozen: later writes to the RAM file miss it."""
    ram, image = tmp_path / "guest.ram", tmp_path / "p1.ram"
    _sparse_file(ram, 4 * MiB, {MiB: b"before" * 100})
    kept = keep_ram_image(ram, image, link=False)
    assert kept.method in ("reflink", "copy")
    with ram.open("r+b") as f:
        f.seek(MiB)
        f.write(b"after!" * 100)
    assert image.read_bytes()[MiB : MiB + 600] == b"before" * 100
    assert kept.method == "reflink" or kept.copied >= 600


def test_stopping_vm_image_is_a_hard_link(tmp_path: Path) -> None:
    """With --stop no byte is copied: the state's image is the RAM file's inode."""
    ram, image = tmp_path / "guest.ram", tmp_path / "p1.ram"
    _sparse_file(ram, 4 * MiB, {0: b"x"})
    kept = keep_ram_image(ram, image, link=True)
    assert kept.method == "link"
    assert image.stat().st_ino == ram.stat().st_ino
    ram.unlink()  # the VM quits: the state keeps the bytes
    assert image.read_bytes()[:1] == b"x"


def test_keep_ram_image_errors_are_one_sentence(tmp_path: Path) -> None:
    """A missing RAM file is a VmError naming both paths."""
    with pytest.raises(VmError, match=r"cannot keep the RAM image of .*guest\.ram as .*p1\.ram"):
        keep_ram_image(tmp_path / "guest.ram", tmp_path / "p1.ram", link=False)


def test_kept_image_is_described_for_the_report() -> None:
    """The report line says how the image was kept and what it cost."""
    assert "linked" in ImageKept("link", 0, 0.0001).describe()
    assert ImageKept("reflink", 0, 0.0025).describe() == "RAM image reflinked in 2.5 ms"
    line = ImageKept("copy", 3 << 30, 1.5).describe()
    assert line == "RAM image copied (no reflink on this filesystem): 3.00 GiB in 1500 ms"


def test_reflink_says_false_where_the_filesystem_cannot(tmp_path: Path) -> None:
    """reflink() answers True with an identical clone, or False leaving no file behind."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(os.urandom(64 * 1024))
    if reflink(src, dst):
        assert dst.read_bytes() == src.read_bytes()
    else:
        assert not dst.exists()


def test_restore_of_a_standard_state(tmp_path: Path) -> None:
    """A standard state is read in full: into a fresh own RAM file, or anonymous RAM for standard."""
    own = tmp_path / "guest.ram"
    got = restore_ram(_spec(), None, own, state="s")
    assert got.ram == RamFile(own, shared=True)
    assert not got.fast
    assert "saved by the standard path" in got.note
    assert got.later == ""
    std = restore_ram(_spec(memory_path="standard"), None, own, state="s")
    assert (std.ram, std.fast, std.note) == (None, False, "")


def test_restore_of_a_fast_state_maps_or_clones_the_image(tmp_path: Path) -> None:
    """A fast state's image is reflinked shared, else auto maps it privately and fast copies it.

    The image itself is never the VM's own file: the state stays pristine.
    """
    image, own = tmp_path / "p1.ram", tmp_path / "guest.ram"
    _sparse_file(image, 4 * MiB, {0: b"saved"})
    auto = restore_ram(_spec(), image, own, state="s")
    assert auto.fast
    if auto.ram == RamFile(own, shared=True):
        assert "reflinked" in auto.note
        assert auto.later == ""
    else:
        assert auto.ram == RamFile(image, shared=False)
        assert "mapped privately" in auto.note
        assert "private copy-on-write mapping of the RAM image of state 's'" in auto.later
    fast = restore_ram(_spec(memory_path="fast"), image, own, state="s")
    assert fast.fast
    assert fast.ram == RamFile(own, shared=True)
    assert fast.later == ""
    assert own.read_bytes()[:5] == b"saved"
    assert own.stat().st_ino != image.stat().st_ino


def test_discarded_ram_file_goes_at_once_and_leftovers_with_it(tmp_path: Path) -> None:
    """The RAM file leaves its name at once; it and a crash's leftover are unlinked behind."""
    own = tmp_path / "guest.ram"
    _sparse_file(own, 8 * MiB, {0: b"x"})
    leftover = tmp_path / ".guest.ram.0badc0de.gone"
    leftover.write_bytes(b"left by a crash")
    discard_ram_file(own)
    assert not own.exists()
    for _ in range(200):
        if not list(tmp_path.iterdir()):
            break
        time.sleep(0.01)
    assert list(tmp_path.iterdir()) == []
    discard_ram_file(own)  # nothing there: nothing to do
