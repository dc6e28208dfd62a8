"""qcow2 layers: the copy-on-write overlays that make states cheap.

A VM's disk is a chain ``[base image, layer1, ..., layerN]``: the base image is
never written, every layer is a qcow2 overlay on the one before, and QEMU writes
only to the last. A state freezes a VM's last layer; restoring it adds a fresh
overlay on top, so a state can be restored any number of times and states form a
tree (a snapshot of a snapshot) without ever copying a whole disk.

Every layer lives in one folder, ``layers/<layer-id>.qcow2``, and is never moved
or renamed, because a qcow2 header names its backing file by absolute path.

The chain planning here is pure (names and sets); the few functions that touch
images run ``qemu-img`` through :mod:`lockstep.proc` and are async, since the
execd that calls them is asyncio. ``qemu-img`` is always asked with ``-U``
(force-share) when it only reads, so it works while QEMU holds the image.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockstep.errors import CommandError, DiskError
from lockstep.group import validate_name
from lockstep.proc import arun

__all__ = [
    "LAYER_SUFFIX",
    "OverlayPlan",
    "backing_chain",
    "create_overlay",
    "dependents",
    "image_format",
    "layer_id_of",
    "layer_path",
    "new_layer_id",
    "plan_fresh_overlay",
    "remove_layer",
    "split_chain",
    "unreachable_layers",
    "validate_layer_id",
]

LAYER_SUFFIX = ".qcow2"

# A layer id is "<vm>-<UTC yyyymmddHHMMSS>-<6 hex>"; the VM part is shortened so
# the id stays a valid name (at most 63 characters) for the store's manifests.
_TOKEN_LEN = 1 + 14 + 1 + 12
_NAME_MAX = 63


# --- pure part ---------------------------------------------------------------


@dataclass(frozen=True)
class OverlayPlan:
    """A qcow2 overlay to create: its id, its file and what it sits on.

    ``backing_format`` is None when it is not known without looking at the
    backing image; :func:`create_overlay` then asks ``qemu-img`` for it.
    """

    layer_id: str
    path: Path
    backing: Path
    backing_format: str | None


def validate_layer_id(layer_id: str) -> str:
    """Return ``layer_id`` if it is a safe layer id (a file name stem).

    Raises:
        DiskError: the id could name a file outside the layers folder, or is not
            a name lockstep makes.
    """
    try:
        return validate_name("layer", layer_id)
    except ValueError as exc:
        raise DiskError(str(exc)) from exc


def new_layer_id(vm: str, *, now: float | None = None) -> str:
    """A fresh layer id for VM ``vm``: its name, the UTC time and a random token.

    The time makes ids sort by creation in a listing; the random part keeps two
    layers made in the same second apart. ``now`` (epoch seconds) is for tests.

    Raises:
        DiskError: ``vm`` is not a valid VM name.
    """
    try:
        validate_name("VM", vm)
    except ValueError as exc:
        raise DiskError(str(exc)) from exc
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{vm[: _NAME_MAX - _TOKEN_LEN]}-{stamp}-{secrets.token_hex(6)}"


def layer_path(layers_dir: Path, layer_id: str) -> Path:
    """The file of layer ``layer_id`` in ``layers_dir``.

    Raises:
        DiskError: ``layer_id`` is not a safe layer id.
    """
    return layers_dir / f"{validate_layer_id(layer_id)}{LAYER_SUFFIX}"


def layer_id_of(path: Path, layers_dir: Path) -> str | None:
    """The layer id of ``path`` if it is a layer file directly in ``layers_dir``, else None."""
    if path.parent != layers_dir or path.suffix != LAYER_SUFFIX:
        return None
    try:
        return validate_layer_id(path.stem)
    except DiskError:
        return None


def plan_fresh_overlay(
    layers_dir: Path, vm: str, backing: Path, *, backing_format: str | None = None
) -> OverlayPlan:
    """Plan a new layer for ``vm`` on top of ``backing`` (a base image or a layer).

    The backing format is taken from ``backing_format`` if given, else it is
    "qcow2" when ``backing`` is one of our layers, else left for
    :func:`create_overlay` to detect.

    Raises:
        DiskError: ``vm`` is not a valid name, or ``layers_dir`` or ``backing``
            is not an absolute path (a qcow2 header must name its backing file
            by absolute path, and the new layer will be a backing file itself).
    """
    for what, p in (("layers folder", layers_dir), ("backing image", backing)):
        if not p.is_absolute():
            raise DiskError(f"{what} {p} must be an absolute path")
    layer_id = new_layer_id(vm)
    if backing_format is None and layer_id_of(backing, layers_dir) is not None:
        backing_format = "qcow2"
    return OverlayPlan(layer_id, layer_path(layers_dir, layer_id), backing, backing_format)


def split_chain(chain: Sequence[Path], layers_dir: Path) -> tuple[Path, list[str]]:
    """Split a base-first chain of files into its base image and its layer ids.

    This turns what :func:`backing_chain` reads into what a state records.

    Raises:
        DiskError: the chain is empty, or a file above the base is not a layer
            in ``layers_dir`` (lockstep did not make it, so it cannot track it).
    """
    if not chain:
        raise DiskError("an empty disk chain has no base image")
    base, *above = chain
    ids = []
    for path in above:
        layer_id = layer_id_of(path, layers_dir)
        if layer_id is None:
            raise DiskError(f"disk layer {path} is not a lockstep layer in {layers_dir}")
        ids.append(layer_id)
    return base, ids


def unreachable_layers(all_layers: set[str], kept_chains: Iterable[Sequence[str]]) -> set[str]:
    """The layers of ``all_layers`` that no chain in ``kept_chains`` uses: garbage."""
    kept: set[str] = set()
    for chain in kept_chains:
        kept.update(chain)
    return all_layers - kept


def dependents(layer: str, chains: Mapping[str, Sequence[str]]) -> set[str]:
    """The names in ``chains`` (state or VM → chain of layer ids) whose chain uses ``layer``."""
    return {name for name, chain in chains.items() if layer in chain}


# --- I/O part ----------------------------------------------------------------


def _stderr(exc: CommandError) -> str:
    return exc.stderr or str(exc)


async def _info(path: Path, *, chain: bool) -> Any:
    argv = ["qemu-img", "info", "--output=json", "-U"]
    if chain:
        argv.append("--backing-chain")
    argv.append(str(path))
    try:
        done = await arun(argv, timeout=60.0)
    except CommandError as exc:
        raise DiskError(f"cannot read disk image {path}: {_stderr(exc)}") from exc
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise DiskError(f"qemu-img info gave no JSON for disk image {path}: {exc}") from exc


async def image_format(path: Path) -> str:
    """The format of disk image ``path`` as qemu-img sees it ("qcow2", "raw", ...).

    Raises:
        DiskError: qemu-img cannot open the image (its words are quoted).
    """
    info = await _info(path, chain=False)
    fmt = info.get("format") if isinstance(info, dict) else None
    if not isinstance(fmt, str):
        raise DiskError(f"qemu-img info names no format for disk image {path}")
    return fmt


async def backing_chain(path: Path) -> list[Path]:
    """The chain of disk image ``path``, base first and ``path`` (made absolute) last.

    Raises:
        DiskError: qemu-img cannot open the image or one of its backing files
            (its words are quoted).
    """
    info = await _info(path, chain=True)
    if not isinstance(info, list) or not info:
        raise DiskError(f"qemu-img info gave no backing chain for disk image {path}")
    top_first = [Path(os.path.abspath(path))]
    for entry in info[1:]:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise DiskError(f"qemu-img info names no file in the backing chain of {path}")
        top_first.append(Path(name))
    return top_first[::-1]


async def create_overlay(plan: OverlayPlan) -> Path:
    """Create the qcow2 overlay ``plan`` describes and return its path.

    The backing image is only read (never written). The file is reserved with
    ``O_EXCL`` first, so an existing layer is never overwritten, and removed
    again if qemu-img fails.

    Raises:
        DiskError: the layer file exists already or cannot be made, or qemu-img
            cannot read the backing image or create the overlay (its words are
            quoted).
    """
    try:
        os.close(os.open(plan.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError as exc:
        raise DiskError(f"disk layer {plan.path} exists already; it is never overwritten") from exc
    except OSError as exc:
        raise DiskError(f"cannot create disk layer {plan.path}: {exc.strerror}") from exc
    created = False
    try:
        fmt = plan.backing_format or await image_format(plan.backing)
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(plan.backing)]
        await arun([*argv, str(plan.path)], timeout=60.0)
        created = True
    except CommandError as exc:
        raise DiskError(
            f"cannot create disk layer {plan.path} on {plan.backing}: {_stderr(exc)}"
        ) from exc
    finally:
        if not created:
            plan.path.unlink(missing_ok=True)
    return plan.path


def remove_layer(path: Path) -> bool:
    """Delete layer file ``path``; True if it was there, False if it was gone already.

    Only pass files made by :func:`create_overlay` (see :func:`layer_path`) that
    no kept chain uses any more (see :func:`unreachable_layers`).

    Raises:
        DiskError: the file exists but cannot be removed.
    """
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise DiskError(f"cannot remove disk layer {path}: {exc.strerror}") from exc
    return True
