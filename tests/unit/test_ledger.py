"""The lab ledger: its file format, atomic appends, removal, and process identity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lockstep.errors import LabError
from lockstep.lab.ledger import (
    Entry,
    Ledger,
    LinkEntry,
    NetnsEntry,
    PathEntry,
    ProcessEntry,
    lab_ledger_path,
    process_starttime,
)

ENTRIES: list[Entry] = [
    NetnsEntry("lslab-h1"),
    LinkEntry("lslab-lan"),
    LinkEntry("lan0", "lslab-h1"),
    ProcessEntry(pid=4242, starttime=123456, what="execd h1"),
    PathEntry("/var/lib/lockstep/lab/lslab/h1"),
]


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    """A ledger in a folder that does not exist yet (record must create it)."""
    return Ledger(tmp_path / "state" / "lab" / "t" / "ledger.json")


def test_round_trip_keeps_every_kind_in_order(ledger: Ledger) -> None:
    """Entries of every kind come back equal and in recording order, from a fresh reader."""
    assert not ledger.exists()
    assert ledger.entries() == []
    for entry in ENTRIES:
        ledger.record(entry)
    assert ledger.exists()
    assert Ledger(ledger.path).entries() == ENTRIES


def test_file_is_the_documented_json(ledger: Ledger) -> None:
    """The file is the JSON others read and write: format 1 and kind-tagged entries."""
    ledger.record(LinkEntry("lslab-lan"))
    ledger.record(ProcessEntry(pid=7, starttime=99, what="qemu p1"))
    doc = json.loads(ledger.path.read_text())
    assert doc == {
        "format": 1,
        "entries": [
            {"kind": "link", "name": "lslab-lan", "netns": None},
            {"kind": "process", "pid": 7, "starttime": 99, "what": "qemu p1"},
        ],
    }


def test_record_is_idempotent_and_leaves_no_temp_files(ledger: Ledger) -> None:
    """Recording an entry twice keeps one copy; the atomic rewrite leaves only ledger.json."""
    ledger.record(NetnsEntry("a"))
    ledger.record(NetnsEntry("a"))
    ledger.record(NetnsEntry("b"))
    assert ledger.entries() == [NetnsEntry("a"), NetnsEntry("b")]
    assert sorted(p.name for p in ledger.path.parent.iterdir()) == ["ledger.json"]


def test_forget_drops_only_that_entry(ledger: Ledger) -> None:
    """forget removes one entry (an object that turned out not to be ours) and keeps the rest."""
    for entry in ENTRIES:
        ledger.record(entry)
    ledger.forget(ENTRIES[1])
    ledger.forget(NetnsEntry("never-recorded"))
    assert ledger.entries() == [e for e in ENTRIES if e != ENTRIES[1]]


def test_remove_deletes_file_and_empty_folder(ledger: Ledger) -> None:
    """remove deletes the ledger and its lab folder when nothing else lives there."""
    ledger.record(NetnsEntry("a"))
    ledger.remove()
    assert not ledger.exists()
    assert not ledger.path.parent.exists()
    ledger.remove()  # removing what is not there is fine


def test_remove_keeps_a_folder_with_other_files(ledger: Ledger) -> None:
    """remove never deletes files others keep next to the ledger."""
    ledger.record(NetnsEntry("a"))
    other = ledger.path.parent / "group.toml"
    other.write_text("x")
    ledger.remove()
    assert not ledger.exists()
    assert other.exists()


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"format": 2, "entries": []}',
        '{"format": 1, "entries": {}}',
        '{"format": 1, "entries": [{"kind": "bogus"}]}',
        '{"format": 1, "entries": [{"kind": "link"}]}',
        '{"format": 1, "entries": [{"kind": "process", "pid": -1, "starttime": 1, "what": "x"}]}',
        '{"format": 1, "entries": [{"kind": "path", "path": "relative/dir"}]}',
        '{"format": 1, "entries": [{"kind": "path", "path": "/"}]}',
    ],
)
def test_damaged_ledger_is_a_clear_error(ledger: Ledger, text: str) -> None:
    """A damaged or foreign file is refused with a LabError naming it, never half-read."""
    ledger.path.parent.mkdir(parents=True)
    ledger.path.write_text(text)
    with pytest.raises(LabError, match="damaged") as info:
        ledger.entries()
    assert str(ledger.path) in str(info.value)


def test_default_path_follows_lockstep_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger lives in $LOCKSTEP_STATE/lab/<name>/, else under /var/lib/lockstep."""
    monkeypatch.setenv("LOCKSTEP_STATE", "/srv/ls")
    assert lab_ledger_path("lslab") == Path("/srv/ls/lab/lslab/ledger.json")
    assert Ledger.for_lab("x").path == Path("/srv/ls/lab/x/ledger.json")
    monkeypatch.delenv("LOCKSTEP_STATE")
    assert lab_ledger_path("lslab") == Path("/var/lib/lockstep/lab/lslab/ledger.json")


def test_process_entry_reads_field_22_of_stat() -> None:
    """A process entry carries the start time from /proc/<pid>/stat (field 22)."""
    entry = ProcessEntry.of(os.getpid(), "this test")
    stat = Path(f"/proc/{os.getpid()}/stat").read_text()
    after_comm = stat[stat.rindex(")") + 2 :].split()
    assert entry.starttime == int(after_comm[22 - 3])
    assert process_starttime(os.getpid()) == entry.starttime
    assert entry.alive()


def test_process_entry_with_other_starttime_is_not_alive() -> None:
    """A reused pid (same pid, other start time) does not count as the recorded process."""
    me = ProcessEntry.of(os.getpid(), "this test")
    reused = ProcessEntry(pid=me.pid, starttime=me.starttime + 1, what="long gone")
    assert not reused.alive()


def test_process_entry_of_a_missing_pid_is_refused() -> None:
    """Recording a process that does not run is an error, not a silent bad entry."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    missing = next(p for p in range(pid_max - 1, 1, -1) if not Path(f"/proc/{p}").exists())
    assert process_starttime(missing) is None
    with pytest.raises(LabError, match="not running"):
        ProcessEntry.of(missing, "ghost")
