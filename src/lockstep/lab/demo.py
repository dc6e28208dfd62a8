"""``make demo``: the main job end to end on the embedded lab, with a verdict.

The lab (2 hosts, 4 VMs in 2 primary/standby pairs; primaries on h1, standbys
on h2, as in the paper) runs the cluster agent with a 1 s heartbeat and a 3 s
failure timeout. Then, printing every command as a user would type it:

1. ``lockstep save start``: the whole cluster, paused and resumed in step;
2. a failure: primary p1's QEMU is killed; standby s1 takes over (seen in the
   guests' own logs);
3. ``lockstep restore start``: back to the saved state;
4. the verdict, from the guests' logs since the restore: every pair in its
   original roles, no transition, no split brain, no packet lost or duplicated.

It exits non-zero when the verdict is bad; the lab is always taken down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from lockstep.lab.verify import LAST_RESTORE, Since, verify_lab

__all__ = ["main"]

console = Console()
LAB = "lsdemo"


def _lockstep() -> list[str]:
    exe = Path(sys.executable).parent / "lockstep"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lockstep.cli.main"]


def _run(args: list[str], *, json_out: bool = False, check: bool = True) -> Any:
    """Run ``lockstep ARGS`` as a user would, echoing the command."""
    console.print(f"\n[bold cyan]$ lockstep {' '.join(args)}[/]")
    cmd = _lockstep() + args
    if json_out:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            console.print(proc.stderr.strip())
            if check:
                raise SystemExit(proc.returncode)
            return None
        return json.loads(proc.stdout)
    rc = subprocess.run(cmd, check=False).returncode
    if check and rc != 0:
        raise SystemExit(rc)
    return None


def _roles(report: Any) -> dict[str, str | None]:
    return {v.info.name: v.role_now for v in report.vms}


def _say(text: str) -> None:
    console.print(f"[bold]{text}[/]")


def _report_line(d: dict[str, Any]) -> str:
    skews = []
    if d.get("pause_skew_ms") is not None:
        skews.append(f"pause skew {d['pause_skew_ms']:.3f} ms")
    skews.append(f"resume skew {d['resume_skew_ms']:.3f} ms")
    return (
        f"{d['operation']} {d['state']!r} of {len(d['vms'])} VMs in {d['duration_s']:.2f} s: "
        + ", ".join(skews)
        + f"; frames held {d['frames_held']}, delivered {d['frames_delivered']},"
        f" dropped {d['frames_dropped']}"
    )


def demo(work: Path) -> bool:
    """Run the demo in ``work`` (the group file goes there); return the verdict."""
    group = ["-g", str(work / "lockstep.toml")]
    _say("1. The lab: 2 hosts (network namespaces), 2 primary/standby pairs, 1 s heartbeat")
    _run([*group, "lab", "up", "--name", LAB, "--heartbeat", "1s", "--timeout", "3s"])
    _run([*group, "status"])
    _run([*group, "check"])
    time.sleep(4)  # the pairs find each other
    before = verify_lab(LAB)
    _say(f"   roles now: {_roles(before)}")

    _say("2. Save the whole cluster as one state, every VM paused at the same instant")
    saved = _run([*group, "save", "start", "--json"], json_out=True)
    console.print(_report_line(saved))

    _say("3. A failure: primary p1 is killed; its standby must take over")
    status = _run([*group, "status", "--json"], json_out=True)
    pid = next(v["pid"] for vms in status["hosts"].values() for v in vms if v["name"] == "p1")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(1)
        if _roles(verify_lab(LAB)).get("s1") == "primary":
            break
    failed_over = verify_lab(LAB)
    _say(f"   roles now: {_roles(failed_over)} (transitions so far: {failed_over.transitions})")
    took_over = _roles(failed_over).get("s1") == "primary"

    _say("4. Restore the saved state: every VM resumes at the same instant")
    restored = _run([*group, "restore", "start", "--json"], json_out=True)
    console.print(_report_line(restored))
    time.sleep(8)  # well past the 3 s failure timeout: a takeover would show
    after = verify_lab(LAB, Since(LAST_RESTORE))
    _run(["lab", "verify", "--name", LAB, "--since", LAST_RESTORE], check=False)

    roles = _roles(after)
    original = {"p1": "primary", "s1": "standby", "p2": "primary", "s2": "standby"}
    checks = {
        "standby s1 took over when p1 failed": took_over,
        "roles back as saved (p1, p2 primary; s1, s2 standby)": roles == original,
        "no transition after the restore": after.transitions == 0,
        "no split brain after the restore": after.split_brain == 0,
        "no packet lost or duplicated after the restore": after.total("lost") == 0
        and after.total("duplicated") == 0,
        "no frame dropped by the freeze": saved["frames_dropped"] == 0
        and restored["frames_dropped"] == 0,
    }
    console.print()
    for what, ok in checks.items():
        console.print(f"  {'[green]✓' if ok else '[red]✗'}[/] {what}")
    verdict = all(checks.values())
    skew = max(saved["pause_skew_ms"], saved["resume_skew_ms"], restored["resume_skew_ms"])
    console.print(
        f"\n[bold]verdict: {'PASS' if verdict else 'FAIL'}[/] — the cluster was restored"
        f" {'without noticing' if verdict else 'but noticed'}; worst skew {skew:.3f} ms,"
        f" restore took {restored['duration_s']:.2f} s"
    )
    return verdict


def main() -> None:
    """Run the demo; always take the lab down; exit 1 on a bad verdict."""
    if os.geteuid() != 0:
        console.print("[red]make demo needs root (namespaces, taps, QEMU)[/]")
        raise SystemExit(1)
    work = Path(tempfile.mkdtemp(prefix="lockstep-demo-"))
    ok = False
    try:
        ok = demo(work)
    finally:
        console.print()
        _run(["lab", "down", "--name", LAB], check=False)
        shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
