"""What a resume costs the guests: their vCPU threads in the moments after it.

A save resumes each VM in the QEMU process it ran in; a restore resumes it in a
new process, which has loaded the state. Under TCG that process starts with no
translated code (QEMU drops all of it when it loads a VM state), and a restored
VM with the fast memory path also faults its RAM in as the guest touches it.
This bench shows what that costs on this machine: for each VM, from the kernel's
own accounting of its vCPU thread (``/proc/PID/task/TID/schedstat`` and
``stat``), how long the thread ran, how long it waited for a core, and how many
page faults it took, in the ``--window`` seconds after the VM resumed, after
saves and after restores of the lab's 4 VMs (2 hosts, 12 streams at 200 pkt/s).
The heartbeat bench shows what the guests noticed; this one shows why.

    python -m bench.coldstart [--cycles 10] [--window 0.3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import lab_caller, lab_options, percentile, say
from lockstep.caller.report import OperationReport
from lockstep.lab.lab import lab_data_dir, vm_run_dir
from lockstep.vm.machine import qemu_threads

LAB = "lscold"
SAMPLE_EVERY = 0.005  # s


@dataclass(frozen=True)
class Sample:
    """One reading of a vCPU thread: when, its run and wait times (ms) and page faults."""

    t: float
    tid: int
    run_ms: float
    wait_ms: float
    faults: int


def qemu_pid(run_dir: Path) -> int | None:
    """The pid of the QEMU whose pid file is in ``run_dir`` (None: none there yet)."""
    try:
        return int((run_dir / "qemu.pid").read_text())
    except (OSError, ValueError):
        return None


def sample(pid: int, tid: int) -> Sample | None:
    """The thread's counters now (None: it is gone)."""
    try:
        run_ns, wait_ns, _ = map(int, Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split())
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    return Sample(time.time(), tid, run_ns / 1e6, wait_ns / 1e6, int(fields[7]) + int(fields[9]))


@contextmanager
def sampling(run_dirs: dict[str, Path]) -> Iterator[dict[str, list[Sample]]]:
    """Sample every VM's vCPU threads every SAMPLE_EVERY s while the block runs."""
    out: dict[str, list[Sample]] = {vm: [] for vm in run_dirs}
    stop = threading.Event()

    vcpus: dict[int, list[int]] = {}  # pid -> its vCPU threads, looked up once per QEMU

    def loop() -> None:
        while not stop.is_set():
            for vm, run_dir in run_dirs.items():
                pid = qemu_pid(run_dir)
                if pid is None:
                    continue
                if not vcpus.get(pid):
                    vcpus[pid] = qemu_threads(pid, vcpus=True)
                for tid in vcpus[pid]:
                    if (s := sample(pid, tid)) is not None:
                        out[vm].append(s)
            time.sleep(SAMPLE_EVERY)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()


def after(samples: list[Sample], start: float, window: float) -> dict[str, float] | None:
    """Run ms, wait ms and faults of the thread that ran from ``start`` for ``window`` s.

    The thread is the one sampled last in the window (a restore's new QEMU);
    its counters just before ``start`` are the base. None: too few samples.
    """
    inside = [s for s in samples if start <= s.t <= start + window]
    if not inside:
        return None
    tid = inside[-1].tid
    mine = [s for s in samples if s.tid == tid and s.t <= start + window]
    before = [s for s in mine if s.t < start]
    first = before[-1] if before else mine[0]
    last = mine[-1]
    return {
        "run_ms": last.run_ms - first.run_ms,
        "wait_ms": last.wait_ms - first.wait_ms,
        "faults": last.faults - first.faults,
    }


async def observe(
    action: Any, run_dirs: dict[str, Path], window: float
) -> tuple[OperationReport, dict[str, dict[str, float]]]:
    """Run one save or restore while sampling; each VM's figures after its own resume."""
    with sampling(run_dirs) as samples:
        report = await action
        await asyncio.sleep(window + 0.1)
    figures = {}
    for v in report.vms:
        if v.resumed_at is not None and (f := after(samples[v.name], v.resumed_at, window)):
            figures[v.name] = f
    return report, figures


def summary(per_op: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """p50 and max over every VM of every operation, per figure."""
    out = {}
    for key in ("run_ms", "wait_ms", "faults"):
        values = [vm[key] for op in per_op for vm in op.values()]
        if values:
            out[key] = {"p50": percentile(values, 50), "max": max(values)}
    return out


async def run(cycles: int, window: float) -> dict[str, Any]:
    """Save/restore cycles on a fresh lab; the vCPU figures after each kind of resume."""
    opts = lab_options(LAB, (230, 250))
    kinds: dict[str, list[dict[str, dict[str, float]]]] = {"save": [], "restore": []}
    async with lab_caller(opts) as caller:
        data = lab_data_dir(LAB)
        run_dirs = {name: vm_run_dir(data, vm.host, name) for name, vm in caller.group.vms.items()}
        await asyncio.sleep(3.0)  # the guests past their boot
        for i in range(cycles):
            _, saved = await observe(caller.save(f"cold-{i}"), run_dirs, window)
            _, restored = await observe(caller.restore(f"cold-{i}"), run_dirs, window)
            kinds["save"].append(saved)
            kinds["restore"].append(restored)
            say(
                f"cycle {i + 1}/{cycles}: vCPU ran "
                + ", ".join(f"{vm} {f['run_ms']:.0f}" for vm, f in saved.items())
                + " ms after the save; "
                + ", ".join(f"{vm} {f['run_ms']:.0f}" for vm, f in restored.items())
                + " ms after the restore"
            )
    return {
        "cycles": cycles,
        "window_s": window,
        "vms": opts.vms,
        "hosts": 2,
        "cores": os.cpu_count(),
        "after_save": summary(kinds["save"]),
        "after_restore": summary(kinds["restore"]),
        "per_operation": kinds,
    }


def table(result: dict[str, Any]) -> str:
    """The figures as text."""
    ms = int(result["window_s"] * 1000)
    lines = [
        f"a guest's vCPU thread in the {ms} ms after it resumed ({result['cycles']} cycles,"
        f" 4 VMs on 2 hosts, {result['cores']} cores), p50 / max over VMs and operations:",
        f"{'after':10} {'ran (ms)':>16} {'waited (ms)':>16} {'page faults':>16}",
    ]
    for kind in ("after_save", "after_restore"):
        f = result[kind]

        def cell(key: str, f: dict[str, Any] = f) -> str:
            return f"{f[key]['p50']:.0f} / {f[key]['max']:.0f}" if key in f else "-"

        lines.append(
            f"{kind[6:]:10} {cell('run_ms'):>16} {cell('wait_ms'):>16} {cell('faults'):>16}"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--window", type=float, default=0.3, help="seconds after each resume")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.cycles < 1:
        ap.error("--cycles must be at least 1")
    if not 0 < args.window <= 5:
        ap.error("--window must be in (0, 5] seconds")
    result = asyncio.run(run(args.cycles, args.window))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
