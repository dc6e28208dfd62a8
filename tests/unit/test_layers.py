"""Unit tests of the pure qcow2 layer model: ids, paths, overlay plans, chains, garbage."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockstep.disk import (
    LAYER_SUFFIX,
    OverlayPlan,
    dependents,
    layer_id_of,
    layer_path,
    new_layer_id,
    plan_fresh_overlay,
    split_chain,
    unreachable_layers,
    validate_layer_id,
)
from lockstep.errors import DiskError
from lockstep.group import validate_name

LAYERS = Path("/var/lib/lockstep/hosts/h1/layers")
BASE = Path("/images/rootfs.qcow2")

vm_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,62}\Z")
layer_ids = st.sampled_from([f"l{i}" for i in range(12)])


@given(vm_names)
def test_new_layer_id_is_a_safe_name_starting_with_the_vm(vm: str) -> None:
    """Any valid VM name gives a layer id that is a valid name and begins with (part of) it."""
    layer_id = new_layer_id(vm)
    assert validate_name("layer", layer_id) == layer_id
    token = "-20261126060512-abcdef012345"
    assert layer_id[: -len(token)] == vm[: 63 - len(token)]
    assert len(layer_id) <= 63
    assert "/" not in layer_id


def test_new_layer_id_records_utc_time_and_is_unique() -> None:
    """Ids carry the UTC creation time (so they sort by age) and differ even within a second."""
    layer_id = new_layer_id("p1", now=0.0)
    assert layer_id.startswith("p1-19700101000000-")
    ids = {new_layer_id("p1", now=0.0) for _ in range(200)}
    assert len(ids) == 200


@pytest.mark.parametrize("vm", ["", "../x", "a/b", ".", "..", "-x", "x" * 64])
def test_new_layer_id_refuses_unsafe_vm_names(vm: str) -> None:
    """A VM name that could escape the layers folder never becomes part of a file name."""
    with pytest.raises(DiskError, match="VM name"):
        new_layer_id(vm)


def test_layer_path_is_the_id_with_suffix_in_the_layers_folder() -> None:
    """A layer's file is ``<layers>/<id>.qcow2`` and maps back to the same id."""
    path = layer_path(LAYERS, "p1-20261126060512-abcdef")
    assert path == LAYERS / "p1-20261126060512-abcdef.qcow2"
    assert layer_id_of(path, LAYERS) == "p1-20261126060512-abcdef"


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "/etc/passwd", "x..y"])
def test_layer_path_refuses_traversal(bad: str) -> None:
    """Layer ids that could name a file outside the layers folder are refused."""
    with pytest.raises(DiskError):
        layer_path(LAYERS, bad)
    with pytest.raises(DiskError):
        validate_layer_id(bad)


def test_layer_id_of_ignores_files_that_are_not_our_layers() -> None:
    """Base images, files elsewhere and other suffixes are not layers."""
    assert layer_id_of(BASE, LAYERS) is None
    assert layer_id_of(LAYERS / "sub" / "x.qcow2", LAYERS) is None
    assert layer_id_of(LAYERS / "x.raw", LAYERS) is None
    assert layer_id_of(LAYERS / "x.qcow2", LAYERS) == "x"


def test_plan_fresh_overlay_on_a_base_image_leaves_format_to_detection() -> None:
    """The first layer of a VM sits on the base, whose format is unknown until read."""
    plan = plan_fresh_overlay(LAYERS, "p1", BASE)
    assert isinstance(plan, OverlayPlan)
    assert plan.backing == BASE
    assert plan.backing_format is None
    assert plan.path == LAYERS / f"{plan.layer_id}{LAYER_SUFFIX}"
    assert plan.layer_id.startswith("p1-")


def test_plan_fresh_overlay_on_a_layer_is_qcow2_on_qcow2() -> None:
    """An overlay on one of our layers (restore of a state) knows its backing is qcow2."""
    state_layer = layer_path(LAYERS, "p1-20261126060512-abcdef")
    plan = plan_fresh_overlay(LAYERS, "p1", state_layer)
    assert plan.backing == state_layer
    assert plan.backing_format == "qcow2"
    assert plan.path != state_layer


def test_plan_fresh_overlay_takes_a_given_format() -> None:
    """A caller that knows the base's format passes it and no detection is needed."""
    assert plan_fresh_overlay(LAYERS, "p1", BASE, backing_format="raw").backing_format == "raw"


def test_two_fresh_overlays_on_one_layer_are_different_files() -> None:
    """Restoring the same state twice plans two distinct layers on the same backing."""
    a = plan_fresh_overlay(LAYERS, "p1", BASE)
    b = plan_fresh_overlay(LAYERS, "p1", BASE)
    assert a.path != b.path
    assert a.backing == b.backing


@pytest.mark.parametrize(
    ("layers_dir", "backing"),
    [(Path("layers"), BASE), (LAYERS, Path("rootfs.qcow2"))],
)
def test_plan_fresh_overlay_needs_absolute_paths(layers_dir: Path, backing: Path) -> None:
    """qcow2 headers name backing files by absolute path, so relative ones are refused."""
    with pytest.raises(DiskError, match="absolute path"):
        plan_fresh_overlay(layers_dir, "p1", backing)


def test_split_chain_gives_base_and_layer_ids() -> None:
    """A base-first chain of files becomes the base image and the layer ids a state records."""
    chain = [BASE, LAYERS / "a.qcow2", LAYERS / "b.qcow2"]
    assert split_chain(chain, LAYERS) == (BASE, ["a", "b"])
    assert split_chain([BASE], LAYERS) == (BASE, [])


def test_split_chain_refuses_foreign_layers_and_empty_chains() -> None:
    """A layer lockstep did not make cannot be tracked, and a chain needs a base."""
    with pytest.raises(DiskError, match="not a lockstep layer"):
        split_chain([BASE, Path("/tmp/other.qcow2")], LAYERS)
    with pytest.raises(DiskError, match="no base image"):
        split_chain([], LAYERS)


@given(
    st.sets(layer_ids),
    st.lists(st.lists(layer_ids, max_size=5), max_size=4),
)
def test_unreachable_layers_are_exactly_those_no_chain_keeps(
    all_layers: set[str], chains: list[list[str]]
) -> None:
    """Garbage is every known layer no kept chain uses, and never a layer a chain uses."""
    garbage = unreachable_layers(all_layers, chains)
    used = {layer for chain in chains for layer in chain}
    assert garbage <= all_layers
    assert not garbage & used
    assert garbage | (all_layers & used) == all_layers


@given(layer_ids, st.dictionaries(st.sampled_from(["s1", "s2", "vm1"]), st.lists(layer_ids)))
def test_dependents_are_the_chains_containing_the_layer(
    layer: str, chains: dict[str, list[str]]
) -> None:
    """A name depends on a layer exactly when its chain contains it."""
    deps = dependents(layer, chains)
    assert deps == {name for name, chain in chains.items() if layer in chain}


def test_state_tree_snapshot_of_a_snapshot() -> None:
    """A tree of states shares layers: dependents and garbage follow the chains.

    base ← a1 (state S1) ← a2 (state S2, saved after running on from S1)
                         ← r1 (restore of S1, then state S3) ← r2 (running VM)
    """
    a1 = plan_fresh_overlay(LAYERS, "p1", BASE)
    a2 = plan_fresh_overlay(LAYERS, "p1", a1.path)
    r1 = plan_fresh_overlay(LAYERS, "p1", a1.path)
    r2 = plan_fresh_overlay(LAYERS, "p1", r1.path)
    assert a2.backing_format == r1.backing_format == r2.backing_format == "qcow2"
    assert a1.backing_format is None
    ids = {p.layer_id for p in (a1, a2, r1, r2)}
    assert len(ids) == 4

    states = {
        "S1": [a1.layer_id],
        "S2": [a1.layer_id, a2.layer_id],
        "S3": [a1.layer_id, r1.layer_id],
    }
    running = {"vm:p1": [a1.layer_id, r1.layer_id, r2.layer_id]}
    chains = {**states, **running}

    assert dependents(a1.layer_id, chains) == {"S1", "S2", "S3", "vm:p1"}
    assert dependents(a2.layer_id, chains) == {"S2"}
    assert dependents(r1.layer_id, chains) == {"S3", "vm:p1"}
    assert dependents(r2.layer_id, chains) == {"vm:p1"}

    # Deleting S2 frees its own layer only; S1's layer is still under S3 and the VM.
    kept = [c for name, c in chains.items() if name != "S2"]
    assert unreachable_layers(ids, kept) == {a2.layer_id}
    # With the VM stopped and S3 gone too, only S1's layer stays.
    assert unreachable_layers(ids, [states["S1"]]) == {a2.layer_id, r1.layer_id, r2.layer_id}
    # Nothing kept: everything is garbage; every chain kept: nothing is.
    assert unreachable_layers(ids, []) == ids
    assert unreachable_layers(ids, chains.values()) == set()
