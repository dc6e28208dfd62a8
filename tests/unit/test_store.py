"""Unit tests of the state store: manifests, staging, commit, listing, verify, delete."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockstep.errors import StateDamaged, StateExists, StateInUse, StateNotFound, StoreError
from lockstep.store import (
    MANIFEST_FILE,
    DiskRecord,
    FileRecord,
    Manifest,
    StagingState,
    StateStore,
    VmRecord,
    utc_now,
)

BASE = "/images/rootfs.qcow2"


def make_manifest(
    name: str,
    chains: dict[str, list[str]],
    *,
    parent: str | None = None,
    created_at: str = "2026-11-26T06:00:00.000Z",
    memory: bool = True,
) -> Manifest:
    """A manifest for state ``name`` whose VMs have the given layer chains."""
    vms = {
        vm: VmRecord(
            disks=[DiskRecord(target="vda", base=BASE, chain=chain)],
            spec={"memory": 256 << 20},
            memory=f"{vm}.mem" if memory else None,
            frames=[f"frames/{vm}.pcap"] if memory else [],
        )
        for vm, chain in chains.items()
    }
    return Manifest(
        name=name, group="lab", host="h1", created_at=created_at, parent=parent, vms=vms
    )


def save(
    store: StateStore,
    name: str,
    chains: dict[str, list[str]],
    **kwargs: Any,
) -> Manifest:
    """Write and commit state ``name`` with a memory and a frame file per VM."""
    staging = store.begin(name)
    for vm in chains:
        staging.file(f"{vm}.mem").write_bytes(f"memory of {vm} in {name}".encode())
        staging.file(f"frames/{vm}.pcap").write_bytes(b"\xd4\xc3\xb2\xa1" + vm.encode())
    return staging.commit(make_manifest(name, chains, **kwargs))


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    """An empty store in a fresh folder."""
    return StateStore(tmp_path / "root")


def tree_of_files(folder: Path) -> set[str]:
    """Every path under ``folder``, relative, to compare before and after."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


# --- manifest ----------------------------------------------------------------


def test_manifest_round_trips_through_json() -> None:
    """A manifest written with to_json reads back equal, files, extra and all."""
    m = make_manifest("base", {"p1": ["a1", "a2"], "s1": ["b1"]}, parent="zero")
    m = Manifest.model_validate(
        {
            **m.model_dump(),
            "files": {"p1.mem": FileRecord(size=3, sha256="0" * 64)},
            "complete": True,
            "extra": {"timings": {"pause_ms": 1.5}},
        }
    )
    back = Manifest.from_json(m.to_json())
    assert back == m
    assert back.layers() == {"a2", "b1"}
    assert back.chains() == {"p1": ["a1", "a2"], "s1": ["b1"]}


def test_a_vm_without_a_disk_has_no_layer_chain_or_base() -> None:
    """A kernel-only VM records no disk; a one-disk record of before reads as disk vda.

    Such a record (``layer``, ``chain``, ``base``) with a layer but no base,
    or a base alone, is refused, as it always was.
    """
    diskless = VmRecord(spec={"kernel": "/boot/vmlinuz"}, memory="p1.mem")
    m = Manifest(
        name="s",
        group="lab",
        host="h1",
        created_at="2026-11-26T06:00:00+00:00",
        vms={"p1": diskless, "s1": VmRecord(layer="b1", chain=["b1"], base=BASE)},  # type: ignore[call-arg]
    )
    assert m.vms["s1"].disks == [DiskRecord(target="vda", base=BASE, chain=["b1"])]
    assert Manifest.from_json(m.to_json()) == m
    assert m.layers() == {"b1"}
    assert m.chains() == {"s1": ["b1"]}
    with pytest.raises(ValueError, match="needs the base image"):
        VmRecord(layer="a1", chain=["a1"])  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="without a layer has no chain and no base"):
        VmRecord(base=BASE)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="not an absolute path"):
        VmRecord(disks=[DiskRecord(target="vda", base="rootfs.qcow2", chain=["a1"])])


def test_every_disk_of_a_vm_is_kept_and_counted() -> None:
    """A VM's disks each freeze at their last layer; the state frees or keeps all of them.

    A disk whose chain is empty froze its base image itself (a libvirt
    domain's own disk): no layer of it is the state's. A disk listed twice
    (kept and left alone) is refused.
    """
    rec = VmRecord(
        disks=[
            DiskRecord(target="vda", base=BASE, chain=["a1", "a2"]),
            DiskRecord(target="vdb", base="/images/data.qcow2", chain=["b1"]),
            DiskRecord(target="vdc", base="/var/lib/libvirt/images/db1.qcow2"),
        ],
        skipped={"hda": "read-only"},
    )
    m = Manifest(
        name="s", group="lab", host="h1", created_at="2026-11-26T06:00:00Z", vms={"p1": rec}
    )
    assert Manifest.from_json(m.to_json()) == m
    assert [d.layer for d in rec.disks] == ["a2", "b1", None]
    assert m.layers() == {"a2", "b1"}
    assert m.chains() == {"p1": ["a1", "a2", "b1"]}
    with pytest.raises(ValueError, match="a disk appears twice"):
        VmRecord(disks=rec.disks, skipped={"vdb": "read-only"})


@given(
    st.dictionaries(
        st.from_regex(r"\A[a-z][a-z0-9]{0,8}\Z"),
        st.lists(st.from_regex(r"\A[a-z][a-z0-9-]{0,20}\Z"), min_size=1, max_size=4, unique=True),
        max_size=4,
    )
)
def test_any_valid_manifest_round_trips(chains: dict[str, list[str]]) -> None:
    """Round trip holds for any set of VMs and chains."""
    m = make_manifest("s", chains, created_at=utc_now())
    assert Manifest.from_json(m.to_json().encode()) == m


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "corrupt"),
        ('{"name": "x"}', "is missing"),
        (None, "is not a known field"),
        (None, "must end with the state's layer"),
        (None, "not a UTC time"),
        (None, "file name"),
    ],
)
def test_corrupt_manifest_is_a_store_error_naming_the_file(text: str | None, says: str) -> None:
    """Broken JSON, missing or unknown fields and bad values give one sentence naming the file."""
    good = json.loads(make_manifest("s", {"p1": ["a1"]}).to_json())
    if text is None:
        if says == "is not a known field":
            good["surprise"] = 1
        elif says.startswith("must end"):
            good["vms"]["p1"] = {"layer": "a1", "chain": ["a1", "other"], "base": BASE}
        elif says.startswith("not a UTC"):
            good["created_at"] = "2026-11-26T06:00:00+09:00"
        else:
            good["vms"]["p1"]["memory"] = "../../etc/passwd"
        text = json.dumps(good)
    with pytest.raises(StoreError, match=says) as info:
        Manifest.from_json(text, "/r/states/s/manifest.json")
    assert "state manifest /r/states/s/manifest.json is corrupt" in str(info.value)
    assert info.value.__cause__ is not None


# --- begin / commit / list / show --------------------------------------------


def test_begin_commit_list_show(store: StateStore) -> None:
    """A committed state lists, shows with every file's size and checksum, and verifies."""
    staging = store.begin("base")
    assert staging.path.parent == store.staging_dir
    m = save(store, "first", {"p1": ["a1"], "s1": ["b1"]})
    assert m.complete
    assert set(m.files) == {"p1.mem", "s1.mem", "frames/p1.pcap", "frames/s1.pcap"}
    assert m.files["p1.mem"].size == len(b"memory of p1 in first")
    assert [x.name for x in store.list()] == ["first"]
    assert store.show("first") == m
    assert (store.states_dir / "first" / MANIFEST_FILE).is_file()
    store.verify("first")
    staging.abort()
    assert list(store.staging_dir.iterdir()) == []


def test_commit_leaves_no_staging_and_fixes_files_and_complete(store: StateStore) -> None:
    """Commit replaces the caller's files/complete with what is really there, then moves."""
    staging = store.begin("s")
    staging.file("p1.mem").write_bytes(b"abc")
    claimed = make_manifest("s", {"p1": ["a1"]}, memory=False)
    claimed = Manifest.model_validate(
        {**claimed.model_dump(), "complete": True, "files": {"x": {"size": 1, "sha256": "0" * 64}}}
    )
    m = staging.commit(claimed)
    assert staging.state is StagingState.COMMITTED
    assert staging.path == store.states_dir / "s"
    assert set(m.files) == {"p1.mem"}
    assert m.files["p1.mem"].sha256 == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert list(store.staging_dir.iterdir()) == []


def test_list_is_sorted_by_creation_time(store: StateStore) -> None:
    """States list oldest first, whatever their names."""
    save(store, "zz", {"p1": ["a"]}, created_at="2026-01-01T00:00:00Z")
    save(store, "aa", {"p1": ["b"]}, created_at="2026-03-01T00:00:00Z")
    save(store, "mm", {"p1": ["c"]}, created_at="2026-02-01T00:00:00+00:00")
    assert [m.name for m in store.list()] == ["zz", "mm", "aa"]


def test_duplicate_name_is_refused_at_begin(store: StateStore) -> None:
    """A second state of the same name is refused up front, saying what to do."""
    save(store, "base", {"p1": ["a1"]})
    with pytest.raises(StateExists, match=r"choose another name or `lockstep state delete base`"):
        store.begin("base")
    assert list(store.staging_dir.iterdir()) == []


def test_duplicate_name_appearing_meanwhile_is_refused_at_commit(store: StateStore) -> None:
    """If the name is committed while a staging is open, commit refuses and leaves it for abort."""
    first = store.begin("race")
    second = store.begin("race")
    second.file("p1.mem").write_bytes(b"second")
    first.file("p1.mem").write_bytes(b"first")
    first.commit(make_manifest("race", {"p1": ["a1"]}, memory=False))
    with pytest.raises(StateExists, match="race"):
        second.commit(make_manifest("race", {"p1": ["a2"]}, memory=False))
    assert second.state is StagingState.OPEN
    assert second.path.is_dir()
    second.abort()
    assert not second.path.exists()
    assert (store.states_dir / "race" / "p1.mem").read_bytes() == b"first"
    assert store.show("race").vms["p1"].disks[0].layer == "a1"


def test_empty_dir_at_target_is_not_replaced(store: StateStore) -> None:
    """A stray empty states/<name> (which rename could replace) is treated as existing."""
    staging = store.begin("s")
    (store.states_dir / "s").mkdir()
    with pytest.raises(StateExists):
        staging.commit(make_manifest("s", {"p1": ["a1"]}, memory=False))
    staging.abort()


def test_abort_leaves_nothing_and_is_idempotent(store: StateStore) -> None:
    """Aborting removes the staging dir and all it holds; a second abort does nothing."""
    before = tree_of_files(store.root)
    staging = store.begin("s")
    staging.file("frames/p1.pcap").write_bytes(b"x" * 1000)
    staging.abort()
    staging.abort()
    assert tree_of_files(store.root) == before
    assert store.list() == []


def test_staging_refuses_use_after_abort_and_abort_after_commit_is_harmless(
    store: StateStore,
) -> None:
    """A closed staging cannot be written or committed; abort after commit keeps the state."""
    aborted = store.begin("a")
    aborted.abort()
    with pytest.raises(StoreError, match="aborted already"):
        aborted.file("x")
    with pytest.raises(StoreError, match="aborted already"):
        aborted.commit(make_manifest("a", {}))
    done = store.begin("b")
    done.commit(make_manifest("b", {}))
    done.abort()
    assert store.show("b").name == "b"


def test_commit_refuses_a_manifest_for_another_state(store: StateStore) -> None:
    """A staging only commits its own state."""
    staging = store.begin("a")
    with pytest.raises(StoreError, match="for state 'b' as state 'a'"):
        staging.commit(make_manifest("b", {}))


def test_commit_refuses_when_memory_or_frames_are_missing(store: StateStore) -> None:
    """A manifest naming files that were never written cannot be committed."""
    staging = store.begin("s")
    staging.file("p1.mem").write_bytes(b"m")
    with pytest.raises(StoreError, match=r"missing.*p1: frames/p1\.pcap"):
        staging.commit(make_manifest("s", {"p1": ["a1"]}))
    assert store.list() == []
    staging.abort()


def test_commit_refuses_symlinks(store: StateStore, tmp_path: Path) -> None:
    """A symlink in the staging dir could point outside the store, so commit refuses it."""
    staging = store.begin("s")
    (tmp_path / "outside").write_bytes(b"secret")
    staging.file("link").symlink_to(tmp_path / "outside")
    with pytest.raises(StoreError, match="not a plain file"):
        staging.commit(make_manifest("s", {}))
    staging.abort()


def test_staging_is_never_listed_nor_shown(store: StateStore) -> None:
    """A state being written (even with its manifest already there) is invisible."""
    staging = store.begin("wip")
    staging.file("p1.mem").write_bytes(b"m")
    (staging.path / MANIFEST_FILE).write_text(make_manifest("wip", {}).to_json())
    assert store.list() == []
    with pytest.raises(StateNotFound, match=f"no state 'wip' in {re.escape(str(store.root))}"):
        store.show("wip")


def test_cleanup_staging_removes_leftovers_of_a_crash(store: StateStore) -> None:
    """Staging dirs left by a crash (writing or deleting) are removed at start; states stay."""
    save(store, "kept", {"p1": ["a1"]})
    left = [store.begin("one"), store.begin("two")]
    left[0].file("p1.mem").write_bytes(b"half")
    removed = store.cleanup_staging()
    assert sorted(removed) == sorted(s.path for s in left)
    assert list(store.staging_dir.iterdir()) == []
    assert [m.name for m in store.list()] == ["kept"]


def test_incomplete_or_corrupt_state_dirs_are_not_found(store: StateStore) -> None:
    """A states/ folder without a good, complete manifest is skipped by list and not shown."""
    save(store, "good", {"p1": ["a1"]})
    (store.states_dir / "empty").mkdir()
    (store.states_dir / "corrupt").mkdir()
    (store.states_dir / "corrupt" / MANIFEST_FILE).write_text("{")
    (store.states_dir / "partial").mkdir()
    (store.states_dir / "partial" / MANIFEST_FILE).write_text(
        make_manifest("partial", {}).to_json()
    )
    (store.states_dir / "other").mkdir()
    (store.states_dir / "other" / MANIFEST_FILE).write_text(store.show("good").to_json())
    (store.states_dir / "bad..name").mkdir()
    assert [m.name for m in store.list()] == ["good"]
    with pytest.raises(StateNotFound, match="has no manifest"):
        store.show("empty")
    with pytest.raises(
        StateNotFound, match=rf"'corrupt' in {re.escape(str(store.root))} is not usable.*JSON"
    ):
        store.show("corrupt")
    with pytest.raises(StateNotFound, match=r"'partial' .* is not complete"):
        store.show("partial")
    with pytest.raises(StateNotFound, match="manifest is for state 'good'"):
        store.show("other")


# --- names and paths ---------------------------------------------------------


BAD_NAMES = ["../x", "a/b", "", ".", "..", "/abs", "x..y", "-x", "a\x00b", "a b", "x" * 64]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_state_names_are_refused_everywhere(store: StateStore, name: str) -> None:
    """Names that could reach outside the store are refused and nothing is written."""
    before = tree_of_files(store.root.parent)
    for call in (store.begin, store.show, store.verify, store.delete):
        with pytest.raises(StoreError, match="state name"):
            call(name)
    assert tree_of_files(store.root.parent) == before


@pytest.mark.parametrize(
    "rel", ["../x", "a/../../x", "/etc/passwd", "", ".", "a//b", "a/./b", MANIFEST_FILE, "a\\b"]
)
def test_staging_file_refuses_traversal(store: StateStore, rel: str) -> None:
    """Files of a state stay inside its staging dir; the manifest's name is reserved."""
    staging = store.begin("s")
    with pytest.raises(StoreError, match="'s'"):
        staging.file(rel)
    staging.abort()


def test_staging_file_allows_subfolders(store: StateStore) -> None:
    """Nested relative names are fine and their folders are made."""
    staging = store.begin("s")
    path = staging.file("frames/p1.pcap")
    assert path == staging.path / "frames" / "p1.pcap"
    assert path.parent.is_dir()
    staging.abort()


# --- verify ------------------------------------------------------------------


def test_verify_catches_a_flipped_byte(store: StateStore) -> None:
    """One changed byte in a memory file is found, and the error names that file."""
    save(store, "s", {"p1": ["a1"], "s1": ["b1"]})
    path = store.states_dir / "s" / "s1.mem"
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"{re.escape(str(path))} does not match its checksum"):
        store.verify("s")


def test_verify_catches_size_change_missing_and_extra_files(store: StateStore) -> None:
    """Truncated, removed and added files all fail verification, naming the file."""
    save(store, "s", {"p1": ["a1"]})
    folder = store.states_dir / "s"
    (folder / "extra").write_bytes(b"x")
    with pytest.raises(StoreError, match=r"extra was not committed"):
        store.verify("s")
    (folder / "extra").unlink()
    (folder / "p1.mem").write_bytes(b"short")
    with pytest.raises(StoreError, match=r"p1\.mem has 5 bytes"):
        store.verify("s")
    (folder / "frames" / "p1.pcap").unlink()
    with pytest.raises(StoreError, match=r"p1\.pcap is missing"):
        store.verify("s")


def test_shallow_verify_checks_sizes_and_small_files_and_names_host_vm_and_file(
    store: StateStore,
) -> None:
    """Without ``deep``, every size and the frames' and device state's hashes are checked.

    The guests' RAM (a standard path's whole memory stream) is only sized: a
    changed byte in it passes a shallow check and fails a deep one. Damage is
    one sentence naming the host, the VM, what the file is and its path.
    """
    save(store, "s", {"p1": ["a1"]})
    folder = store.states_dir / "s"
    ram = folder / "p1.mem"  # no RAM image: the stream holds the RAM
    data = bytearray(ram.read_bytes())
    data[0] ^= 0x01
    ram.write_bytes(bytes(data))
    shallow = store.verify("s", deep=False)
    assert shallow.files == 2 and shallow.hashed_bytes == (folder / "frames/p1.pcap").stat().st_size
    with pytest.raises(
        StateDamaged, match=r"on host h1 is damaged: VM p1's memory stream .*p1\.mem"
    ):
        store.verify("s", deep=True)
    frames = folder / "frames" / "p1.pcap"
    frames.write_bytes(frames.read_bytes()[:-1] + b"X")
    with pytest.raises(StateDamaged, match=r"VM p1's held frames .*p1\.pcap does not match"):
        store.verify("s", deep=False)
    frames.write_bytes(b"short")
    with pytest.raises(
        StateDamaged, match=r"has 5 bytes, not the 6 committed; nothing was changed"
    ):
        store.verify("s", deep=False)


# --- delete ------------------------------------------------------------------


def test_delete_refused_while_a_child_state_depends_on_it(store: StateStore) -> None:
    """A state whose layer another state's chain uses cannot be deleted; the child is named."""
    save(store, "base", {"p1": ["a1"], "s1": ["b1"]})
    save(store, "after-failover", {"p1": ["a1", "a2"], "s1": ["b1", "b2"]}, parent="base")
    with pytest.raises(
        StateInUse,
        match=(
            r"^state 'base' cannot be deleted: states 'after-failover' depend on its disk"
            r" layers; delete those states first$"
        ),
    ):
        store.delete("base")
    assert {m.name for m in store.list()} == {"base", "after-failover"}


def test_delete_refused_while_a_running_vm_depends_on_it(store: StateStore) -> None:
    """A state restored into running VMs cannot be deleted; the VMs are named."""
    save(store, "base", {"p1": ["a1"], "s1": ["b1"]})
    active = {"p1": ["a1", "r1"], "s1": ["b1", "r2"], "x9": ["zz"]}
    with pytest.raises(
        StateInUse, match=r"VMs 'p1', 's1' depend.*stop those VMs or restore another state into"
    ):
        store.delete("base", active)
    assert store.show("base").name == "base"


def test_delete_names_both_states_and_vms(store: StateStore) -> None:
    """When states and running VMs both depend on it, the message names both."""
    save(store, "base", {"p1": ["a1"]})
    save(store, "c1", {"p1": ["a1", "a2"]})
    save(store, "c2", {"p1": ["a1", "a3"]})
    with pytest.raises(
        StateInUse,
        match=r"states 'c1', 'c2' and VMs 'p1' depend.*delete those states and stop",
    ):
        store.delete("base", {"p1": ["a1", "a3", "a4"]})


def test_delete_a_leaf_returns_only_its_own_garbage(store: StateStore) -> None:
    """Deleting a child frees its own layers, never those its parent or siblings still use."""
    save(store, "base", {"p1": ["a1"], "s1": ["b1"]})
    save(store, "child", {"p1": ["a1", "a2"], "s1": ["b1", "b2"]})
    save(store, "sibling", {"p1": ["a1", "a3"], "s1": ["b1", "b3"]})
    before = tree_of_files(store.staging_dir)
    garbage = store.delete("child")
    assert garbage == ["a2", "b2"]
    assert {m.name for m in store.list()} == {"base", "sibling"}
    assert not (store.states_dir / "child").exists()
    assert tree_of_files(store.staging_dir) == before


def test_delete_keeps_layers_running_vms_use(store: StateStore) -> None:
    """A layer under a running VM (not frozen by this state) is not garbage."""
    save(store, "leaf", {"p1": ["a1", "a2"], "s1": ["b1"]})
    garbage = store.delete("leaf", {"p1": ["a1", "r9"]})
    assert garbage == ["a2", "b1"]


def test_delete_the_whole_tree_frees_every_layer_once(store: StateStore) -> None:
    """Deleting leaves then the root returns every layer exactly once over all deletes."""
    save(store, "base", {"p1": ["a1"]})
    save(store, "child", {"p1": ["a1", "a2"]})
    save(store, "grandchild", {"p1": ["a1", "a2", "a3"]})
    freed = store.delete("grandchild") + store.delete("child") + store.delete("base")
    assert freed == ["a3", "a2", "a1"]
    assert store.list() == []


def test_delete_of_a_missing_state_is_not_found(store: StateStore) -> None:
    """Deleting a state that is not here says so, naming the store."""
    with pytest.raises(StateNotFound, match=f"no state 'nope' in {re.escape(str(store.root))}"):
        store.delete("nope")


def test_delete_of_a_corrupt_state_frees_no_layers(store: StateStore) -> None:
    """A state with an unreadable manifest can still be removed; its layers are left alone."""
    save(store, "s", {"p1": ["a1"]})
    (store.states_dir / "s" / MANIFEST_FILE).write_text("garbage")
    assert store.delete("s") == []
    assert not (store.states_dir / "s").exists()


def test_layout_folders(tmp_path: Path) -> None:
    """The store creates layers/, states/ and staging/ under an absolute root."""
    s = StateStore(tmp_path / "r")
    assert s.layers_dir == tmp_path / "r" / "layers"
    assert s.states_dir.is_dir()
    assert s.staging_dir.is_dir()
    assert s.layers_dir.is_dir()
    assert str(tmp_path) in repr(s)
