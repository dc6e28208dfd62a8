"""The lab's cluster agent (guest/lsagent.py): its pure parts, then the real agent on loopback.

The agent runs in the guests with Debian's python3; here it is imported by file
path, as the guest runs it. The failure detector and the pair state machine are
driven with explicit timestamps, so every edge (a heartbeat exactly on the
deadline, the first one after it) is exact.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockstep.lab.verify import parse_line

AGENT = Path(str(resources.files("lockstep.lab").joinpath("guest", "lsagent.py")))


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lsagent", AGENT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lsagent"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


lsagent = _load()
PRIMARY, STANDBY = lsagent.Role.PRIMARY, lsagent.Role.STANDBY


def machine(role: Any, heartbeat: float = 1.0, timeout: float = 3.0, **kw: Any) -> Any:
    """A pair state machine started at time 0."""
    return lsagent.PairMachine(role, heartbeat=heartbeat, timeout=timeout, started=0.0, **kw)


def events(notes: list[Any]) -> list[str]:
    """The event names of ``notes``."""
    return [n.event for n in notes]


# ── failure detector and pair state machine ─────────────────────────────────


def test_detector_is_armed_by_the_first_heartbeat_and_expires_strictly_after_timeout() -> None:
    """A never-heard peer cannot fail; silence of exactly the timeout is not yet failure."""
    d = lsagent.FailureDetector(3.0)
    assert not d.expired(1000.0) and d.deadline() is None
    assert d.heard(10.0) is None
    assert d.heard(11.0) == pytest.approx(1.0)
    assert not d.expired(14.0)
    assert d.expired(14.0001)
    assert d.deadline() == pytest.approx(14.0)


def test_standby_takes_over_after_the_timeout_and_not_before() -> None:
    """Heard at t=5: no takeover at 8.0 (exactly the timeout), one takeover just after, once."""
    m = machine(STANDBY)
    m.heard(5.0, PRIMARY)
    for t in (5.5, 6.0, 7.0, 7.99, 8.0):
        assert "takeover" not in events(m.tick(t)), t
    notes = m.tick(8.001)
    assert events(notes) == ["takeover"]  # its heartbeat_miss was said at 7.0 already
    assert notes[0].fields["from"] == "standby" and notes[0].fields["to"] == "primary"
    assert notes[0].fields["silent_s"] == pytest.approx(3.001)
    assert m.role is PRIMARY
    assert "takeover" not in events(m.tick(20.0))  # once taken over, it stays primary


def test_regular_heartbeats_keep_the_standby_standing_by() -> None:
    """Heartbeats every second with up to 1.9 s jitter gaps never trip a 3 s timeout."""
    m = machine(STANDBY)
    rng = random.Random(7)
    t = 0.0
    notes = []
    for _ in range(1000):
        m.heard(t, PRIMARY)
        gap = rng.uniform(0.1, 1.9)
        notes += m.tick(t + gap / 2) + m.tick(t + gap)
        t += gap
    assert m.role is STANDBY and "takeover" not in events(notes)


def test_fast_heartbeats_at_30ms_with_a_100ms_timeout() -> None:
    """30 ms beats: gaps up to 99.9 ms are tolerated, a 100.1 ms gap is a takeover.

    (Exactly-on-the-deadline is tested with binary-exact times in the detector test.)
    """
    m = machine(STANDBY, heartbeat=0.03, timeout=0.1)
    t = 0.0
    for gap in [0.03] * 50 + [0.099, 0.03, 0.0999, 0.001, 0.03]:
        m.heard(t, PRIMARY)
        assert "takeover" not in events(m.tick(t + gap)), (t, gap)
        t += gap
    m.heard(t, PRIMARY)
    assert "takeover" not in events(m.tick(t + 0.0999))
    assert events(m.tick(t + 0.1001)) == ["takeover"]  # the miss was said at 99.9 ms


def test_the_loop_wakes_in_time_for_the_takeover() -> None:
    """Sleeping until next_deadline() and ticking finds the takeover within 1 µs of the timeout."""
    m = machine(STANDBY, heartbeat=0.03, timeout=0.1)
    m.heard(1.0, PRIMARY)
    now, taken_at = 1.0, None
    for _ in range(100):
        now = m.next_deadline(now)
        if "takeover" in events(m.tick(now)):
            taken_at = now
            break
    assert taken_at is not None and 1.1 < taken_at <= 1.1 + 2e-6


def test_heartbeat_miss_is_said_once_per_silence() -> None:
    """Past half-way to the timeout a late heartbeat is reported once, again after the next beat."""
    m = machine(STANDBY)  # late after (1 + 3) / 2 = 2 s
    m.heard(0.0, PRIMARY)
    assert events(m.tick(1.9)) == []
    assert events(m.tick(2.1)) == ["heartbeat_miss"]
    assert events(m.tick(2.5)) == []
    m.heard(2.6, PRIMARY)
    assert events(m.tick(4.7)) == ["heartbeat_miss"]


def test_split_brain_while_both_are_primary() -> None:
    """Both primary: each reports an onset, repeats it each second, and it ends when the peer is silent."""
    a, b = machine(PRIMARY), machine(STANDBY)
    a.heard(0.0, STANDBY)
    b.heard(0.0, PRIMARY)
    # a went quiet for 3.5 s (say, paused alone); b saw it late first
    assert events(b.tick(3.5)) == ["heartbeat_miss", "takeover"]
    onset_b = b.heard(3.6, PRIMARY)
    onset_a = a.heard(3.6, PRIMARY)
    assert [(n.event, n.fields["onset"]) for n in onset_a + onset_b] == [
        ("split_brain", True),
        ("split_brain", True),
    ]
    assert a.split_brain and b.split_brain
    assert a.heard(4.0, PRIMARY) == []  # still the same episode
    assert [n.fields["onset"] for n in a.tick(4.7)] == [False]
    assert events(a.tick(7.1)) == ["heartbeat_miss", "split_brain_end"]
    assert not a.split_brain


def test_standby_that_never_hears_its_primary_takes_over_after_the_grace() -> None:
    """Boot: no takeover before the grace period (a peer never heard cannot fail), then one."""
    m = machine(STANDBY, grace=60.0)
    assert events(m.tick(59.0)) == []
    assert m.next_deadline(59.0) == pytest.approx(60.0, abs=1e-5)
    notes = m.tick(60.5)
    assert events(notes) == ["takeover"] and notes[0].fields["why"] == "peer never heard"


def test_heartbeat_must_be_shorter_than_the_timeout() -> None:
    """A timeout not longer than the heartbeat would fail every peer: refused."""
    with pytest.raises(ValueError):
        machine(STANDBY, heartbeat=1.0, timeout=1.0)


# ── stream accounting ───────────────────────────────────────────────────────


def test_receiver_counts_gaps_late_arrivals_and_duplicates() -> None:
    """A gap counts lost; a late one takes it back as reordered; a repeat is a duplicate."""
    r = lsagent.StreamReceiver()
    kind = lsagent.Arrival
    run = b"abc"
    assert r.receive(run, 100) == (kind.FIRST, 0)  # a late joiner: 0..99 are not lost
    assert r.receive(run, 101) == (kind.IN_ORDER, 0)
    assert r.receive(run, 105) == (kind.GAP, 3)
    assert (r.lost, r.received) == (3, 3)
    assert r.receive(run, 103) == (kind.LATE, -1)
    assert r.receive(run, 103) == (kind.DUPLICATE, 0)
    assert r.receive(run, 101) == (kind.DUPLICATE, 0)
    assert (r.received, r.lost, r.reordered, r.duplicated, r.highest) == (4, 2, 1, 2, 105)


def test_receiver_restarts_its_count_when_the_sender_reboots() -> None:
    """A new run id (the sender rebooted, its numbers start again) is a reset, not duplicates."""
    r = lsagent.StreamReceiver()
    r.receive(b"one", 500)
    assert r.receive(b"two", 0) == (lsagent.Arrival.RESET, 0)
    assert r.receive(b"two", 1) == (lsagent.Arrival.IN_ORDER, 0)
    assert (r.lost, r.duplicated) == (0, 0)


def test_packets_older_than_the_window_count_as_duplicates() -> None:
    """Beyond the reorder window a packet cannot be told apart: it is counted duplicated."""
    r = lsagent.StreamReceiver(window=16)
    r.receive(b"abc", 0)
    r.receive(b"abc", 100)  # 1..99 lost; only 84..99 still tracked
    assert r.receive(b"abc", 50) == (lsagent.Arrival.DUPLICATE, 0)
    assert r.receive(b"abc", 90) == (lsagent.Arrival.LATE, -1)
    assert (r.lost, r.reordered, r.duplicated) == (98, 1, 1)


@given(st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=200))
def test_logged_deltas_add_up_to_the_receivers_counters(seqs: list[int]) -> None:
    """Whatever arrives, summing the lines' deltas gives exactly the receiver's counters."""
    r = lsagent.StreamReceiver(window=32)
    pending = lsagent.PendingAnomalies()
    lines: list[Any] = []
    for i, seq in enumerate(seqs):
        arrival, lost = r.receive(b"abc", seq)
        pending.add(arrival, lost, seq)
        if i % 7 == 0:
            lines += pending.take("p1")
    lines += pending.take("p1")
    total = {"lost": 0, "duplicated": 0, "reordered": 0}
    for note in lines:
        for key in total:
            total[key] += note.fields.get(key, 0)
    assert total == {"lost": r.lost, "duplicated": r.duplicated, "reordered": r.reordered}
    assert pending.empty()


def test_stream_packets_round_trip() -> None:
    """A packet carries run id, sequence number and name; anything else is not one."""
    packet = lsagent.encode_packet(b"\x01\x02\x03", 2**40, b"p1")
    assert lsagent.decode_packet(packet) == (b"\x01\x02\x03", 2**40, "p1")
    assert lsagent.decode_packet(b"short") is None
    assert lsagent.decode_heartbeat(lsagent.encode_heartbeat("s1", STANDBY, 3)) == ("s1", STANDBY)
    assert lsagent.decode_heartbeat(b'{"from": "s1", "role": "boss"}') is None


# ── the log ────────────────────────────────────────────────────────────────


def test_console_lines_are_what_verify_reads() -> None:
    """Each line is one JSON object starting with {"t":, numbered, and verify parses it back."""
    out: list[bytes] = []
    log = lsagent.ConsoleLog(out.append, "p1", "00beef", wall=lambda: 1234.5, mono=lambda: 7.25)
    log.say("start", role="primary")
    log.say("stream_gap", **{"from": "s1", "lost": 3})
    assert all(line.startswith(b'{"t":') and line.endswith(b"\n") for line in out)
    parsed = [parse_line(line.decode()) for line in out]
    assert [(p.vm, p.run, p.n, p.event) for p in parsed if p] == [
        ("p1", "00beef", 1, "start"),
        ("p1", "00beef", 2, "stream_gap"),
    ]
    assert json.loads(out[1])["m"] == 7.25


def test_arguments_are_checked() -> None:
    """The lab's short options parse; a heartbeat not shorter than the timeout is refused."""
    argv = "-n p1 -r primary -p s1 -a 10.0.0.2 -b 0.1 -t 0.3 -s 10.0.0.2,10.0.0.3 -R 50"
    config = lsagent.parse_args(argv.split())
    assert config.streams == ("10.0.0.2", "10.0.0.3") and config.heartbeat == 0.1
    for bad in ("-b 3 -t 3", "-a nowhere", "-s 10.0.0.300"):
        with pytest.raises(SystemExit):
            lsagent.parse_args([*argv.split(), *bad.split()])


# ── the real agent, on loopback ────────────────────────────────────────────


def _addresses() -> tuple[str, str]:
    """Two random loopback addresses, so concurrent runs do not share ports."""
    net = f"127.{random.randint(20, 250)}.{random.randint(0, 255)}"
    return f"{net}.2", f"{net}.3"


def _start(name: str, role: str, me: str, peer: str, peer_ip: str, seconds: float) -> Any:
    argv = [sys.executable, str(AGENT), "-n", name, "-r", role, "-p", peer, "-a", peer_ip]
    argv += ["-B", me, "-b", "0.05", "-t", "0.3", "-s", peer_ip, "-R", "100", "-c", "-"]
    return subprocess.Popen(
        ["timeout", str(seconds), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _lines(proc: Any) -> list[dict[str, Any]]:
    out, _ = proc.communicate(timeout=30)
    return [json.loads(line) for line in out.decode().splitlines() if line.startswith('{"t":')]


def test_real_agents_on_loopback_stay_quiet_then_see_a_failure() -> None:
    """Two agents exchange beats and streams with no anomaly; when p1 stops, s1 takes over."""
    a, b = _addresses()
    p1 = _start("p1", "primary", a, "s1", b, 2.0)
    s1 = _start("s1", "standby", b, "p1", a, 3.5)
    p1_lines, s1_lines = _lines(p1), _lines(s1)
    anomalies = {"stream_gap", "stream_dup", "stream_reorder", "split_brain"}
    assert not [d for d in p1_lines + s1_lines if d["event"] in anomalies]
    takeovers = [d for d in s1_lines if d["event"] == "takeover"]
    assert len(takeovers) == 1, s1_lines
    last_p1 = max(d["t"] for d in p1_lines)
    assert takeovers[0]["t"] - last_p1 < 1.5
    stats = [d for d in p1_lines if d["event"] == "stream_stats"]
    assert stats and stats[-1]["received"] > 50 and stats[-1]["lost"] == 0
    assert time.time() - last_p1 < 60


# ── how the lab starts it ─────────────────────────────────────────────────


def test_the_labs_start_command_is_what_the_agent_accepts() -> None:
    """Every lab VM's start command parses as the agent's options and fits the kernel line."""
    import shlex

    from lockstep.lab.image import kernel_cmdline
    from lockstep.lab.lab import AGENT_PATH, LabOptions, _start_command, plan_vms
    from lockstep.lab.topology import plan_lab

    opts = LabOptions(heartbeat=0.1, timeout=0.3, stream_rate=150, start={"s2": "keepalived -n"})
    vms = plan_vms(plan_lab(4), 16)
    for vm in vms:
        command = _start_command(opts, vm, vms)
        agent, _, user = command.partition(" & ")
        argv = shlex.split(agent)
        assert argv[:2] == ["python3", AGENT_PATH]
        config = lsagent.parse_args(argv[2:])
        assert (config.name, config.role.value, config.peer) == (vm.name, vm.role, vm.peer)
        assert (config.heartbeat, config.timeout, config.rate) == (0.1, 0.3, 150)
        assert set(config.streams) == {v.ip for v in vms if v is not vm}
        assert user == ("keepalived -n" if vm.name == "s2" else "")
        kernel_cmdline(hostname=vm.name, ip=f"{vm.ip}/24", start=command)  # under the limit
