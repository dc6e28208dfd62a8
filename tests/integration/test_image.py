"""The real guest image booted under QEMU TCG: init, control agent and a pristine base.

One guest is booted for the module (a boot costs seconds under TCG) and the tests
each prove one thing about it. QEMU is always killed, by the pid it wrote, and
every assertion about the guest carries its console log.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lockstep.errors import LabError
from lockstep.lab.guestctl import GuestControl
from lockstep.lab.image import GuestImage, build_image
from lockstep.proc import run, which

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="building the image needs root (debootstrap)"),
    pytest.mark.skipif(
        which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64 (qemu-system-x86)"
    ),
]

HOSTNAME = "p1"
ADDRESS = "10.124.0.11/24"
START = "echo start command ran on $(hostname)"


@dataclass
class Guest:
    """A booted guest: its files, QEMU's pid, its command line and how long it took."""

    image: GuestImage
    workdir: Path
    pid: int
    cmdline: str
    boot_seconds: float

    @property
    def channel(self) -> Path:
        """The unix socket of the control channel (the second serial port)."""
        return self.workdir / "channel.sock"

    def console(self) -> str:
        """The console log so far (the first serial port), for assertion messages."""
        try:
            return (self.workdir / "console.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no console log)"

    def run(self, command: str, timeout: float = 90.0) -> tuple[int, str]:
        """Run ``command`` in the guest through a fresh control connection."""

        async def go() -> tuple[int, str]:
            async with GuestControl(self.channel) as ctl:
                return await ctl.run(command, timeout=timeout)

        try:
            return asyncio.run(go())
        except LabError as exc:
            pytest.fail(f"{exc}\n--- console ---\n{self.console()}")


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie counts)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def kill_qemu(pid: int) -> None:
    """SIGKILL the QEMU we started and wait until it is gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def fingerprint(path: Path) -> tuple[int, int]:
    """Size and modification time of a file: any write changes them."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@pytest.fixture(scope="module")
def image() -> GuestImage:
    """The lab's guest image (built once, then taken from the cache)."""
    return build_image(progress=lambda line: print(f"image: {line}", flush=True))


@pytest.fixture(scope="module")
def base_before(image: GuestImage) -> tuple[int, int]:
    """The base image's fingerprint before any guest ran on it."""
    return fingerprint(image.rootfs)


@pytest.fixture(scope="module")
def guest(
    image: GuestImage, base_before: tuple[int, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guest]:
    """One guest of the image under TCG, with an isolated NIC; QEMU killed afterwards."""
    workdir = tmp_path_factory.mktemp("guest")
    overlay = workdir / "ov.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
         "-b", str(image.rootfs), str(overlay)])  # fmt: skip
    cmdline = image.cmdline(hostname=HOSTNAME, ip=ADDRESS, start=START)
    argv = [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "pc,accel=tcg", "-m", "256M", "-smp", "1",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
        "-drive", f"file={overlay},if=none,id=disk0,format=qcow2",
        "-device", "virtio-blk-pci,drive=disk0",
        # A NIC on a hub with nothing else on it: eth0 exists, no frame leaves.
        "-netdev", "hubport,id=net0,hubid=0", "-device", "virtio-net-pci,netdev=net0",
        "-chardev", f"file,id=con,path={workdir / 'console.log'}", "-serial", "chardev:con",
        "-chardev", f"socket,id=chan,path={workdir / 'channel.sock'},server=on,wait=off",
        "-serial", "chardev:chan",
        "-daemonize", "-pidfile", str(workdir / "qemu.pid"),
    ]  # fmt: skip
    started = time.monotonic()
    run(argv, timeout=60)
    pid = int((workdir / "qemu.pid").read_text())
    guest = Guest(image, workdir, pid, cmdline, 0.0)
    try:

        async def ready() -> None:
            async with GuestControl(guest.channel) as ctl:
                await ctl.wait_ready(timeout=120)

        try:
            asyncio.run(ready())
        except LabError as exc:
            pytest.fail(f"{exc}\n--- console ---\n{guest.console()}")
        guest.boot_seconds = time.monotonic() - started
        print(f"guest ready {guest.boot_seconds:.1f} s after QEMU started", flush=True)
        yield guest
    finally:
        kill_qemu(pid)


def test_guest_runs_commands_through_the_channel(guest: Guest) -> None:
    """The agent runs shell commands in the guest: the Debian kernel, python3, and rc/out."""
    rc, out = guest.run("uname -r")
    assert rc == 0 and re.fullmatch(r"\d+\.\d+\.\d+-\d+-amd64\n", out), (out, guest.console())
    assert guest.run("python3 -c 'print(6*7)'") == (0, "42\n"), guest.console()
    assert guest.run("echo oops >&2; exit 3") == (3, "oops\n"), guest.console()


def test_guest_sees_the_command_line_it_was_given(guest: Guest) -> None:
    """/proc/cmdline in the guest is exactly the line GuestImage.cmdline built."""
    assert guest.run("cat /proc/cmdline") == (0, guest.cmdline + "\n"), guest.console()


def test_init_applies_hostname_address_and_start_command(guest: Guest) -> None:
    """lockstep-init set the host name, gave eth0 its address and ran the start command."""
    assert guest.run("hostname") == (0, f"{HOSTNAME}\n"), guest.console()
    rc, out = guest.run("ip -o addr show dev eth0")
    assert rc == 0 and f"inet {ADDRESS}" in out, (out, guest.console())
    assert f"start command ran on {HOSTNAME}" in guest.console()


def test_console_says_ready(guest: Guest) -> None:
    """The console has the ready line and the JSON ready event with the guest's time."""
    console = guest.console()
    assert "lockstep-init: ready" in console, console
    events = [json.loads(line) for line in console.splitlines() if line.startswith('{"event"')]
    assert [e["event"] for e in events] == ["ready"], console
    assert abs(events[0]["t"] - time.time()) < 3600, console


def test_agent_survives_reconnects_and_kills_overdue_commands(guest: Guest) -> None:
    """Successive clients are served; a command past its timeout answers 124 in time."""
    for i in range(3):
        assert guest.run(f"echo {i}") == (0, f"{i}\n"), guest.console()
    started = time.monotonic()
    rc, out = guest.run("sleep 30", timeout=2)
    assert rc == 124 and time.monotonic() - started < 8, (rc, out, guest.console())
    assert guest.run("echo still here") == (0, "still here\n"), guest.console()


def test_init_is_pid_1_and_mounts_the_root_read_write(guest: Guest) -> None:
    """PID 1 is lockstep-init and / is the ext4 /dev/vda, writable (the overlay takes writes)."""
    assert guest.run("cat /proc/1/cmdline | tr '\\0' ' '")[1].startswith("/bin/sh /sbin/lockstep")
    rc, out = guest.run("grep ' / ' /proc/mounts && touch /written && echo ok")
    assert rc == 0 and out.startswith("/dev/vda / ext4 rw") and out.endswith("ok\n"), out


def test_base_image_is_never_written(guest: Guest, base_before: tuple[int, int]) -> None:
    """After the guest wrote to its disk, the base qcow2 is unchanged; the overlay grew."""
    assert guest.run("sync")[0] == 0
    assert fingerprint(guest.image.rootfs) == base_before
    info = json.loads(
        run(["qemu-img", "info", "-U", "--output=json", str(guest.workdir / "ov.qcow2")]).text
    )
    assert info["backing-filename"] == str(guest.image.rootfs)


def test_second_build_comes_from_the_cache(image: GuestImage) -> None:
    """Asking for the same image again returns the cached one, in seconds, not a rebuild."""
    started = time.monotonic()
    again = build_image()
    assert again == image
    assert time.monotonic() - started < 10
