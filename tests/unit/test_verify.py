"""``lockstep lab verify``: reading the guests' console logs, across boots and restores.

The logs here are synthetic but shaped as the agent writes them (one test
drives the agent's own pure parts through a save and a restore). The hard case
is the restore: the console log is appended, and a restored guest goes back to
its saved line numbers, clock and counters.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner

from lockstep.cli.main import main
from lockstep.errors import LabError
from lockstep.lab.verify import (
    LAST_RESTORE,
    Since,
    VmInfo,
    analyse,
    log_marks,
    parse_line,
    parse_log,
    parse_since,
    timeline,
    verify_lab,
)

PAIR = [VmInfo("p1", "h1", "primary", "s1"), VmInfo("s1", "h2", "standby", "p1")]


class Guest:
    """Writes agent lines for one VM; :meth:`save` and :meth:`restore` rewind it like a VM."""

    def __init__(self, vm: str, run: str = "a1b2c3", t: float = 1000.0) -> None:
        self.vm, self.run, self.n, self.t = vm, run, 0, t
        self.lines: list[str] = []

    def say(self, event: str, **fields: Any) -> str:
        """Append one agent line ``dt`` (a field, default 1) guest seconds after the last; return it."""
        self.n += 1
        self.t += float(fields.pop("dt", 1.0))
        head = {"t": round(self.t, 3), "m": 0.0, "vm": self.vm, "r": self.run, "n": self.n}
        line = json.dumps({**head, "event": event, **fields}, separators=(",", ":"))
        self.lines.append(line)
        return line

    def noise(self, text: str) -> None:
        """A line that is not the agent's (kernel, init)."""
        self.lines.append(text)

    def save(self) -> tuple[int, float]:
        """The guest's state at a save."""
        return self.n, self.t

    def restore(self, saved: tuple[int, float]) -> None:
        """Go back to a saved state (the log stays: it is appended)."""
        self.n, self.t = saved

    def boot(self, run: str) -> None:
        """Reboot: a new run, numbering from 1, with a start line."""
        self.run, self.n = run, 0
        self.say("start", role="primary")

    def text(self) -> str:
        """The console log, with the CR LF line ends a tty writes."""
        return "\r\n".join(self.lines) + "\r\n"


def stats(g: Guest, sender: str, rx: int = 200, dt: float = 1.0, **cumulative: int) -> None:
    """One stream_stats line, ``dt`` guest seconds after the previous line."""
    g.say("stream_stats", dt=dt, **{"from": sender}, rx=rx, **cumulative)


def booted(vm: str, peer_role: str = "standby") -> Guest:
    """A guest that booted and logged its start and role."""
    g = Guest(vm)
    g.noise("[    0.000000] Linux version 6.1.0-56-amd64")
    g.noise("lockstep-init: ready")
    g.noise('{"event":"ready","t":1795674926.276415328}')
    role = "primary" if vm.startswith("p") else "standby"
    g.say("start", role=role)
    g.say("role", role=role)
    return g


# ── parsing ─────────────────────────────────────────────────────────────────


def test_only_the_agents_lines_are_read() -> None:
    """Kernel and init lines, fragments and init's own JSON are skipped; a noisy prefix is not."""
    good = '{"t":5.5,"m":1.0,"vm":"p1","r":"abc","n":3,"event":"role","role":"primary"}'
    assert parse_line(good) is not None
    assert parse_line("[   12.3] random: crng init done" + good + "\r\n") is not None
    for bad in (
        "[    0.000000] Linux version 6.1.0",
        '{"event":"ready","t":1795674926.27}',
        good[:40],  # a half line (the VM was stopped while writing it)
        good[:40] + good[25:],  # a half line, then the rest of another one
        good.replace('"n":3', '"n":0'),
        good.replace('"t":5.5', '"t":"soon"'),
        '{"t": [1, 2]}',
    ):
        assert parse_line(bad) is None, bad
    parsed = parse_line(good)
    assert parsed is not None and (parsed.vm, parsed.run, parsed.n, parsed.t) == (
        "p1",
        "abc",
        3,
        5.5,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, Since("all")),
        ("last-restore", Since(LAST_RESTORE)),
        ("1795674548.5", Since("time", 1795674548.5)),
        ("2026-11-26T06:30:00+00:00", Since("time", 1795674600.0)),
    ],
)
def test_since_spellings(text: str | None, expected: Since) -> None:
    """--since takes last-restore, unix seconds or an ISO 8601 time."""
    assert parse_since(text) == expected


def test_since_rejects_anything_else() -> None:
    """A --since that is none of its spellings is a ValueError naming them."""
    with pytest.raises(ValueError, match="last-restore"):
        parse_since("yesterday")


# ── timelines ───────────────────────────────────────────────────────────────


def test_timeline_cuts_the_log_at_boots_and_restores() -> None:
    """A start line begins a boot; line numbers going back begin a restore; skipped ones are counted."""
    g = booted("p1")
    saved = g.save()
    g.say("heartbeat_stats")
    g.say("heartbeat_stats")
    g.restore(saved)
    g.say("heartbeat_stats")
    g.n += 2  # two lines lost on the console
    g.say("heartbeat_stats")
    g.boot("d4e5f6")
    tl = timeline(parse_log(g.text(), "p1"))
    assert [(s.kind, s.first_n) for s in tl.segments] == [("boot", 1), ("restore", 3), ("boot", 1)]
    assert tl.missing_lines == 2
    assert tl.restores() == [1]


def test_a_log_that_starts_mid_run_is_one_segment() -> None:
    """Without a start line (the log was cut), the first line begins a plain segment."""
    g = Guest("p1")
    g.n = 40
    g.say("heartbeat_stats")
    g.say("heartbeat_stats")
    tl = timeline(parse_log(g.text()))
    assert [s.kind for s in tl.segments] == ["log"]


def test_lines_the_restored_guest_writes_again_are_not_counted_twice() -> None:
    """Lines that sat in the serial buffer at the save come out again after the restore: replays."""
    g = booted("s1")
    saved = g.save()
    gap = g.say("stream_gap", **{"from": "p1"}, gaps=1, lost=4)  # written, still in the buffer
    heartbeat = g.say("heartbeat_stats")
    g.say("heartbeat_stats")
    g.restore(saved)
    g.lines += [gap, heartbeat]  # the restored guest's serial port sends them again
    g.n += 2
    g.say("heartbeat_stats")
    tl = timeline(parse_log(g.text()))
    assert [e.replay for e in tl.entries] == [False] * 5 + [True, True, False]
    report = analyse("lab", PAIR, {"s1": g.text(), "p1": booted("p1").text()})
    assert report.total("lost") == 4
    assert next(v for v in report.vms if v.info.name == "s1").replayed == 2


def test_equal_numbers_with_other_content_are_not_replays() -> None:
    """After a restore only an identical line is a replay; the first different one ends them."""
    g = booted("s1")
    saved = g.save()
    g.say("heartbeat_stats", rx=10)
    g.restore(saved)
    g.say("heartbeat_stats", rx=9)  # same number, written anew
    tl = timeline(parse_log(g.text()))
    assert [e.replay for e in tl.entries] == [False, False, False, False]


# ── counting ───────────────────────────────────────────────────────────────


def test_a_takeover_and_split_brain_are_counted_per_pair() -> None:
    """s1 took over and both saw split brain begin (and repeat): 1 transition, 2 onsets."""
    p1, s1 = booted("p1"), booted("s1")
    s1.say("heartbeat_miss", silent_s=2.1)
    s1.say("takeover", **{"from": "standby", "to": "primary"}, why="peer silent", silent_s=3.01)
    for g in (p1, s1):
        g.say("split_brain", onset=True, peer_role="primary")
        g.say("split_brain", onset=False, peer_role="primary")
    report = analyse("lab", PAIR, {"p1": p1.text(), "s1": s1.text()}).to_json()
    assert report["transitions"] == 1 and report["split_brain"] == 2 and not report["ok"]
    assert report["pairs"] == [
        {
            "pair": "p1/s1",
            "primary": "p1",
            "standby": "s1",
            "transitions": 1,
            "split_brain": 2,
            "heartbeat_misses": 1,
            "roles_now": {"p1": "primary", "s1": "primary"},
        }
    ]
    s1_json = next(v for v in report["vms"] if v["name"] == "s1")
    assert s1_json["transitions"][0]["silent_s"] == 3.01


def test_stream_anomalies_are_summed_per_stream_from_their_deltas() -> None:
    """Gap, late and duplicate lines add up; a late arrival takes its loss back."""
    p1, s1 = booted("p1"), booted("s1")
    s1.say("stream_gap", **{"from": "p1"}, gaps=2, lost=5)
    s1.say("stream_reorder", **{"from": "p1"}, reordered=1, lost=-1)
    s1.say("stream_dup", **{"from": "p1"}, duplicated=3)
    stats(s1, "p1", rx=190, last_seq=999)
    stats(p1, "s1", rx=200, last_seq=1999)
    report = analyse("lab", PAIR, {"p1": p1.text(), "s1": s1.text()}).to_json()
    assert (report["lost"], report["duplicated"], report["reordered"]) == (4, 3, 1)
    assert report["received"] == 390
    assert report["streams"] == [
        {"from": "p1", "to": "s1", "received": 190, "lost": 4, "duplicated": 3,
         "reordered": 1, "gaps": 2, "last_seq": 999},
        {"from": "s1", "to": "p1", "received": 200, "lost": 0, "duplicated": 0,
         "reordered": 0, "gaps": 0, "last_seq": 1999},
    ]  # fmt: skip


def test_a_quiet_lab_is_ok_and_a_silent_guest_is_not() -> None:
    """No anomaly and every agent logging: ok. A guest whose agent never logged: a warning."""
    p1, s1 = booted("p1"), booted("s1")
    stats(p1, "s1")
    stats(s1, "p1")
    assert analyse("lab", PAIR, {"p1": p1.text(), "s1": s1.text()}).ok
    report = analyse("lab", PAIR, {"p1": p1.text(), "s1": "[ 1.0] kernel only\n"})
    assert not report.ok
    assert report.warnings == ["s1: no line of the cluster agent in this window"]


def test_anomalies_of_an_abandoned_timeline_count_once_and_not_after_the_restore() -> None:
    """Saved, then a loss, then restored to before it: the loss counts once, and not since the restore.

    Naively concatenating the two timelines would compare the restored guest's
    counters with the abandoned ones; the agent's deltas make each line count once.
    """
    p1, s1 = booted("p1"), booted("s1")
    saved = {g.vm: g.save() for g in (p1, s1)}
    stats(s1, "p1", received=200, lost=0, last_seq=199)
    s1.say("stream_gap", **{"from": "p1"}, gaps=1, lost=7)  # after the save: a test broke it
    stats(s1, "p1", received=393, lost=7, last_seq=399)
    for g in (p1, s1):
        g.say("heartbeat_stats")
        g.restore(saved[g.vm])
    # The restored guests, back at the save (their lines come a few ms apart from the first time's).
    stats(s1, "p1", dt=1.003, received=200, lost=0, last_seq=199)
    stats(p1, "s1", dt=1.003, received=200, lost=0, last_seq=199)
    logs = {"p1": p1.text(), "s1": s1.text()}
    everything = analyse("lab", PAIR, logs)
    assert everything.total("lost") == 7 and everything.total("received") == 800
    since = analyse("lab", PAIR, logs, Since(LAST_RESTORE))
    assert since.total("lost") == 0 and since.ok
    assert [v.restores for v in since.vms] == [1, 1]


def test_the_real_agents_state_restored_from_a_copy() -> None:
    """The agent's own receiver and log, rewound like a VM: the restored timeline counts from the save."""
    agent = _agent()
    out: list[bytes] = []
    clock = {"t": 2000.0}
    log = agent.ConsoleLog(out.append, "s1", "0a0b0c", wall=lambda: clock["t"], mono=lambda: 0.0)
    receiver, pending = agent.StreamReceiver(), agent.PendingAnomalies()

    def deliver(seqs: list[int]) -> None:
        for seq in seqs:
            clock["t"] += 0.005
            arrival, lost = receiver.receive(b"run", seq)
            pending.add(arrival, lost, seq)
            log.notes(pending.take("p1"))
        r = receiver
        log.say("stream_stats", **{"from": "p1"}, rx=len(seqs), received=r.received,
                lost=r.lost, duplicated=r.duplicated, reordered=r.reordered, last_seq=r.highest)  # fmt: skip

    log.say("start", role="standby")
    deliver(list(range(0, 100)))
    saved = copy.deepcopy((receiver, pending, log.lines, clock["t"]))
    deliver([100, 101, 105, 106, 104, 104])  # branch 1: 3 lost, 1 of them late, 1 duplicate
    receiver, pending, log.lines, clock["t"] = copy.deepcopy(saved)
    deliver(list(range(100, 200)))  # branch 2, from the saved state: clean
    text = b"".join(out).decode()
    report = analyse("lab", PAIR[1:], {"s1": text})
    assert (report.total("lost"), report.total("reordered"), report.total("duplicated")) == (
        2,
        1,
        1,
    )
    since = analyse("lab", PAIR[1:], {"s1": text}, Since(LAST_RESTORE))
    assert since.ok and since.total("received") == 100


def test_since_last_restore_needs_a_restore_in_every_log() -> None:
    """A guest whose log shows no restore cannot be cut at one: a LabError naming it."""
    p1, s1 = booted("p1"), booted("s1")
    saved = p1.save()
    p1.say("heartbeat_stats")
    p1.restore(saved)
    p1.say("heartbeat_stats")
    with pytest.raises(LabError, match="s1 show no restore"):
        analyse("lab", PAIR, {"p1": p1.text(), "s1": s1.text()}, Since(LAST_RESTORE))


def test_since_time_is_on_the_guests_clock() -> None:
    """--since TIME counts the lines whose guest time is TIME or later."""
    p1, s1 = booted("p1"), booted("s1")
    s1.say("stream_gap", **{"from": "p1"}, gaps=1, lost=2)  # t = 1003
    s1.say("stream_gap", **{"from": "p1"}, gaps=1, lost=5)  # t = 1004
    logs = {"p1": p1.text(), "s1": s1.text()}
    assert analyse("lab", PAIR, logs, Since("time", 1003.5)).total("lost") == 5
    assert analyse("lab", PAIR, logs, Since("time", 1003.0)).total("lost") == 7


# ── the command ────────────────────────────────────────────────────────────


def _agent() -> ModuleType:
    path = Path(str(resources.files("lockstep.lab").joinpath("guest", "lsagent.py")))
    spec = importlib.util.spec_from_file_location("lsagent", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lsagent"] = module
    spec.loader.exec_module(module)
    return module


def _lab_on_disk(state: Path, name: str, logs: dict[str, str]) -> None:
    """A lab's data dir as ``lab up`` leaves it: lab.json and the console logs."""
    data = state / "lab" / name / "data"
    vms = [{"name": v.name, "host": v.host, "role": v.role, "peer": v.peer} for v in PAIR]
    data.mkdir(parents=True)
    (data / "lab.json").write_text(json.dumps({"options": {}, "vms": vms}))
    for v in PAIR:
        log = data / "hosts" / v.host / "root" / "run" / v.name / "console.log"
        log.parent.mkdir(parents=True)
        log.write_text(logs[v.name])


def test_verify_command_prints_one_json_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lockstep lab verify --json` reads the lab's logs; --check exits 1 when something was noticed."""
    monkeypatch.setenv("LOCKSTEP_STATE", str(tmp_path))
    p1, s1 = booted("p1"), booted("s1")
    s1.say("stream_dup", **{"from": "p1"}, duplicated=2)
    _lab_on_disk(tmp_path, "lsvq", {"p1": p1.text(), "s1": s1.text()})
    runner = CliRunner()
    result = runner.invoke(main, ["lab", "verify", "--name", "lsvq", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    for key in ("transitions", "split_brain", "lost", "duplicated", "reordered"):
        assert key in document
    assert document["duplicated"] == 2 and document["ok"] is False
    assert runner.invoke(main, ["lab", "verify", "--name", "lsvq", "--check"]).exit_code == 1
    table = runner.invoke(main, ["lab", "verify", "--name", "lsvq"])
    assert table.exit_code == 0 and "p1/s1" in table.output


def test_marks_limit_verify_to_what_came_after_and_still_find_the_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After log_marks, verify counts only later lines, yet sees a restore right after the mark.

    The restored guests' first lines follow the mark directly (their old
    timelines logged nothing in between): the restore shows only against the
    last line before the mark, which places them but is not counted. The
    longest silence is the heartbeat figure or a takeover's, whichever is longer.
    """
    monkeypatch.setenv("LOCKSTEP_STATE", str(tmp_path))
    p1, s1 = booted("p1"), booted("s1")
    saved = {g.vm: g.save() for g in (p1, s1)}
    for g in (p1, s1):
        g.say("heartbeat_stats", gap_max_s=2.5)  # before the mark: not counted
    _lab_on_disk(tmp_path, "lsvm", {"p1": p1.text(), "s1": s1.text()})
    marks = log_marks("lsvm")
    assert verify_lab("lsvm").longest_silence() == 2.5
    assert verify_lab("lsvm", marks=marks).longest_silence() == 0.0
    for g in (p1, s1):
        g.restore(saved[g.vm])
    p1.say("heartbeat_stats", gap_max_s=0.24)
    s1.say("takeover", **{"from": "standby"}, to="primary", why="peer silent", silent_s=0.3)
    data = tmp_path / "lab" / "lsvm" / "data" / "hosts"
    for g, host in ((p1, "h1"), (s1, "h2")):
        (data / host / "root" / "run" / g.vm / "console.log").write_text(g.text())
    since = verify_lab("lsvm", Since(LAST_RESTORE), marks)
    assert [v.restores for v in since.vms] == [1, 1]
    assert since.transitions == 1 and since.longest_silence() == 0.3
    assert analyse("lab", PAIR, {"p1": "", "s1": ""}).longest_silence() == 0.0


def test_verify_command_on_a_missing_lab_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No such lab: exit 1 with one sentence, no traceback; a bad --since is a usage error."""
    monkeypatch.setenv("LOCKSTEP_STATE", str(tmp_path))
    result = CliRunner().invoke(main, ["lab", "verify", "--name", "nolab"])
    assert result.exit_code == 1 and "there is no lab named nolab" in result.output
    assert "Traceback" not in result.output
    bad = CliRunner().invoke(main, ["lab", "verify", "--since", "soon"])
    assert bad.exit_code == 2 and "last-restore" in bad.output


# ── the middleware beside the agent (lab up --cluster) ──────────────────────

# Real lines from a 2-VM lab's s1 (Corosync 3.1.7, Pacemaker 2.1.5, keepalived 2.2.7).
FORMED = "Dec 02 05:58:58.800 notice  [TOTEM ] A new membership (1.9) was formed. Members joined: 1"
TOKEN_LOSS = (
    "Dec 02 06:00:43.976 notice  [TOTEM ] A processor failed, forming new configuration:"
    " token timed out (1000ms), waiting 1200ms for consensus."
)
MEMBERSHIP = (
    "Dec 02 06:00:45.192 notice  [TOTEM ] A new membership (2.d) was formed. Members left: 1"
)
TRANSITION = (
    "Dec 02 06:00:46.508 s1 pacemaker-schedulerd[166] (pcmk__log_transition_summary) \tnotice:"
    " Calculated transition 2, saving inputs in /var/lib/pacemaker/pengine/pe-input-2.bz2"
)
VRRP = "Wed Dec  2 06:00:45 2026: (VI_1) Entering MASTER STATE"


def test_the_middlewares_events_are_counted_and_spoil_ok() -> None:
    """Corosync, Pacemaker and keepalived lines among the agent's: counted by kind, with their lines."""
    p1, s1 = booted("p1"), booted("s1")
    for line in (TOKEN_LOSS, MEMBERSHIP, TRANSITION, VRRP):
        s1.noise(line)
    s1.say("role", role="standby")
    report = analyse("lab", PAIR, {"p1": p1.text(), "s1": s1.text()}, cluster="pacemaker")
    d = report.to_json()
    assert d["cluster"] == "pacemaker"
    assert (d["token_losses"], d["membership_changes"], d["pacemaker_transitions"]) == (1, 1, 1)
    assert (d["vrrp_changes"], d["resource_moves"], d["token_warnings"]) == (1, 0, 0)
    assert d["middleware"]["token_losses"] == [{"vm": "s1", "line": TOKEN_LOSS}]
    assert d["transitions"] == 0 and d["ok"] is False
    assert analyse("lab", PAIR, {"p1": p1.text(), "s1": booted("s1").text()}).ok


def test_the_middleware_counts_from_where_it_had_formed() -> None:
    """What Corosync logged while forming (before ``middleware_from``) is not counted."""
    s1 = booted("s1")
    s1.noise(FORMED)
    start = len(s1.text())
    s1.say("role", role="standby")
    s1.noise(MEMBERSHIP)
    logs = {"p1": booted("p1").text(), "s1": s1.text()}
    whole = analyse("lab", PAIR, logs).middleware.count("membership_changes")
    formed = analyse("lab", PAIR, logs, middleware_from={"s1": start})
    assert (whole, formed.middleware.count("membership_changes")) == (2, 1)


def test_since_last_restore_counts_the_middleware_after_it_once() -> None:
    """A token loss before the restore is not counted; written out again by the restore, still not."""
    p1, s1 = booted("p1"), booted("s1")
    saved = {g.vm: g.save() for g in (p1, s1)}
    s1.noise(TOKEN_LOSS)  # in the serial buffer at the save...
    for g in (p1, s1):
        g.say("role", role="primary" if g is p1 else "standby")
        g.restore(saved[g.vm])
        g.say("role", role="primary" if g is p1 else "standby")
    s1.noise(TOKEN_LOSS)  # ...written out once more after the restore
    s1.noise(VRRP)
    logs = {"p1": p1.text(), "s1": s1.text()}
    report = analyse("lab", PAIR, logs, Since(LAST_RESTORE))
    assert report.middleware.count("token_losses") == 0
    assert report.middleware.count("vrrp_changes") == 1
    assert analyse("lab", PAIR, logs).middleware.count("token_losses") == 1


def test_since_time_uses_the_daemons_own_stamps() -> None:
    """--since TIME: a middleware line counts when its own stamp (guest time, UTC) is TIME or later."""
    s1 = booted("s1")
    for line in (TOKEN_LOSS, MEMBERSHIP):
        s1.noise(line)
    logs = {"p1": booted("p1").text(), "s1": s1.text()}
    between = datetime(2026, 12, 2, 6, 0, 44, tzinfo=UTC).timestamp()
    report = analyse("lab", PAIR, logs, Since("time", between))
    assert report.middleware.count("token_losses") == 0
    assert report.middleware.count("membership_changes") == 1


def test_verify_reads_the_cluster_and_its_formed_marks_from_lab_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keepalived lab on disk: only what came after the cluster_marks counts; the kind is reported."""
    monkeypatch.setenv("LOCKSTEP_STATE", str(tmp_path))
    p1, s1 = booted("p1"), booted("s1")
    s1.noise("Wed Dec  2 05:59:50 2026: (VI_1) Entering BACKUP STATE (init)")
    formed = {"p1": len(p1.text()), "s1": len(s1.text())}
    s1.noise(VRRP)
    _lab_on_disk(tmp_path, "lsvk", {"p1": p1.text(), "s1": s1.text()})
    info_path = tmp_path / "lab" / "lsvk" / "data" / "lab.json"
    info = json.loads(info_path.read_text())
    info["options"]["cluster"] = {"kind": "keepalived"}
    info["cluster_marks"] = formed
    info_path.write_text(json.dumps(info))
    report = verify_lab("lsvk")
    assert report.cluster == "keepalived"
    assert [e.line for e in report.middleware.events["vrrp_changes"]] == [VRRP]
