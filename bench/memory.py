"""Restore time and save downtime of the memory paths, against the naive baseline.

For each group size (2, 4, 8 VMs in primary/standby pairs on 2 lab hosts) and
guest RAM size (256M, 1G, 4G), on a lab of its own:

1. every guest first writes most of its RAM: a tmpfs file of numbered random
   MiB, through the lab's guest control channel;
2. ``fast``: the VMs run with ``memory_path = "auto"`` (the fast path). One
   ``save`` (the VMs keep running): each VM's downtime is its ``resumed_at``
   minus its ``paused_at`` (QEMU's own event times). Before it the host's dirty
   pages are written back (``sync``), as the kernel does within ~30 s of any
   write anyway, so a reflink costs what it does in steady state. Then
   ``--repeat`` restores, each after dropping the page cache: the time from
   the call to the last VM resumed, the resume skew, and how long until every
   guest answers again (pages come back lazily);
3. ``standard``: the VMs are rebooted with ``memory_path = "standard"``
   (anonymous RAM), filled again, and measured the same way; then
4. ``naive``: the same VMs saved and destroyed one after another, then restored
   and resumed one after another (``bench/naive.py``);
5. ``raw``: right before each standard (and the naive) restore, the very bytes
   it is about to read are read sequentially, 16 MiB at a time, after dropping
   the page cache: the disk's speed at that moment. "loading / raw" is the
   time of that read over the time of the restore's loading phase, paired per
   repeat (the disk's speed here varies a lot from minute to minute). For the
   fast path the state's files, RAM images included, are read once: what
   reading them all would have cost.

A combination that cannot run here is reported with the reason, not run: the
standard path and the naive baseline keep guest RAM in anonymous memory, which
must fit in the host's available RAM (there is no swap); the fast path keeps it
in files, which must fit on the scratch filesystem.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from bench.common import free_subnets, say
from bench.naive import naive_restore, naive_save
from bench.scratch import drop_caches
from lockstep.caller.connect import clients_for
from lockstep.caller.orchestrator import GroupCaller
from lockstep.caller.report import OperationReport
from lockstep.errors import LockstepError
from lockstep.group import load_group
from lockstep.lab.lab import (
    LabOptions,
    bring_up,
    guest,
    lab_data_dir,
    take_down,
    wait_guests,
)
from lockstep.proc import run
from lockstep.units import parse_size

__all__ = ["PATHS", "Row", "run_matrix"]

PATHS = ("fast", "standard", "naive")
LAB = "lsfb"
_READ_BUFFER = 16 << 20
_QEMU_OVERHEAD = 256 << 20  # per VM, beyond guest RAM, for the fit check
_HOST_MARGIN = 2 << 30  # kept free for everything else on the host
_KEEP_MS = re.compile(r" in ([0-9.]+) ms")
_LOAD_PHASE = "load VMs paused, frames held"  # the restore phase that reads memory


_GUEST_SPARE_MIB = 64  # left to the guest's agent and the fill's own python


def _fill_command() -> str:
    """Write all of the guest's available RAM but a little to a tmpfs file; print the MiB.

    Numbered random MiB: no two alike (nothing a migration could skip), and
    fast under TCG (one random MiB, copied with its number).
    """
    return (
        "mkdir -p /run/fill && (mountpoint -q /run/fill ||"
        " mount -t tmpfs -o size=100% fill /run/fill) && rm -f /run/fill/buf &&"
        " head -c 1048576 /dev/urandom > /run/seed &&"
        " n=$(( $(awk '/MemAvailable/ {print int($2/1024)}' /proc/meminfo)"
        f' - {_GUEST_SPARE_MIB} )) && python3 -c "import sys;'
        " s=open('/run/seed','rb').read()[8:]; f=open('/run/fill/buf','wb');"
        " [f.write(i.to_bytes(8,'little')+s) for i in range(int(sys.argv[1]))]\" $n &&"
        " echo $n"
    )


@dataclass
class Row:
    """The figures of one (VMs, RAM, path) combination; ``status`` "ok" or why not."""

    vms: int
    memory: str
    path: str
    status: str = "ok"
    fill_mib: int = 0
    downtime_ms: list[float] = field(default_factory=list)  # per VM, save pause -> resume
    keep: str = ""  # how the fast path kept the RAM images
    keep_ms: list[float] = field(default_factory=list)  # per VM, cost of keeping it
    save_s: float | None = None  # the whole save (naive: first pause to last VM destroyed)
    restore_s: list[float] = field(default_factory=list)  # call -> last VM resumed, per repeat
    restore_total_s: list[float] = field(default_factory=list)  # whole restore incl. commit
    cli_restore_s: float | None = None  # `lockstep restore` as a process, start to exit
    resume_skew_ms: list[float] = field(default_factory=list)
    guests_answer_s: list[float] = field(default_factory=list)  # last resume -> all guests answer
    save_phases: dict[str, float] = field(default_factory=dict)  # s in each phase of the save
    restore_phases: dict[str, float] = field(default_factory=dict)  # the same, last restore
    restore_read_bytes: int = 0  # what a restore reads up front (standard: all RAM)
    load_s: list[float] = field(default_factory=list)  # the loading phase, per repeat
    # Reading the files a restore reads (fast: its RAM images too), just before
    # each restore; for the fast path once, after the restores.
    raw_read_bytes: int = 0
    raw_read_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def restore_read_gbps(self) -> float | None:
        """Bytes a restore read over the median loading phase (GB/s)."""
        if not self.load_s or not self.restore_read_bytes:
            return None
        return self.restore_read_bytes / statistics.median(self.load_s) / 1e9

    @property
    def raw_read_gbps(self) -> float | None:
        """The disk's sequential read bandwidth for the state's files (median, GB/s)."""
        if not self.raw_read_s or not self.raw_read_bytes:
            return None
        return self.raw_read_bytes / statistics.median(self.raw_read_s) / 1e9

    @property
    def of_raw(self) -> float | None:
        """Loading over raw reading of the same bytes, paired per repeat (median)."""
        if self.path == "fast" or not self.load_s or len(self.raw_read_s) != len(self.load_s):
            return None
        return statistics.median(r / t for r, t in zip(self.raw_read_s, self.load_s, strict=True))

    def to_json(self) -> dict[str, Any]:
        """The row with its derived figures."""
        data = asdict(self)
        data["restore_read_gbps"] = self.restore_read_gbps
        data["raw_read_gbps"] = self.raw_read_gbps
        data["of_raw"] = self.of_raw
        return data


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) << 10
    raise KeyError(key)


def anonymous_fit(vms: int, memory: int) -> str | None:
    """Why ``vms`` guests of ``memory`` in anonymous RAM cannot run here now (None: they can)."""
    need = vms * (memory + _QEMU_OVERHEAD) + _HOST_MARGIN
    have = _meminfo("MemAvailable")
    if need <= have:
        return None
    return (
        f"{vms} x {memory >> 20} MiB of anonymous guest RAM (+QEMU, +2 GiB margin) needs"
        f" {need / 2**30:.1f} GiB; {have / 2**30:.1f} GiB of {_meminfo('MemTotal') / 2**30:.1f}"
        " GiB is available and there is no swap"
    )


def file_fit(vms: int, memory: int, where: Path) -> str | None:
    """Why ``vms`` RAM files of ``memory`` (and as much again for clones) do not fit on disk."""
    need = 2 * vms * memory
    have = os.statvfs(where).f_bavail * os.statvfs(where).f_frsize
    if need <= have:
        return None
    return (
        f"{vms} RAM files of {memory >> 20} MiB (twice, for restored clones) need"
        f" {need / 2**30:.0f} GiB on {where}; {have / 2**30:.0f} GiB is free"
    )


class PhaseClock:
    """A caller's progress callback that notes when each phase began."""

    def __init__(self) -> None:
        self.started = time.time()
        self.marks: list[tuple[str, float]] = []

    def __call__(self, event: str, details: Mapping[str, Any]) -> None:
        """Note a phase's start (other events are ignored)."""
        if event == "phase":
            self.marks.append((str(details["name"]), time.time()))

    def durations(self) -> dict[str, float]:
        """Seconds from each phase's start to the next one's (the last one to now)."""
        ends = [t for _, t in self.marks[1:]] + [time.time()]
        out: dict[str, float] = {}
        for (name, begin), end in zip(self.marks, ends, strict=True):
            out[name] = out.get(name, 0.0) + end - begin
        return out


class Bench:
    """One benchmark lab: its group, a caller, and the figures it measures."""

    def __init__(self, group_file: Path, repeat: int) -> None:
        self.group_file = group_file
        self.repeat = repeat
        self.data = lab_data_dir(LAB)
        self.group = load_group(group_file)

    # -- the lab -------------------------------------------------------------

    async def call(self, fn: Any) -> Any:
        """Run ``fn(caller)`` with a caller over fresh clients."""
        clients = clients_for(self.group)
        try:
            return await fn(GroupCaller(self.group, clients))
        finally:
            for c in clients.values():
                await c.close()

    async def switch(self, memory_path: str) -> None:
        """Reboot every VM with ``memory_path`` (a VM's spec is fixed while it runs)."""
        await self.call(lambda c: c.down())
        doc = _read_toml(self.group_file)
        for vm in doc["vms"].values():
            vm["memory_path"] = memory_path
        self.group_file.write_text(tomli_w.dumps(doc))
        self.group = load_group(self.group_file)
        await self.call(lambda c: c.up())
        await wait_guests(self.group, self.data, timeout=600)

    async def sh(self, vm: str, command: str, timeout: float) -> str:
        """Run ``command`` in guest ``vm``.

        Raises:
            RuntimeError: it failed.
        """
        async with guest(self.group, vm, self.data) as ctl:
            rc, out = await ctl.run(command, timeout=timeout)
        if rc != 0:
            raise RuntimeError(f"guest {vm}: `{command[:60]}...` exited {rc}: {out[-300:]}")
        return out

    async def settle(self) -> None:
        """Get one answer from every guest's control channel, retrying a lost request.

        The first request after a guest boots is sometimes lost (noise from
        the boot left half a line in the agent's buffer), and a fill must not
        wait out its long timeout for nothing.
        """

        async def one(vm: str) -> None:
            for attempt in range(5):
                try:
                    await self.sh(vm, "true", 10)
                    return
                except LockstepError:
                    if attempt == 4:
                        raise

        await asyncio.gather(*(one(vm) for vm in self.group.vms))

    async def fill(self) -> tuple[int, float]:
        """Make every guest write most of its RAM; return the least MiB one wrote, and seconds."""
        await self.settle()
        started = time.monotonic()
        outs = await asyncio.gather(*(self.sh(vm, _fill_command(), 3600) for vm in self.group.vms))
        return min(int(out.split()[-1]) for out in outs), time.monotonic() - started

    async def guests_answer(self) -> float:
        """Seconds until every guest runs a command (its pages come back as it runs)."""
        started = time.monotonic()
        await self.settle()
        return time.monotonic() - started

    def state_files(self, state: str, suffixes: Sequence[str]) -> list[Path]:
        """The state's memory files on every host (``.mem`` streams, ``.ram`` images)."""
        return sorted(
            p
            for s in suffixes
            for p in self.data.glob(f"hosts/*/root/states/{state}/*{s}")
            if p.is_file()
        )

    # -- measurements ----------------------------------------------------------

    async def lockstep_path(self, row: Row) -> None:
        """Save once (downtime), restore ``repeat`` times (cold cache), read the files raw."""
        state = f"{row.path}-1"
        await asyncio.to_thread(os.sync)
        clock = PhaseClock()
        saved: OperationReport = await self.call(lambda c: c.save(state, progress=clock))
        row.save_phases = clock.durations()
        row.save_s = saved.duration_s
        for v in saved.vms:
            if v.paused_at is not None and v.resumed_at is not None:
                row.downtime_ms.append((v.resumed_at - v.paused_at) * 1000)
            if v.memory_path == "fast":
                row.keep = v.memory_note.split(" ")[2] if v.memory_note else ""
                found = _KEEP_MS.search(v.memory_note)
                if found:
                    row.keep_ms.append(float(found.group(1)))
            elif v.memory_note:
                row.notes.append(f"{v.name}: {v.memory_note}")
        streams = self.state_files(state, [".mem"])
        row.restore_read_bytes = sum(p.stat().st_size for p in streams)
        row.raw_read_bytes = row.restore_read_bytes
        for i in range(self.repeat):
            if row.path != "fast":  # the disk's speed now, for the bytes the restore reads
                row.raw_read_s.append(await asyncio.to_thread(read_raw, streams))
            await asyncio.to_thread(drop_caches)
            started = time.time()
            clock = PhaseClock()
            restored: OperationReport = await self.call(
                lambda c, clock=clock: c.restore(state, progress=clock)
            )
            row.restore_phases = clock.durations()
            row.load_s.append(row.restore_phases.get(_LOAD_PHASE, math.nan))
            last = max(v.resumed_at for v in restored.vms if v.resumed_at is not None)
            row.restore_s.append(last - started)
            row.restore_total_s.append(restored.duration_s)
            if restored.resume_skew_ms is not None:
                row.resume_skew_ms.append(restored.resume_skew_ms)
            row.guests_answer_s.append(await self.guests_answer())
            say(
                f"  restore {i + 1}/{self.repeat}: {row.restore_s[-1]:.3f} s to all resumed,"
                f" skew {restored.resume_skew_ms or 0:.3f} ms"
            )
            notes = {f"{v.name}: {v.memory_note}" for v in restored.vms if v.memory_note}
            row.notes += sorted(n for n in notes if n not in row.notes)[:2]
        row.cli_restore_s = await self.cli_restore(state)
        if row.path == "fast":  # what reading it all would have cost
            files = self.state_files(state, [".mem", ".ram"])
            row.raw_read_bytes = sum(p.stat().st_size for p in files)
            row.raw_read_s.append(await asyncio.to_thread(read_raw, files))

    async def cli_restore(self, state: str) -> float:
        """`lockstep restore` run as a command (Python start-up included), start to exit."""
        await asyncio.to_thread(drop_caches)
        cli = Path(sys.executable).with_name("lockstep")
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            str(cli), "-g", str(self.group_file), "restore", state, "--json",
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"`lockstep restore {state}` failed: {err.decode()[-300:]}")
        return time.monotonic() - started

    async def naive(self, row: Row) -> None:
        """The naive baseline on the standard-path VMs."""
        clients = clients_for(self.group)
        try:
            caller = GroupCaller(self.group, clients)
            est = await caller.sync()
            saved = await naive_save(self.group, clients, est, "naive")
            row.save_s = saved.seconds
            files = [p for vm in self.group.vms for p in self.state_files(f"naive-{vm}", [".mem"])]
            row.restore_read_bytes = row.raw_read_bytes = sum(p.stat().st_size for p in files)
            row.raw_read_s.append(await asyncio.to_thread(read_raw, files))
            await asyncio.to_thread(drop_caches)
            restored = await naive_restore(self.group, clients, est, "naive")
        finally:
            for c in clients.values():
                await c.close()
        instants = list(restored.resumed_at.values())
        row.restore_s.append(max(instants) - restored.started)
        row.restore_total_s.append(restored.seconds)
        row.load_s.append(restored.seconds)  # it reads all memory, one VM after another
        row.resume_skew_ms.append((max(instants) - min(instants)) * 1000)
        row.guests_answer_s.append(await self.guests_answer())


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib

    data: dict[str, Any] = tomllib.loads(path.read_text())
    return data


def read_raw(files: Sequence[Path]) -> float:
    """Seconds to read ``files`` one after another from a cold page cache, 16 MiB a read."""
    drop_caches()
    buf = bytearray(_READ_BUFFER)
    started = time.monotonic()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while os.readv(fd, [buf]):
                pass
        finally:
            os.close(fd)
    return time.monotonic() - started


async def run_combo(
    vms: int, memory: str, paths: Sequence[str], repeat: int, work: Path, stream_rate: int
) -> list[Row]:
    """Run the wanted paths for ``vms`` guests of ``memory`` RAM on one lab; one row per path."""
    size = parse_size(memory)
    rows = {p: Row(vms=vms, memory=memory, path=p) for p in paths}
    root = Path(os.environ.get("LOCKSTEP_STATE") or "/var/lib/lockstep")
    root.mkdir(parents=True, exist_ok=True)
    if "fast" in rows and (why := file_fit(vms, size, root)):
        rows["fast"].status = f"not run: {why}"
    lan, vm_net = free_subnets(140, 160)
    opts = LabOptions(
        name=LAB,
        vms=vms,
        memory=memory,
        stream_rate=stream_rate,
        group_file=work / "lockstep.toml",
        lan_subnet=lan,
        vm_subnet=vm_net,
    )
    if lab_data_dir(LAB).parent.exists():
        await take_down(LAB)
    say(f"== {vms} VMs x {memory}: lab up")
    await bring_up(opts, say)
    try:
        bench = Bench(opts.group_file, repeat)
        if "fast" in rows and rows["fast"].status == "ok":
            await _measure(bench, rows["fast"], lambda: bench.lockstep_path(rows["fast"]))
        wanted = [p for p in ("standard", "naive") if p in rows]
        if wanted:
            # The fast VMs go first: their RAM is in page cache, not anonymous memory.
            await bench.call(lambda c: c.down())
            with contextlib.suppress(LockstepError):
                await bench.call(lambda c: c.state_delete("fast-1"))
            why = anonymous_fit(vms, size)
            if why:
                for p in wanted:
                    rows[p].status = f"not run: {why}"
            else:
                say(f"== {vms} VMs x {memory}: rebooting with memory_path = standard")
                await bench.switch("standard")
                if "standard" in rows:
                    std = rows["standard"]
                    await _measure(bench, std, lambda: bench.lockstep_path(std))
                if "naive" in rows:
                    nv = rows["naive"]
                    if "standard" in rows:
                        nv.fill_mib = rows["standard"].fill_mib
                    await _measure(bench, nv, lambda: bench.naive(nv), fill="standard" not in rows)
    finally:
        say(f"== {vms} VMs x {memory}: lab down")
        await take_down(LAB)
    return list(rows.values())


async def _measure(bench: Bench, row: Row, body: Any, fill: bool = True) -> None:
    """Fill the guests (if asked), then run ``body``; a failure is recorded in the row."""
    try:
        if fill:
            row.fill_mib, took = await bench.fill()
            say(f"  {row.path}: guests wrote {row.fill_mib} MiB or more each in {took:.0f} s")
        await body()
        say(f"  {row.path}: {json.dumps(_brief(row))}")
    except Exception as exc:  # a benchmark reports what failed and goes on
        row.status = f"failed: {type(exc).__name__}: {exc}"
        say(f"  {row.path}: {row.status}")


def _brief(row: Row) -> dict[str, Any]:
    return {
        "save_phases": {k: round(v, 3) for k, v in row.save_phases.items()},
        "restore_phases": {k: round(v, 3) for k, v in row.restore_phases.items()},
        "downtime_ms_max": max(row.downtime_ms, default=None),
        "restore_s": [round(x, 3) for x in row.restore_s],
        "raw_read_gbps": row.raw_read_gbps,
        "restore_read_gbps": row.restore_read_gbps,
    }


async def run_matrix(
    vms: Sequence[int],
    memories: Sequence[str],
    paths: Sequence[str],
    *,
    repeat: int,
    stream_rate: int,
) -> list[Row]:
    """Every combination, smallest RAM first; a lab of its own for each (VMs, RAM)."""
    rows: list[Row] = []
    for memory in sorted(memories, key=parse_size):
        for n in sorted(vms):
            with tempfile.TemporaryDirectory(prefix="lockstep-bench-") as work:
                rows += await run_combo(n, memory, paths, repeat, Path(work), stream_rate)
    return rows


def environment() -> Mapping[str, Any]:
    """What the figures depend on: the machine, its load, QEMU."""
    qemu = run(["qemu-system-x86_64", "--version"]).text.splitlines()[0]
    return {
        "cpus": os.cpu_count(),
        "mem_total_gib": round(_meminfo("MemTotal") / 2**30, 1),
        "load_avg": os.getloadavg(),
        "qemu": qemu,
        "state_dir": os.environ.get("LOCKSTEP_STATE") or "/var/lib/lockstep",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
