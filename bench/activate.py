"""What a resume after a save costs in QEMU itself: ``cont`` re-activating the disks.

A save migrates each VM's state to a file, and QEMU then marks every block
node inactive (for a destination that would take the disks over); ``cont``
activates them all again before the vCPUs start. This bench starts a plain
QEMU (TCG, no guest, ``-S``) with two qcow2 disks whose chains are
``--depths`` files long, and times ``cont`` to QEMU's RESUME event after a
migration to a file, ``--tries`` times per depth: with QEMU's default
``drop-cache`` (each file synced and dropped from the page cache first) and
with the page cache kept (:func:`lockstep.vm.argv.keep_cache`, what lockstep's
QEMU driver sets). Nothing of a lab is needed.

    python -m bench.activate [--depths 1,10,30,60] [--tries 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient

from bench.common import machine, machine_line, percentile
from lockstep.vm.argv import QEMU_BINARY, keep_cache
from lockstep.vm.machine import event_time


def _chain(folder: Path, name: str, depth: int) -> Path:
    """A qcow2 chain of ``depth`` files; its top."""
    top: Path | None = None
    for i in range(depth):
        path = folder / f"{name}-{i}.qcow2"
        backing = [] if top is None else ["-F", "qcow2", "-b", str(top)]
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(path), "1G"], check=True
        )
        top = path
    assert top is not None
    return top


def _cont_times(depth: int, kept: bool, tries: int) -> list[float]:
    """ms from ``cont`` to RESUME after each of ``tries`` migrations, chains of ``depth``."""
    with tempfile.TemporaryDirectory(prefix="lsbench-activate-") as tmp:
        folder = Path(tmp)
        drives = []
        for name in ("a", "b"):
            opts = keep_cache(depth - 1) if kept else ""
            drives += ["-drive", f"file={_chain(folder, name, depth)},if=virtio{opts}"]
        return asyncio.run(_measure(folder / "qmp.sock", drives, tries))


async def _measure(sock: Path, drives: list[str], tries: int) -> list[float]:
    qemu = await asyncio.create_subprocess_exec(
        QEMU_BINARY, "-machine", "q35,accel=tcg", "-m", "256", "-display", "none", "-S",
        *drives, "-qmp", f"unix:{sock},server=on,wait=off",
    )  # fmt: skip
    client = QMPClient("bench-activate")
    try:
        for attempt in range(100):  # QEMU makes its socket after it starts
            try:
                await client.connect(str(sock))
                break
            except ConnectError:
                if attempt == 99:
                    raise
                await asyncio.sleep(0.05)
        await client.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
        )
        out = []
        for _ in range(tries):
            with client.listener("MIGRATION") as migration:
                await client.execute("migrate", {"uri": "exec:cat > /dev/null"})
                async for event in migration:
                    data: dict[str, str] = event["data"]  # type: ignore[assignment]
                    if data["status"] in ("completed", "failed"):
                        break
            with client.listener("RESUME") as resumed:
                sent = await _cont(client)
                event = await resumed.get()
            out.append((event_time(event) - sent) * 1000)
            await client.execute("stop")
        return out
    finally:
        await client.disconnect()
        qemu.kill()
        await qemu.wait()


async def _cont(client: QMPClient) -> float:
    """Send ``cont`` as soon as QEMU takes it; when it was sent (host wall clock).

    The migration finalizes just after its last event: until then QEMU refuses.
    """
    for attempt in range(200):
        sent = time.time()
        try:
            await client.execute("cont")
            return sent
        except ExecuteError:
            if attempt == 199:
                raise
            await asyncio.sleep(0.005)
    raise AssertionError("unreachable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1,10,30,60", help="files per chain, comma-separated")
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    print(f"cont to RESUME after a migration to a file, 2 disks: {machine_line()}")
    print(f"{'files per chain':>16} {'page cache':>12} {'p50 ms':>8} {'max ms':>8}")
    for depth in (int(d) for d in args.depths.split(",")):
        for kept in (False, True):
            times = _cont_times(depth, kept, args.tries)
            rows.append({"depth": depth, "cache_kept": kept, "cont_ms": times})
            label = "kept" if kept else "dropped"
            print(f"{depth:>16} {label:>12} {percentile(times, 50):8.2f} {max(times):8.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
