"""qcow2 layers with real qemu-img and qemu-io: chains, a pristine base, independent overlays."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from lockstep.disk import (
    backing_chain,
    create_overlay,
    image_format,
    layer_path,
    plan_fresh_overlay,
    remove_layer,
    split_chain,
)
from lockstep.errors import CommandError, DiskError
from lockstep.proc import run, which

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        which("qemu-img") is None or which("qemu-io") is None,
        reason="needs qemu-img and qemu-io (qemu-utils)",
    ),
]

BASE_PATTERN = 0x11


def qemu_io(image: Path, fmt: str, command: str) -> None:
    """Run one qemu-io command on ``image``; a failed pattern check raises CommandError."""
    done = run(["qemu-io", "-f", fmt, "-c", command, str(image)])
    assert "Pattern verification failed" not in done.text


def sha256(path: Path) -> str:
    """Checksum of a whole file, to prove it was not written."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def layers_dir(tmp_path: Path) -> Path:
    """An empty layers folder (absolute, as qcow2 backing names must be)."""
    folder = tmp_path.absolute() / "layers"
    folder.mkdir()
    return folder


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A 1 MiB raw base image whose first 64 KiB hold a known pattern."""
    path = tmp_path.absolute() / "base.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", str(path), "1M"])
    qemu_io(path, "raw", f"write -P {BASE_PATTERN:#x} 0 64k")
    return path


def test_state_tree_chains_read_back_base_first(layers_dir: Path, base: Path) -> None:
    """Overlay on the base, overlay on that, a sibling: each chain reads back base-first."""

    async def scenario() -> None:
        state = await create_overlay(plan_fresh_overlay(layers_dir, "p1", base))
        child = await create_overlay(plan_fresh_overlay(layers_dir, "p1", state))
        sibling = await create_overlay(plan_fresh_overlay(layers_dir, "p1", state))
        assert await image_format(base) == "raw"
        assert await image_format(child) == "qcow2"
        assert await backing_chain(base) == [base]
        assert await backing_chain(state) == [base, state]
        assert await backing_chain(child) == [base, state, child]
        assert await backing_chain(sibling) == [base, state, sibling]
        _, ids = split_chain(await backing_chain(child), layers_dir)
        assert [layer_path(layers_dir, i) for i in ids] == [state, child]

    asyncio.run(scenario())


def test_base_image_is_never_written(layers_dir: Path, base: Path) -> None:
    """Writing into overlays (two levels up) leaves the base image byte-identical."""
    before = sha256(base)

    async def scenario() -> tuple[Path, Path]:
        state = await create_overlay(plan_fresh_overlay(layers_dir, "p1", base))
        return state, await create_overlay(plan_fresh_overlay(layers_dir, "p1", state))

    state, top = asyncio.run(scenario())
    qemu_io(state, "qcow2", "write -P 0xab 0 64k")
    qemu_io(top, "qcow2", "write -P 0xcd 64k 64k")
    qemu_io(top, "qcow2", "read -P 0xab 0 64k")
    qemu_io(top, "qcow2", "read -P 0xcd 64k 64k")
    assert sha256(base) == before
    qemu_io(base, "raw", f"read -P {BASE_PATTERN:#x} 0 64k")


def test_fresh_overlays_on_one_state_layer_are_independent(layers_dir: Path, base: Path) -> None:
    """Two restores of one state write to their own layers and never see each other's data."""

    async def scenario() -> tuple[Path, Path, Path]:
        state = await create_overlay(plan_fresh_overlay(layers_dir, "p1", base))
        a = await create_overlay(plan_fresh_overlay(layers_dir, "p1", state))
        b = await create_overlay(plan_fresh_overlay(layers_dir, "p1", state))
        return state, a, b

    state, a, b = asyncio.run(scenario())
    state_before = sha256(state)
    qemu_io(a, "qcow2", "write -P 0xaa 0 64k")
    qemu_io(b, "qcow2", "write -P 0xbb 0 64k")
    qemu_io(a, "qcow2", "read -P 0xaa 0 64k")
    qemu_io(b, "qcow2", "read -P 0xbb 0 64k")
    # What neither wrote still comes from the base, through the state layer.
    with pytest.raises(CommandError, match="exit 1"):
        qemu_io(a, "qcow2", "read -P 0xbb 0 64k")
    qemu_io(a, "qcow2", "read -P 0 64k 64k")
    qemu_io(state, "qcow2", f"read -P {BASE_PATTERN:#x} 0 64k")
    assert sha256(state) == state_before


def test_create_overlay_never_overwrites_and_quotes_qemu_img(layers_dir: Path, base: Path) -> None:
    """An existing layer file is refused; a missing backing gives qemu-img's words, no leftovers."""

    async def scenario() -> None:
        plan = plan_fresh_overlay(layers_dir, "p1", base)
        await create_overlay(plan)
        with pytest.raises(DiskError, match="exists already"):
            await create_overlay(plan)
        missing = plan_fresh_overlay(layers_dir, "p1", base.with_name("gone.raw"))
        with pytest.raises(DiskError, match=r"gone\.raw.*No such file") as info:
            await create_overlay(missing)
        assert info.value.__cause__ is not None
        assert not missing.path.exists()
        typed = plan_fresh_overlay(
            layers_dir, "p1", base.with_name("gone.raw"), backing_format="raw"
        )
        with pytest.raises(DiskError, match=r"cannot create disk layer .*gone\.raw"):
            await create_overlay(typed)
        assert not typed.path.exists()
        with pytest.raises(DiskError, match=r"cannot read disk image .*nothing\.qcow2"):
            await backing_chain(layers_dir / "nothing.qcow2")

    asyncio.run(scenario())


def test_remove_layer_is_idempotent(layers_dir: Path, base: Path) -> None:
    """Removing a layer deletes its file once; removing it again reports it was gone."""
    path = asyncio.run(create_overlay(plan_fresh_overlay(layers_dir, "p1", base)))
    assert remove_layer(path) is True
    assert remove_layer(path) is False
    assert base.exists()
