"""One QEMU process driven over QMP (``qemu.qmp``): start, pause, save, load, resume.

A :class:`Machine` owns one VM's QEMU process and its QMP connection. Its
lifecycle is a :class:`VmRunstate` with explicit allowed transitions; a method
called in the wrong state fails with :class:`VmStateError` before touching QEMU.

QEMU is started in its own session with its stderr in a file, so it outlives
an execd restart; :meth:`Machine.attach` finds it again through its pid file and
QMP socket. Every instant reported (pause, resume) is QEMU's own event
timestamp (host wall clock, seconds), never the time a reply arrived.

Every QMP command has a deadline (``command_timeout``): a QEMU that stops
answering fails the command with :class:`QmpError` instead of blocking the step
that sent it; a QEMU that dies mid-command fails it with QEMU's last words.

Memory is saved and loaded by migration to and from a file descriptor, all of
it (the standard path) or, with ``ignore_shared``, all but the RAM kept in a
shared file (the fast path: :mod:`lockstep.vm.memory`). The VM's own RAM file
(:attr:`VmPaths.ram`) goes when its QEMU has gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError, StateError
from qemu.qmp.message import Message

from lockstep.errors import QemuStartError, QmpError, VmError, VmStateError
from lockstep.group import VmSpec
from lockstep.proc import in_netns
from lockstep.vm.argv import (
    AGENT_CHARDEV,
    QEMU_BINARY,
    Drive,
    RamFile,
    VmPaths,
    drive_id,
    qemu_argv,
)
from lockstep.vm.memory import discard_ram_file

__all__ = [
    "ANNOUNCE_ROUNDS",
    "Machine",
    "MigrationProgress",
    "VmRunstate",
    "event_time",
    "qemu_threads",
]

# Unlimited for all practical purposes (QEMU 7.2 caps migration at 128 MiB/s by default).
_MAX_BANDWIDTH = 1 << 50
_IGNORE_SHARED = "x-ignore-shared"
_POLL = 0.005  # s between looks at a starting or ending QEMU
_MIGRATION_POLL = 0.01  # s between query-migrate calls, at most
_READ_AHEAD_FROM = 64 << 20  # bytes: a stream this big is read ahead for QEMU
_READ_AHEAD_CHUNK = 16 << 20
_READ_AHEAD_WINDOW = 512 << 20
_STDERR_TAIL = 1500
# Every command lockstep sends is answered in milliseconds, but for those that
# make QEMU drain and flush the guest's disk first (stop, quit,
# blockdev-snapshot-sync), which a slow or busy disk can stretch to seconds.
# 20 s leaves room for that, and ends before the 30 s a caller gives the RPCs
# that send them (rpc.Timeout.NORMAL: Pause, Resume, Stop), so a wedged QEMU
# reaches the user as this VM and this command, not as a host that timed out.
# Migrations have their own, long timeouts and only poll with short commands.
_COMMAND_TIMEOUT = 20.0
# QEMU's sockets close as it exits: how long a broken connection waits to see it gone.
_EXIT_GRACE = 1.0
# announce-self's rounds (ms), as QEMU announces a migrated VM: now, then 50 ms
# later, then each interval 100 ms longer (at most 550), 5 rounds in all.
ANNOUNCE_ROUNDS = {"initial": 50, "max": 550, "rounds": 5, "step": 100}


def qemu_threads(pid: int, *, vcpus: bool) -> list[int]:
    """Thread ids of QEMU process ``pid``: its vCPUs (``CPU n/TCG``, ``CPU n/KVM``) or all others.

    Names come from ``-name ...,debug-threads=on``. Empty if the process is gone.
    """
    tids = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            comm = (task / "comm").read_text().strip()
            if comm.startswith("CPU ") == vcpus:
                tids.append(int(task.name))
    except OSError:
        return []
    return sorted(tids)


class VmRunstate(enum.Enum):
    """Where a VM is in its life, as lockstep sees it."""

    NEW = "new"  # no process yet
    STARTING = "starting"  # process started, QMP not yet up
    RUNNING = "running"
    PAUSED = "paused"
    SAVED = "saved"  # paused, memory written out (QEMU "postmigrate")
    INCOMING = "incoming"  # paused, waiting for its memory
    GONE = "gone"  # process ended


_ALLOWED: dict[VmRunstate, frozenset[VmRunstate]] = {
    VmRunstate.NEW: frozenset({VmRunstate.STARTING, VmRunstate.GONE}),
    # attach() may find QEMU in any state, including after a completed save.
    VmRunstate.STARTING: frozenset(
        {
            VmRunstate.RUNNING,
            VmRunstate.PAUSED,
            VmRunstate.SAVED,
            VmRunstate.INCOMING,
            VmRunstate.GONE,
        }
    ),
    VmRunstate.RUNNING: frozenset({VmRunstate.PAUSED, VmRunstate.GONE}),
    VmRunstate.PAUSED: frozenset({VmRunstate.RUNNING, VmRunstate.SAVED, VmRunstate.GONE}),
    VmRunstate.SAVED: frozenset({VmRunstate.RUNNING, VmRunstate.GONE}),
    VmRunstate.INCOMING: frozenset({VmRunstate.PAUSED, VmRunstate.GONE}),
    VmRunstate.GONE: frozenset(),
}

# QEMU's query-status names, mapped for attach().
_QEMU_STATUS = {
    "running": VmRunstate.RUNNING,
    "paused": VmRunstate.PAUSED,
    "prelaunch": VmRunstate.PAUSED,
    "postmigrate": VmRunstate.SAVED,
    "finish-migrate": VmRunstate.SAVED,
    "inmigrate": VmRunstate.INCOMING,
}


MigrationProgress = Callable[[int, int], None]
"""Called with (bytes written, bytes total) while memory is saved."""


def event_time(event: Message) -> float:
    """A QMP event's timestamp (host wall clock, s), as QEMU stamped it."""
    ts: dict[str, int] = event["timestamp"]  # type: ignore[assignment]
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


def _read_ahead(fd: int, stop: threading.Event) -> None:
    """Read ``fd`` in big pieces into the page cache, ahead of QEMU, until ``stop``.

    QEMU got this very open file (SCM_RIGHTS), so its reads move the offset
    this thread sees: it stays at most a window ahead of them, so what it read
    is still cached when QEMU gets there.
    """
    buf = bytearray(_READ_AHEAD_CHUNK)
    offset = 0
    with contextlib.suppress(OSError):
        while not stop.is_set():
            if offset - os.lseek(fd, 0, os.SEEK_CUR) > _READ_AHEAD_WINDOW:
                stop.wait(0.002)
                continue
            n = os.preadv(fd, [buf], offset)
            if n <= 0:
                return
            offset += n


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Machine:
    """A VM's QEMU process and its QMP connection.

    ``command_timeout`` is how many seconds QEMU has to answer one QMP command
    (and to send the event a stop or cont owes); see ``_COMMAND_TIMEOUT``.
    """

    def __init__(
        self,
        spec: VmSpec,
        rundir: Path,
        *,
        netns: str | None = None,
        qemu_binary: str = QEMU_BINARY,
        command_timeout: float = _COMMAND_TIMEOUT,
        logdir: Path | None = None,
    ) -> None:
        self.spec = spec
        self.paths = VmPaths(rundir, logdir)
        self.netns = netns
        self.qemu_binary = qemu_binary
        # Seconds QEMU has to answer one QMP command (and send the event it owes).
        self.command_timeout = command_timeout
        self._runstate = VmRunstate.NEW
        self._history: list[VmRunstate] = [VmRunstate.NEW]
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._qmp: QMPClient | None = None

    # -- state -------------------------------------------------------------

    @property
    def name(self) -> str:
        """The VM's name."""
        return self.spec.name

    @property
    def runstate(self) -> VmRunstate:
        """Where the VM is in its lifecycle."""
        return self._runstate

    @property
    def history(self) -> list[VmRunstate]:
        """Every runstate this object has been in, in order (for tests and logs)."""
        return list(self._history)

    @property
    def pid(self) -> int | None:
        """QEMU's pid, once started or attached."""
        return self._pid

    def relocate(self, rundir: Path) -> None:
        """Say that this VM's files (sockets, pid file, RAM file) now live in ``rundir``.

        For a restored VM whose folder was moved into place while QEMU runs:
        QEMU keeps what it has open, and new connections use the new paths.
        """
        self.paths = VmPaths(rundir)

    def control_threads(self) -> list[int]:
        """Thread ids that carry a QMP command through: every thread but the vCPUs.

        That is QEMU's main loop, its monitor I/O and the workers that do the
        block I/O of, say, re-activating disks on ``cont`` after a migration
        (names from ``-name ...,debug-threads=on``). Empty if QEMU is gone.
        """
        return self._threads(vcpus=False)

    def vcpu_threads(self) -> list[int]:
        """Thread ids of the vCPUs (``CPU n/TCG`` or ``CPU n/KVM``)."""
        return self._threads(vcpus=True)

    def _threads(self, *, vcpus: bool) -> list[int]:
        return [] if self._pid is None else qemu_threads(self._pid, vcpus=vcpus)

    def _require(self, *states: VmRunstate) -> None:
        if self._runstate not in states:
            wanted = " or ".join(s.value for s in states)
            raise VmStateError(f"VM {self.name} is {self._runstate.value}; this needs it {wanted}")

    def _set(self, new: VmRunstate) -> None:
        if new is self._runstate:
            return
        if new not in _ALLOWED[self._runstate]:
            raise VmStateError(
                f"VM {self.name}: cannot go from {self._runstate.value} to {new.value}"
            )
        self._runstate = new
        self._history.append(new)

    def _stderr_tail(self) -> str:
        try:
            text = self.paths.stderr.read_text(errors="replace").strip()
        except OSError:
            return ""
        return text[-_STDERR_TAIL:]

    # -- start / attach / stop ---------------------------------------------

    async def start(
        self,
        *,
        drives: Sequence[Drive],
        taps: Sequence[str],
        incoming: bool = False,
        paused: bool = False,
        ram: RamFile | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Start QEMU and connect QMP; the VM runs unless ``paused`` or ``incoming``.

        ``ram`` puts guest RAM in a file (None: anonymous memory).

        Raises:
            VmStateError: the VM was already started.
            QemuStartError: QEMU exited or offered no QMP in time (with its stderr).
        """
        self._require(VmRunstate.NEW)
        self.paths.rundir.mkdir(parents=True, exist_ok=True)
        for stale in (self.paths.qmp, self.paths.channel, self.paths.agent, self.paths.pidfile):
            stale.unlink(missing_ok=True)
        argv = qemu_argv(
            self.spec,
            self.paths,
            drives=drives,
            taps=taps,
            incoming=incoming,
            paused=paused,
            ram=ram,
            qemu_binary=self.qemu_binary,
        )
        self._set(VmRunstate.STARTING)
        with open(self.paths.stderr, "wb") as err:
            try:
                self._proc = subprocess.Popen(  # noqa: ASYNC220 (must outlive execd; no asyncio child watcher)
                    in_netns(self.netns, argv),
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    start_new_session=True,
                )
            except OSError as exc:
                self._set(VmRunstate.GONE)
                raise QemuStartError(f"VM {self.name}: cannot run {argv[0]}: {exc}") from exc
        self._pid = self._proc.pid
        try:
            await self._connect(timeout)
        except BaseException:
            await self.kill()
            raise
        if incoming:
            self._set(VmRunstate.INCOMING)
        else:
            self._set(VmRunstate.PAUSED if paused else VmRunstate.RUNNING)

    async def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "socket never appeared"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise QemuStartError(
                    f"VM {self.name}: QEMU exited with status {self._proc.returncode}"
                    f" while starting: {self._stderr_tail() or 'no message'}"
                )
            if self.paths.qmp.exists():
                qmp = QMPClient(self.name)
                try:
                    # A QEMU whose main loop is stuck still accepts: bound the greeting too.
                    async with asyncio.timeout(max(deadline - time.monotonic(), _POLL)):
                        await qmp.connect(str(self.paths.qmp))
                except TimeoutError:
                    last = "connected, but QEMU never greeted"
                except (QMPError, OSError) as exc:
                    last = str(exc)
                else:
                    self._qmp = qmp
                    return
            await asyncio.sleep(_POLL)
        tail = self._stderr_tail()
        raise QemuStartError(
            f"VM {self.name}: QEMU offered no QMP on {self.paths.qmp} within {timeout:g} s"
            f" ({last}){': ' + tail if tail else ''}"
        )

    async def attach(self, timeout: float = 10.0) -> None:
        """Re-attach to this VM's QEMU after an execd restart (pid file + QMP).

        ``timeout`` bounds the wait for QMP (socket, greeting, negotiation); a
        QEMU found but not driven (no QMP in time, no answer) is killed.

        Raises:
            VmStateError: this object already drives a process.
            VmError: no live QEMU for this VM was found.
            QemuStartError: QEMU offered no QMP in time.
            QmpError: QEMU did not answer query-status.
        """
        self._require(VmRunstate.NEW)
        try:
            pid = int(self.paths.pidfile.read_text().strip())
        except (OSError, ValueError) as exc:
            raise VmError(f"VM {self.name}: no QEMU pid file at {self.paths.pidfile}") from exc
        if not _pid_alive(pid):
            discard_ram_file(self.paths.ram)
            raise VmError(f"VM {self.name}: its QEMU (pid {pid}) is no longer running")
        self._pid = pid
        self._set(VmRunstate.STARTING)
        try:
            await self._connect(timeout)
            status = await self.execute("query-status")
            name = status.get("status") if isinstance(status, dict) else None
            if not isinstance(name, str):
                raise QmpError(
                    f"VM {self.name}: QEMU's query-status reply names no status: {status}"
                )
            self._set(_QEMU_STATUS.get(name, VmRunstate.PAUSED))
        except BaseException:
            # A QEMU of ours we cannot drive must not live on holding its taps.
            await self.kill()
            raise

    def alive(self) -> bool:
        """Whether the QEMU process still runs."""
        if self._proc is not None:
            return self._proc.poll() is None
        return self._pid is not None and _pid_alive(self._pid)

    async def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            await asyncio.sleep(_POLL)
        return not self.alive()

    async def drop_qmp(self) -> None:
        """Close the QMP connection (QEMU runs on: an execd stopping leaves its VMs running)."""
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            # After quit (or a crash) the reader ends with EOF; that is expected.
            with contextlib.suppress(QMPError, OSError, EOFError):
                await qmp.disconnect()

    async def quit(self, timeout: float = 10.0) -> None:
        """Ask QEMU to quit (killing it if it does not); the VM is gone afterwards.

        ``timeout`` bounds the answer to quit, then again QEMU's exit.
        """
        if self._runstate is VmRunstate.GONE:
            return
        if self._qmp is not None:
            with contextlib.suppress(VmError):
                await self.execute("quit", timeout=timeout)
        await self.drop_qmp()
        if not await self._wait_exit(timeout):
            await self.kill()
            return
        self._reap()
        self._set(VmRunstate.GONE)

    async def kill(self) -> None:
        """Kill QEMU at once (SIGKILL); the VM is gone afterwards."""
        await self.drop_qmp()
        if self._pid is not None and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            await self._wait_exit(5.0)
        self._reap()
        if self._runstate is not VmRunstate.GONE:
            self._set(VmRunstate.GONE)

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1)
        self.paths.pidfile.unlink(missing_ok=True)
        if not self.alive():
            # A state that needs these bytes has its own link, clone or copy.
            discard_ram_file(self.paths.ram)

    # -- QMP ------------------------------------------------------------------

    def _client(self) -> QMPClient:
        if self._qmp is None:
            raise QmpError(f"VM {self.name}: no QMP connection (VM is {self._runstate.value})")
        return self._qmp

    async def execute(
        self, cmd: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one QMP command and return its result.

        ``timeout``: seconds QEMU has to answer (default: ``command_timeout``).

        Raises:
            QmpError: QEMU refused the command, did not answer in time, or
                the connection broke (with QEMU's last words if it exited).
        """
        qmp = self._client()
        seconds = self.command_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(seconds):
                return await qmp.execute(cmd, args)
        except TimeoutError as exc:
            raise QmpError(
                f"VM {self.name}: QEMU did not answer {cmd} within {seconds:g} s"
            ) from exc
        except ExecuteError as exc:
            raise QmpError(f"VM {self.name}: QEMU refused {cmd}: {exc}") from exc
        except (ExecInterruptedError, StateError, OSError) as exc:
            # The connection broke: QEMU's last words say why, if it exited.
            if await self._wait_exit(_EXIT_GRACE):
                raise QmpError(self._exited_during(cmd)) from exc
            raise QmpError(f"VM {self.name}: QMP connection lost during {cmd}") from exc
        except QMPError as exc:
            raise QmpError(f"VM {self.name}: QMP {cmd} failed: {exc}") from exc

    def _exited_during(self, what: str) -> str:
        return f"VM {self.name}: QEMU exited during {what}: {self._stderr_tail() or 'no message'}"

    async def _execute_for_event(self, cmd: str, event: str) -> float:
        """Run ``cmd`` and return the time of the ``event`` it makes QEMU send.

        QEMU sends the event before its reply; either order is taken. The reply
        and the event share one deadline, ``command_timeout``.
        """
        deadline = time.monotonic() + self.command_timeout
        with self._client().listener(event) as listener:
            await self.execute(cmd)
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    ev = await listener.get()
            except TimeoutError as exc:
                raise QmpError(
                    f"VM {self.name}: QEMU answered {cmd} but sent no {event} event"
                    f" within {self.command_timeout:g} s"
                ) from exc
        return event_time(ev)

    # -- the operations ------------------------------------------------------

    async def pause(self) -> float:
        """Stop the vCPUs; return QEMU's STOP event time (host wall clock, s).

        Raises:
            VmStateError: the VM is not running.
            QmpError: QEMU failed the stop, or did not answer or send STOP in time.
        """
        self._require(VmRunstate.RUNNING)
        at = await self._execute_for_event("stop", "STOP")
        self._set(VmRunstate.PAUSED)
        return at

    async def resume(self) -> float:
        """Start the vCPUs; return QEMU's RESUME event time (host wall clock, s).

        Raises:
            VmStateError: the VM is not paused (or saved).
            QmpError: QEMU failed the cont, or did not answer or send RESUME in time.
        """
        self._require(VmRunstate.PAUSED, VmRunstate.SAVED)
        at = await self._execute_for_event("cont", "RESUME")
        self._set(VmRunstate.RUNNING)
        return at

    async def announce(self) -> None:
        """Announce the running VM's NICs to the network (QMP ``announce-self``).

        QEMU sends a RARP from each NIC's MAC, so switches learn where it is;
        a virtio-net guest driver is asked to announce itself too, and sends
        gratuitous ARPs for every address it has (virtual addresses included),
        so machines outside the group update their ARP caches. The first round
        goes out at once, then as :data:`ANNOUNCE_ROUNDS` says.

        Raises:
            VmStateError: the VM is not running.
            QmpError: QEMU refused (a QEMU before 4.0 has no announce-self) or did not answer.
        """
        self._require(VmRunstate.RUNNING)
        await self.execute("announce-self", dict(ANNOUNCE_ROUNDS))

    async def guest_agent_open(self) -> bool:
        """Whether a guest agent in the VM has its port open (qemu-ga runs and listens).

        QEMU says so as the agent chardev's ``frontend-open``: the guest opened
        its end of the virtio-serial port. A restored VM has it as the guest
        had it when saved.

        Raises:
            QmpError: QEMU did not answer.
        """
        for chardev in await self.execute("query-chardev"):
            if chardev.get("label") == AGENT_CHARDEV:
                return bool(chardev.get("frontend-open"))
        return False

    async def snapshot_disks(self, new_layers: Mapping[int, Path]) -> None:
        """Make each ``new_layers[i]`` (created here by QEMU) the active layer of disk ``i``.

        The layers written so far become read-only backing: they are what a
        state keeps. Done while paused so the frozen layers match the saved
        memory, and in one transaction: every disk moves, or none does.

        Raises:
            VmStateError: the VM is not paused.
            QmpError: QEMU could not create or switch to a layer, or did not answer in time.
        """
        self._require(VmRunstate.PAUSED)
        if not new_layers:
            return
        actions = [
            {
                "type": "blockdev-snapshot-sync",
                "data": {"device": drive_id(i), "snapshot-file": str(path), "format": "qcow2"},
            }
            for i, path in sorted(new_layers.items())
        ]
        await self.execute("transaction", {"actions": actions})

    async def _migration_setup(self, *, ignore_shared: bool) -> None:
        # A capability stays as last set for the life of the process (an earlier
        # save may have set it), and the stream's layout depends on it: set it
        # to what is asked, but never touch it on a QEMU that lacks it.
        if ignore_shared or await self._ignore_shared_state():
            await self.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": _IGNORE_SHARED, "state": ignore_shared}]},
            )
        await self.execute("migrate-set-parameters", {"max-bandwidth": _MAX_BANDWIDTH})

    async def _ignore_shared_state(self) -> bool | None:
        caps = await self.execute("query-migrate-capabilities")
        for cap in caps:
            if cap.get("capability") == _IGNORE_SHARED:
                return bool(cap.get("state"))
        return None

    async def can_ignore_shared(self) -> bool:
        """Whether this QEMU can leave shared RAM out of a migration (``x-ignore-shared``).

        Raises:
            QmpError: QEMU did not answer.
        """
        return await self._ignore_shared_state() is not None

    async def _wait_migration(
        self, what: str, progress: MigrationProgress | None, timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        interval = 0.002
        while True:
            try:
                info = await self.execute("query-migrate")
            except QmpError as exc:
                if self.alive():
                    raise
                # A QEMU whose incoming stream does not load exits at once.
                raise VmError(self._exited_during(what)) from exc
            status = info.get("status", "none")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise VmError(
                    f"VM {self.name}: {what} failed: {info.get('error-desc', status)}"
                    f"{'; ' + self._stderr_tail() if self._stderr_tail() else ''}"
                )
            if progress is not None and "ram" in info:
                ram = info["ram"]
                progress(int(ram.get("transferred", 0)), int(ram.get("total", 0)))
            if time.monotonic() > deadline:
                raise VmError(f"VM {self.name}: {what} did not finish in {timeout:g} s")
            if not self.alive():
                raise VmError(self._exited_during(what))
            await asyncio.sleep(interval)
            # A restore waits on this: poll often (a QMP round trip costs ~0.1 ms).
            interval = min(interval * 2, _MIGRATION_POLL)

    def _send_fd(self, fd: int, name: str) -> None:
        qmp = self._client()
        try:
            qmp.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise QmpError(f"VM {self.name}: could not pass a file to QEMU: {exc}") from exc

    async def save_memory(
        self,
        path: Path,
        *,
        ignore_shared: bool = False,
        progress: MigrationProgress | None = None,
        timeout: float = 600.0,
    ) -> int:
        """Write the paused VM's memory and device state to ``path``; it stays paused.

        Uses migration to a file descriptor we open (no shell, no exec: URI),
        with the bandwidth cap lifted. ``ignore_shared`` leaves RAM kept in a
        shared file out (the fast path: only device state is written). Returns
        the number of bytes written.

        Raises:
            VmStateError: the VM is not paused.
            VmError: the file cannot be written or the migration failed.
        """
        self._require(VmRunstate.PAUSED)
        await self._migration_setup(ignore_shared=ignore_shared)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise VmError(f"VM {self.name}: cannot write memory to {path}: {exc.strerror}") from exc
        try:
            self._send_fd(fd, "memfile")
            await self.execute("getfd", {"fdname": "memfile"})
            await self.execute("migrate", {"uri": "fd:memfile"})
            await self._wait_migration("saving memory", progress, timeout)
            try:  # gigabytes to flush: on a worker thread, the event loop serves on
                await asyncio.to_thread(os.fsync, fd)
            except OSError as exc:
                raise VmError(
                    f"VM {self.name}: memory file {path} could not be flushed: {exc.strerror}"
                ) from exc
        finally:
            os.close(fd)
        self._set(VmRunstate.SAVED)
        return path.stat().st_size

    async def load_memory(
        self, path: Path, *, ignore_shared: bool = False, timeout: float = 600.0
    ) -> None:
        """Load memory saved by :meth:`save_memory` into this incoming VM; it stays paused.

        ``ignore_shared`` must be what the save used (the stream's layout
        depends on it); the RAM it left out is the file the VM was started on.

        Raises:
            VmStateError: the VM was not started with ``incoming=True``.
            VmError: the file cannot be read or QEMU rejected its content.
        """
        self._require(VmRunstate.INCOMING)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise VmError(
                f"VM {self.name}: cannot read memory from {path}: {exc.strerror}"
            ) from exc
        # QEMU reads the stream 32 KiB at a time: a thread reads it ahead in
        # big pieces, so the disk streams at its own speed and QEMU copies
        # from the page cache (the whole of it for a standard stream).
        stop = threading.Event()
        ahead = None
        if os.fstat(fd).st_size >= _READ_AHEAD_FROM:
            ahead = asyncio.create_task(asyncio.to_thread(_read_ahead, fd, stop))
        try:
            self._send_fd(fd, "memfile")
            await self.execute("getfd", {"fdname": "memfile"})
            await self._migration_setup(ignore_shared=ignore_shared)
            # QEMU announces a VM whose memory it loaded (RARP from its NICs),
            # even one that stays paused: from a restore's VM prepared beside
            # the running one, that teaches the bridge the running VM's MAC on
            # the new, frozen tap. The VM is announced after its resume instead.
            await self.execute("migrate-set-parameters", {"announce-rounds": 0})
            await self.execute("migrate-incoming", {"uri": "fd:memfile"})
            await self._wait_migration(f"loading memory from {path}", None, timeout)
        finally:
            stop.set()
            if ahead is not None:
                await asyncio.gather(ahead, return_exceptions=True)
            with contextlib.suppress(OSError):  # loaded: its pages are of no more use
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        self._set(VmRunstate.PAUSED)
