"""The freeze on the real lab: frames held outside the VMs, and nothing of it left behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from lockstep.caller.report import OperationReport
from lockstep.errors import OperationFailed
from lockstep.lab.lab import execd_pid, restart_execd, wait_execds
from lockstep.lab.verify import verify_lab
from lockstep.net.freeze import in_netns
from lockstep.net.links import OUR_LINK
from lockstep.net.pcap import read_pcap
from lockstep.proc import run
from tests.integration.conftest import Lab


def _leftovers(lab: Lab) -> list[str]:
    """Freeze objects of ours in the lab's host namespaces: veths, filters on taps.

    A tap's clsact qdisc is not one: it comes and goes with the tap (see
    lockstep.net.links.create_tap); a filter on it is what would misroute frames.
    """
    found = []
    for host in lab.group.hosts:
        ns = f"{lab.name}-{host}"
        for line in run(["ip", "-o", "link"], netns=ns).text.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            m = OUR_LINK.match(name)
            if m and m.group(1) in "fg":
                found.append(f"{host}: veth {name}")
            if m and m.group(1) == "t":
                filters = run(["tc", "filter", "show", "dev", name, "egress"], netns=ns).text
                if filters.strip():
                    found.append(f"{host}: filter on {name}: {filters.strip()}")
    return found


def test_no_freeze_leftovers_after_save_restore_abort_and_crash(fresh: Lab) -> None:
    """No tc qdisc, filter or veth of ours remains after any way a freeze ends.

    That is: a save, a restore, an abort, and an execd killed mid-freeze then
    started again (which cleans up what its predecessor left).
    """

    async def save_restore() -> None:
        async with fresh.caller() as caller:
            await caller.save("fz-clean")
            assert _leftovers(fresh) == [], "after save"
            await caller.restore("fz-clean")
            assert _leftovers(fresh) == [], "after restore"

    asyncio.run(save_restore())

    # Abort: h2's execd dies right after its VMs froze and paused; h1 aborts
    # (lifting its freeze); h2's execd, started again, cleans its own up.
    pid = execd_pid(fresh.name, "h2")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while execd_pid(fresh.name, "h2") is not None:
        time.sleep(0.05)
    restart_execd(fresh.name, "h2", env={"LOCKSTEP_FAULT": "pause:after"})
    asyncio.run(wait_execds(fresh.group))

    async def failing_save() -> None:
        async with fresh.caller() as caller:
            with pytest.raises(OperationFailed, match="host h2"):
                await caller.save("fz-abort")

    asyncio.run(failing_save())
    h1_left = [x for x in _leftovers(fresh) if x.startswith("h1")]
    assert h1_left == [], "after abort"
    assert [x for x in _leftovers(fresh) if x.startswith("h2")], "h2 died mid-freeze"
    restart_execd(fresh.name, "h2")
    asyncio.run(wait_execds(fresh.group))
    assert _leftovers(fresh) == [], "after the killed execd started again"


def _counts(lab: Lab) -> dict[str, int]:
    report = verify_lab(lab.name)
    return {
        "lost": report.total("lost"),
        "duplicated": report.total("duplicated"),
        "reordered": report.total("reordered"),
        "received": report.total("received"),
        "transitions": report.transitions,
    }


def _streams_lost(lab: Lab, *, excluding_receiver: str) -> int:
    return sum(
        s.lost + s.duplicated
        for s in verify_lab(lab.name).streams
        if s.receiver != excluding_receiver
    )


def _check_frames(report: OperationReport) -> int:
    """Every held frame is delivered or counted as dropped; return how many dropped."""
    for v in report.vms:
        assert v.frames_delivered + v.frames_dropped >= v.frames_held, (report.operation, v)
    return sum(v.frames_dropped for v in report.vms)


def _nothing_lost(what: str, dropped: int, before: dict[str, int], after: dict[str, int]) -> None:
    """The guests saw no packet lost or duplicated, and no freeze dropped a frame."""
    lost = after["lost"] - before["lost"]
    dup = after["duplicated"] - before["duplicated"]
    assert (lost, dup, dropped) == (0, 0, 0), (
        f"{what}: guests saw {lost} lost and {dup} duplicated packets,"
        f" the freezes dropped {dropped} frames"
    )


def test_streams_lose_nothing_across_twenty_save_restore_cycles(any_driver: Lab) -> None:
    """UDP streams between all VMs lose nothing across 20 save/restore cycles, on either driver.

    Sequence-numbered streams (the lab's default rate, each way, every pair;
    bench.streams runs the same at 200 pkt/s) run throughout: the guests log
    zero lost and zero duplicated, and the frames held at save time are
    delivered, none dropped (on libvirt's taps for its domains).
    """
    fresh = any_driver
    time.sleep(2)
    before = _counts(fresh)

    async def cycles() -> tuple[int, int]:
        held = dropped = 0
        async with fresh.caller() as caller:
            for i in range(20):
                saved = await caller.save(f"st-{i}")
                dropped += _check_frames(saved)
                held += sum(v.frames_held for v in saved.vms)
                restored = await caller.restore(f"st-{i}")
                dropped += _check_frames(restored)
        return held, dropped

    held, dropped = asyncio.run(cycles())
    time.sleep(3)  # let every guest log its stream counters
    after = _counts(fresh)
    assert held > 0, "frames in flight at the pause must have been held"
    assert after["received"] > before["received"], "the streams must have run"
    assert after["transitions"] == before["transitions"], (before, after)
    _nothing_lost("20 save/restore cycles", dropped, before, after)


def test_streams_lose_nothing_across_save_stop_and_restore(fresh: Lab) -> None:
    """The paper's way (`save --stop`, VMs destroyed, later `restore`) loses nothing.

    The held frames travel in the state and are delivered after the restore.
    """
    time.sleep(2)
    before = _counts(fresh)

    async def cycles() -> int:
        dropped = 0
        async with fresh.caller() as caller:
            for i in range(3):
                saved = await caller.save(f"st-stop-{i}", stop=True)
                assert all(v.resumed_at is None for v in saved.vms)
                await asyncio.sleep(2)
                restored = await caller.restore(f"st-stop-{i}")
                dropped += _check_frames(restored)
        return dropped

    dropped = asyncio.run(cycles())
    time.sleep(3)
    after = _counts(fresh)
    _nothing_lost("save --stop + restore", dropped, before, after)


def _set_frame_limits(lab: Lab, host: str, in_memory: int, limit: int) -> None:
    config = lab.data / "hosts" / host / "execd.toml"
    data = tomllib.loads(config.read_text())
    data["frames"] = {"in_memory": in_memory, "limit": limit}
    config.write_text(tomli_w.dumps(data))
    pid = execd_pid(lab.name, host)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    while execd_pid(lab.name, host) is not None:
        time.sleep(0.05)
    restart_execd(lab.name, host)
    asyncio.run(wait_execds(lab.group))


def _mac(lab: Lab, vm: str) -> bytes:
    return bytes.fromhex(lab.group.vms[vm].nics[0].mac.replace(":", ""))


LIMIT = 500  # frames per VM in the flood test


def test_flood_past_the_hard_limit_is_dropped_and_counted(fresh: Lab) -> None:
    """A flood from outside the group past s1's hard limit is dropped and counted.

    The frames beyond s1's limit are dropped and counted in the report (after
    spilling to disk past the in-memory bound), and the other VMs' streams still
    lose nothing. The limit (per VM of h2) is far above what s2 holds of the
    lab's streams while h2 is frozen, however slow the machine, and far below
    the flood (about 5,000 frames a second for the whole save).
    """
    _set_frame_limits(fresh, "h2", in_memory=16, limit=LIMIT)
    stop = threading.Event()
    sent = [0]
    ns = f"{fresh.name}-h1"
    run(["ip", "link", "add", "lsflood0", "type", "veth", "peer", "name", "lsflood1"], netns=ns)
    try:
        run(["ip", "link", "set", "lsflood1", "master", "lsvm", "up"], netns=ns)
        run(["ip", "link", "set", "lsflood0", "up"], netns=ns)
        sock = in_netns(ns, lambda: _raw_socket("lsflood0"))
        frame = _mac(fresh, "s1") + bytes.fromhex("02000000f100") + b"\x88\xb5" + bytes(100)

        def flood() -> None:
            while not stop.is_set():
                for _ in range(50):
                    sock.send(frame)
                    sent[0] += 1
                time.sleep(0.01)  # ~5000 frames/s

        time.sleep(2)
        before = _streams_lost(fresh, excluding_receiver="s1")
        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()

        async def save() -> OperationReport:
            async with fresh.caller() as caller:
                return await caller.save("st-flood")

        try:
            report = asyncio.run(save())
        finally:
            stop.set()
            flooder.join()
            sock.close()
        time.sleep(3)
        after = _streams_lost(fresh, excluding_receiver="s1")
    finally:
        run(["ip", "link", "del", "lsflood0"], netns=ns, check=False)
        _set_frame_limits(fresh, "h2", in_memory=4096, limit=262144)
    s1 = report.vm("s1")
    assert sent[0] > 2 * LIMIT
    assert s1.frames_dropped > 0, "the flood must pass s1's hard limit and be counted"
    assert s1.frames_held <= LIMIT + 1
    assert s1.frames_delivered + s1.frames_dropped >= s1.frames_held
    assert report.to_json()["frames_dropped"] == s1.frames_dropped
    others_dropped = sum(v.frames_dropped for v in report.vms if v.name != "s1")
    assert (after - before, others_dropped) == (0, 0), (
        "the other VMs' streams lost or duplicated packets, or their freezes dropped frames"
    )


def _raw_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.bind((ifname, 0))
    return s


def test_state_frames_lists_and_exports_what_the_state_holds(fresh: Lab, tmp_path: Path) -> None:
    """`lockstep state frames` lists exactly the frames a state holds, and exports them.

    For every VM the JSON listing matches the state's pcap file frame for
    frame, the export is that file byte for byte, and tcpdump reads it. An
    unknown VM is one sentence naming it.
    """

    async def save() -> None:
        async with fresh.caller() as caller:
            await caller.save("fz-frames")

    asyncio.run(save())

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return fresh.cli("state", "frames", "fz-frames", *args, timeout=60)

    for vm, spec in sorted(fresh.group.vms.items()):
        kept = (
            fresh.data / "hosts" / spec.host / "root" / "states" / "fz-frames" / f"{vm}.nic0.pcap"
        )
        out = tmp_path / f"{vm}.pcap"
        proc = cli(vm, "--json", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        listed = json.loads(proc.stdout)["frames"]
        held = list(read_pcap(kept))
        assert [(f["time"], f["length"]) for f in listed] == [
            (pytest.approx(t, abs=1e-6), len(d)) for t, d in held
        ]
        assert out.read_bytes() == kept.read_bytes()
        dump = run(["tcpdump", "-nn", "-r", str(out)])
        assert len(dump.text.splitlines()) == len(held), dump.text
    proc = cli("nosuch")
    assert proc.returncode == 1
    assert "has no VM 'nosuch'" in proc.stderr, proc.stderr
