"""``lockstep lab exec`` and ``lockstep lab console`` on the real lab's guests."""

from __future__ import annotations

import asyncio
import os
import secrets
import select
import signal
import subprocess
import sys
import time

from click.testing import CliRunner

from lockstep.cli.main import main
from tests.helpers.signals import sigint_default
from tests.integration.conftest import Lab

LOCKSTEP = [sys.executable, "-c", "from lockstep.cli.main import main; main()"]


def test_exec_passes_the_guests_output_and_exit_status_through(fresh: Lab) -> None:
    """A command runs in the guest named: its output and status come back as they are.

    One argument is a shell line; several are words; a command past --timeout
    exits 124; a VM the lab lacks is lockstep's failure (255), named in one sentence.
    """
    runner = CliRunner()

    def lab_exec(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(main, ["lab", "exec", "--name", fresh.name, *args])
        return result.exit_code, result.stdout, result.stderr

    assert lab_exec("s1", "--", "hostname; echo to stderr >&2; exit 3") == (
        3,
        "s1\nto stderr\n",
        "",
    )
    assert lab_exec("p2", "--", "echo", "two  spaces", "$HOME") == (0, "two  spaces $HOME\n", "")
    assert lab_exec("--timeout", "1s", "p1", "--", "sleep 10")[0] == 124
    rc, out, err = lab_exec("x9", "--", "true")
    assert (rc, out) == (255, "")
    assert err.strip() == f"lockstep: lab {fresh.name} has no VM 'x9' (its VMs: p1, s1, p2, s2)"


def test_console_follows_the_guest_live_until_ctrl_c(fresh: Lab) -> None:
    """`lab console` shows a line the guest writes on its serial console as it comes, and Ctrl-C ends it.

    It starts with the log's last line (so it is following), then the guest
    writes a marker on /dev/ttyS0 through `lab exec`; the marker shows within
    seconds, and SIGINT ends the command with status 0.
    """
    marker = f"console-marker-{secrets.token_hex(4)}"
    follow = subprocess.Popen(
        [*LOCKSTEP, "lab", "console", "--name", fresh.name, "-n", "1", "p1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ,
        preexec_fn=sigint_default,
    )
    assert follow.stdout is not None
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"\n" not in seen:  # the last line of the log: it is following now
            assert time.monotonic() < deadline, "lab console printed nothing"
            if select.select([follow.stdout], [], [], 0.5)[0]:
                seen += os.read(follow.stdout.fileno(), 65536)
        asyncio.run(fresh.sh("p1", f"echo {marker} > /dev/ttyS0"))
        while marker.encode() not in seen:
            assert time.monotonic() < deadline, f"the marker never showed; got {seen[-500:]!r}"
            if select.select([follow.stdout], [], [], 0.5)[0]:
                seen += os.read(follow.stdout.fileno(), 65536)
        follow.send_signal(signal.SIGINT)
        assert follow.wait(10) == 0
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
