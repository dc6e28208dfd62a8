"""A VM's runtime record (``vm.json``): its disks, and what a state or a spec makes of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lockstep.execd.ops import OperationError
from lockstep.execd.vms import DiskRuntime, VmRuntime, restored_disks, spec_disks
from lockstep.group import VmSpec
from lockstep.store import DiskRecord


def _spec() -> VmSpec:
    return VmSpec.model_validate(
        {
            "name": "p1",
            "host": "h1",
            "kernel": "/k",
            "disks": ["/img/root.qcow2", "/img/data.qcow2", {"path": "/iso", "readonly": True}],
        }
    )


def test_spec_disks_name_targets_in_order_and_say_which_are_left_alone() -> None:
    """The QEMU driver's disks are vda, vdb... in the spec's order, each on its image at first."""
    assert spec_disks(_spec()) == [
        DiskRuntime("vda", "/img/root.qcow2"),
        DiskRuntime("vdb", "/img/data.qcow2"),
        DiskRuntime("vdc", "/iso", skipped="read-only"),
    ]


def test_restored_disks_take_the_states_layers_by_target() -> None:
    """A restore puts each layered disk on the chain the state froze; a disk left alone stays.

    A state without a layer for a disk the spec layers cannot be restored.
    """
    frozen = [
        DiskRecord(target="vdb", base="/img/data.qcow2", chain=["d1"]),
        DiskRecord(target="vda", base="/img/root.qcow2", chain=["r1", "r2"]),
    ]
    assert restored_disks(_spec(), frozen) == [
        DiskRuntime("vda", "/img/root.qcow2", ["r1", "r2"]),
        DiskRuntime("vdb", "/img/data.qcow2", ["d1"]),
        DiskRuntime("vdc", "/iso", skipped="read-only"),
    ]
    with pytest.raises(OperationError, match="VM p1: the state has no layer for disk vdb"):
        restored_disks(_spec(), frozen[1:])


def test_runtime_round_trips_and_reads_a_one_disk_record_of_before() -> None:
    """``vm.json`` reads back equal; one an execd wrote before VMs had disks lists reads as vda.

    A running VM survives the upgrade of its execd: its layer chain is found again.
    """
    rt = VmRuntime(
        spec=_spec(),
        group="g",
        taps=["t0"],
        disks=[DiskRuntime("vda", "/img/root.qcow2", ["r1"]), DiskRuntime("vdb", "/d", ["d1"])],
    )
    back = VmRuntime.from_json(rt.to_json())
    assert back == rt
    assert back.layer_ids == ["r1", "d1"] and back.active_layers == ["r1", "d1"]
    old = json.loads(rt.to_json())
    del old["disks"]
    old["spec"]["disks"] = [{"path": "/img/root.qcow2"}]
    old |= {"layer": "r2", "chain": ["r1", "r2"]}
    legacy = VmRuntime.from_json(json.dumps(old))
    assert legacy.disks == [DiskRuntime("vda", "/img/root.qcow2", ["r1", "r2"])]
    assert legacy.spec.disks[0].path == Path("/img/root.qcow2")
