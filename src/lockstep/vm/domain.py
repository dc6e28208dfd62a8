"""A libvirt domain through libvirt's Python API: pause and resume at an instant, save, restore.

lockstep drives a user's domain (virt-install, virt-manager, vagrant-libvirt...)
where libvirt runs it: :class:`Libvirt` is one connection to a host's libvirt
URI (``qemu:///system``, or ``qemu:///embed?root=DIR`` for libvirt's embedded
driver, which runs in this very process), and :class:`Domain` one domain of it.

The instants are QEMU's own: libvirt passes QEMU's STOP and RESUME events on
with QEMU's timestamps (``libvirt_qemu.qemuMonitorEventRegister``), and
:meth:`Domain.pause` / :meth:`Domain.resume` return those. The pause and
resume go through libvirt's own ``virDomainSuspend`` / ``virDomainResume``:
measured against a QMP ``stop`` passed through ``qemuMonitorCommand`` (which
also marks the domain tainted) they reach QEMU sooner and steadier (README,
"libvirt domains"). libvirt's calls block, so each domain makes its calls on
a thread of its own, made beforehand: at an instant every domain's call leaves
at once, and that thread is one of :meth:`Domain.control_threads` (run
real-time around the instant, as QEMU's are).

libvirt is imported when a domain is first used: the rest of lockstep works
without it (``pip install 'lockstep[libvirt]'``). Its events need an event
loop; the default implementation runs on a daemon thread of its own, once per
process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from lockstep.errors import LibvirtError
from lockstep.vm import domainxml
from lockstep.vm.machine import VmRunstate, qemu_threads

__all__ = ["Domain", "Libvirt", "libvirt_module", "qemu_pid"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# As for QMP (lockstep.vm.machine): a call that stops or starts the vCPUs is
# answered in milliseconds; 20 s is for a host in trouble, under the caller's 30 s.
_COMMAND_TIMEOUT = 20.0
_MISSING = (
    "libvirt VMs need libvirt's Python binding: pip install 'lockstep[libvirt]'"
    " (it builds against the libvirt-dev and pkg-config Debian packages)"
)

# libvirt's domain states (virDomainState), as lockstep sees them.
_STATES = {
    0: VmRunstate.GONE,  # no state
    1: VmRunstate.RUNNING,
    2: VmRunstate.RUNNING,  # blocked on a resource: its vCPUs run
    3: VmRunstate.PAUSED,
    4: VmRunstate.RUNNING,  # being shut down
    5: VmRunstate.GONE,  # shut off
    6: VmRunstate.GONE,  # crashed
    7: VmRunstate.PAUSED,  # suspended by the guest's power management
}


def libvirt_module() -> Any:
    """libvirt's Python binding.

    Raises:
        LibvirtError: it is not installed.
    """
    try:
        return importlib.import_module("libvirt")
    except ImportError as exc:
        raise LibvirtError(_MISSING) from exc


def _message(exc: BaseException) -> str:
    get = getattr(exc, "get_error_message", None)
    text = get() if callable(get) else None
    return str(text or exc).strip()


def qemu_pid(uuid: str) -> int | None:
    """The pid of the QEMU that runs the domain of ``uuid`` (libvirt passes ``-uuid``)."""
    want = uuid.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(args[:-1]):
            if arg == b"-uuid" and args[i + 1] == want:
                return int(proc.name)
    return None


class _Events:
    """libvirt's default event loop, on a daemon thread of its own, once per process."""

    _lock = threading.Lock()
    _thread: ClassVar[threading.Thread | None] = None
    tid: ClassVar[int | None] = None

    @classmethod
    def ensure(cls, lv: Any) -> None:
        """Register the default implementation and start its thread (before any connection)."""
        with cls._lock:
            if cls._thread is not None:
                return
            lv.virEventRegisterDefaultImpl()
            started = threading.Event()

            def run() -> None:
                cls.tid = threading.get_native_id()
                started.set()
                while True:
                    try:
                        lv.virEventRunDefaultImpl()
                    except Exception:  # one bad callback must not stop every event
                        log.exception("libvirt's event loop")

            cls._thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
            cls._thread.start()
            started.wait()


class Libvirt:
    """One connection to a libvirt URI, shared by the domains of this process that use it.

    It passes each domain's QEMU STOP and RESUME events to whoever waits for them.
    """

    _open: ClassVar[dict[str, Libvirt]] = {}
    _guard = threading.Lock()

    def __init__(self, uri: str, lv: Any, conn: Any) -> None:
        self.uri = uri
        self.lv = lv
        self.conn = conn
        self._waiting: dict[tuple[str, str], list[asyncio.Future[float]]] = {}
        self._lock = threading.Lock()
        qemu = importlib.import_module("libvirt_qemu")
        for event in ("STOP", "RESUME"):
            qemu.qemuMonitorEventRegister(conn, None, event, self._on_event, None, 0)

    @classmethod
    def connect(cls, uri: str) -> Libvirt:
        """The connection to ``uri`` (opened on first use, reopened if it broke).

        Raises:
            LibvirtError: the binding is missing or libvirt cannot be reached there.
        """
        with cls._guard:
            hub = cls._open.get(uri)
            if hub is not None and hub.alive():
                return hub
            lv = libvirt_module()
            _Events.ensure(lv)
            try:
                conn = lv.open(uri)
            except lv.libvirtError as exc:
                raise LibvirtError(f"cannot connect to libvirt at {uri}: {_message(exc)}") from exc
            hub = cls(uri, lv, conn)
            cls._open[uri] = hub
            return hub

    @classmethod
    def close_all(cls) -> None:
        """Close every connection of this process (the domains run on)."""
        with cls._guard:
            hubs, cls._open = list(cls._open.values()), {}
        for hub in hubs:
            with contextlib.suppress(Exception):
                hub.conn.close()

    def alive(self) -> bool:
        """Whether the connection still works."""
        try:
            return bool(self.conn.isAlive())
        except self.lv.libvirtError:
            return False

    def _on_event(
        self, _conn: Any, dom: Any, event: str, seconds: int, micros: int, _details: Any, _o: Any
    ) -> None:
        at = seconds + micros / 1e6
        with self._lock:
            waiting = self._waiting.pop((dom.UUIDString(), event), [])
        for fut in waiting:
            fut.get_loop().call_soon_threadsafe(_settle, fut, at)

    def expect(self, uuid: str, event: str) -> asyncio.Future[float]:
        """A future for the instant of ``uuid``'s next QEMU ``event`` (made before the call)."""
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting.setdefault((uuid, event), []).append(fut)
        return fut

    def forget(self, uuid: str, event: str, fut: asyncio.Future[float]) -> None:
        """Stop waiting with ``fut`` (the call failed, or the event came)."""
        with self._lock:
            waiting = self._waiting.get((uuid, event), [])
            if fut in waiting:
                waiting.remove(fut)

    def _fail(self, what: str, exc: BaseException) -> LibvirtError:
        return LibvirtError(f"libvirt at {self.uri} could not {what}: {_message(exc)}")

    async def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run the blocking libvirt call ``fn`` on a worker thread.

        Raises:
            LibvirtError: libvirt refused or failed it (``what`` says what it was).
        """

        def guarded() -> T:
            try:
                return fn()
            except self.lv.libvirtError as exc:
                raise self._fail(what, exc) from exc

        return await asyncio.to_thread(guarded)

    async def domain(self, name: str, vm: str) -> Domain:
        """Domain ``name`` of this libvirt, as VM ``vm`` of the group.

        Raises:
            LibvirtError: there is no such domain.
        """
        try:
            dom = await asyncio.to_thread(self.conn.lookupByName, name)
        except self.lv.libvirtError as exc:
            raise LibvirtError(
                f"VM {vm}: libvirt at {self.uri} has no domain {name!r} ({_message(exc)})"
            ) from exc
        return Domain(self, dom, vm)

    async def define(self, xml: str, vm: str) -> Domain:
        """Define (or redefine) a persistent domain from ``xml``.

        Raises:
            LibvirtError: libvirt refused the XML.
        """
        dom = await self.call(f"define the domain of VM {vm}", lambda: self.conn.defineXML(xml))
        return Domain(self, dom, vm)

    async def restore(self, path: Path, xml: str | None, name: str, vm: str) -> Domain:
        """Restore domain ``name`` from save image ``path`` (with XML ``xml``, if given), paused.

        libvirt restores a domain only as the domain it saved (its name and
        UUID), and only while no domain of that UUID runs.

        Raises:
            LibvirtError: libvirt could not restore it (the domain runs, the
                image or XML is refused, QEMU failed).
        """
        flags = self.lv.VIR_DOMAIN_SAVE_PAUSED
        await self.call(
            f"restore VM {vm} (domain {name}) from {path}",
            lambda: self.conn.restoreFlags(str(path), xml, flags),
        )
        return await self.domain(name, vm)

    async def image_xml(self, path: Path) -> str:
        """The domain XML inside save image ``path`` (passwords included: never log it).

        Raises:
            LibvirtError: ``path`` is not a save image libvirt can read.
        """
        flags = self.lv.VIR_DOMAIN_XML_SECURE
        return await self.call(
            f"read the save image {path}",
            lambda: str(self.conn.saveImageGetXMLDesc(str(path), flags)),
        )


def _settle(fut: asyncio.Future[float], at: float) -> None:
    if not fut.done():
        fut.set_result(at)


class Domain:
    """One libvirt domain as a VM of the group (see the module docstring).

    ``command_timeout``: seconds a suspend or resume has to be answered and
    its event to come.
    """

    def __init__(
        self, hub: Libvirt, dom: Any, vm: str, *, command_timeout: float = _COMMAND_TIMEOUT
    ) -> None:
        self.hub = hub
        self._dom = dom
        self._vm = vm
        self.domain = str(dom.name())
        self.uuid = str(dom.UUIDString())
        self.command_timeout = command_timeout
        self._pid: int | None = None
        self._tid = 0
        self._worker = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"libvirt-{vm}", initializer=self._note_tid
        )
        self._worker.submit(lambda: None).result()  # the thread exists before any instant

    def __repr__(self) -> str:
        return f"Domain({self._vm!r}, {self.domain!r}, {self.uuid})"

    def _note_tid(self) -> None:
        self._tid = threading.get_native_id()

    @property
    def name(self) -> str:
        """The VM's name in the group."""
        return self._vm

    @property
    def runstate(self) -> VmRunstate:
        """The domain's state as libvirt has it now."""
        try:
            state = int(self._dom.state()[0])
        except self.hub.lv.libvirtError:
            return VmRunstate.GONE
        return _STATES.get(state, VmRunstate.GONE)

    @property
    def pid(self) -> int | None:
        """The pid of the domain's QEMU (None while it is not running)."""
        if self._pid is not None and Path(f"/proc/{self._pid}").exists():
            return self._pid
        self._pid = qemu_pid(self.uuid) if self.alive() else None
        return self._pid

    def alive(self) -> bool:
        """Whether the domain runs (paused or not)."""
        try:
            return bool(self._dom.isActive())
        except self.hub.lv.libvirtError:
            return False

    def control_threads(self) -> list[int]:
        """QEMU's threads but the vCPUs, this domain's caller thread and libvirt's event thread."""
        pid = self.pid
        ours = [t for t in (self._tid, _Events.tid) if t]
        return ours + ([] if pid is None else qemu_threads(pid, vcpus=False))

    def vcpu_threads(self) -> list[int]:
        """QEMU's vCPU threads."""
        pid = self.pid
        return [] if pid is None else qemu_threads(pid, vcpus=True)

    def close(self) -> None:
        """Stop this object's caller thread (the domain runs on)."""
        self._worker.shutdown(wait=False)

    async def _act(self, what: str, call: Callable[[], object], event: str) -> float:
        """Make ``call`` on this domain's thread; the instant of the QEMU ``event`` it causes."""
        hub = self.hub
        fut = hub.expect(self.uuid, event)
        loop = asyncio.get_running_loop()

        def guarded() -> None:
            try:
                call()
            except hub.lv.libvirtError as exc:
                raise LibvirtError(
                    f"VM {self._vm}: libvirt could not {what} domain {self.domain}: {_message(exc)}"
                ) from exc

        try:
            async with asyncio.timeout(self.command_timeout):
                await loop.run_in_executor(self._worker, guarded)
                return await fut
        except TimeoutError as exc:
            raise LibvirtError(
                f"VM {self._vm}: libvirt did not {what} domain {self.domain} (or QEMU sent"
                f" no {event} event) within {self.command_timeout:g} s"
            ) from exc
        finally:
            hub.forget(self.uuid, event, fut)

    async def pause(self) -> float:
        """Suspend the domain; QEMU's STOP instant (host wall clock, s).

        Raises:
            LibvirtError: libvirt refused or did not answer, or no STOP came.
        """
        return await self._act("suspend", self._dom.suspend, "STOP")

    async def resume(self) -> float:
        """Resume the domain; QEMU's RESUME instant (host wall clock, s).

        Raises:
            LibvirtError: libvirt refused or did not answer, or no RESUME came.
        """
        return await self._act("resume", self._dom.resume, "RESUME")

    async def kill(self) -> None:
        """Kill the domain's QEMU (SIGKILL), as a crash would; libvirt sees it shut off."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(self.command_timeout):
            while self.alive():  # noqa: ASYNC110 (libvirt's state is polled; no event to await)
                await asyncio.sleep(0.02)
        self._pid = None

    async def announce(self) -> None:
        """Nothing: libvirt 9 has no call for QEMU's announce-self.

        Passing it through ``qemuMonitorCommand`` would mark the user's domain
        tainted. QEMU announces a domain libvirt restored by itself, as it
        loads it (libvirt does not turn that off), so after a restore the
        network hears of it anyway; after a save's resume the domain is where
        it was.
        """

    async def guest_agent_open(self) -> bool:
        """Whether the domain's guest agent channel is connected (libvirt's view of it).

        Raises:
            LibvirtError: libvirt could not describe the domain.
        """
        return domainxml.agent_connected(await self.xml(secure=False))

    async def guest_time(self) -> float:
        """The guest's wall clock (s), read through libvirt's guest agent (virDomainGetTime).

        Raises:
            LibvirtError: the agent did not answer.
        """
        got = await self._call("read the guest's clock of", lambda: self._dom.getTime())
        return float(got["seconds"]) + float(got["nseconds"]) / 1e9

    async def set_guest_time(self, at: float) -> None:
        """Set the guest's wall clock to ``at`` (s) through its agent (virDomainSetTime).

        Raises:
            LibvirtError: the agent refused or did not answer.
        """
        seconds = int(at)
        when = {"seconds": seconds, "nseconds": int((at - seconds) * 1e9)}
        await self._call("set the guest's clock of", lambda: self._dom.setTime(when))

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        return await self.hub.call(f"{what} VM {self._vm} (domain {self.domain})", fn)

    async def xml(self, *, inactive: bool = False, secure: bool = True) -> str:
        """The domain's XML, live or as defined; ``secure``: passwords included (never log it).

        Raises:
            LibvirtError: libvirt could not say.
        """
        lv = self.hub.lv
        flags = (lv.VIR_DOMAIN_XML_SECURE if secure else 0) | (
            lv.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        )
        return await self._call("describe", lambda: str(self._dom.XMLDesc(flags)))

    async def persistent(self) -> bool:
        """Whether the domain is defined (not only running).

        Raises:
            LibvirtError: libvirt could not say.
        """
        return await self._call("look at", lambda: bool(self._dom.isPersistent()))

    async def snapshot(self, xml: str) -> None:
        """Take the external snapshot ``xml`` describes; libvirt keeps no record of it.

        Of a paused domain it stays paused: its memory goes to the snapshot's
        file and each disk it names moves onto a new overlay, all in one
        transaction (``ATOMIC``: every disk moves, or none does).

        Raises:
            LibvirtError: libvirt could not take it.
        """
        lv = self.hub.lv
        flags = lv.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA | lv.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        await self._call("snapshot", lambda: self._dom.snapshotCreateXML(xml, flags))

    async def save(self, path: Path) -> None:
        """Save the domain's memory to ``path`` (to restore paused); the domain stops.

        Its disks stay as they are: nothing writes them until it is restored.

        Raises:
            LibvirtError: libvirt could not save it (the domain still runs then).
        """
        flags = self.hub.lv.VIR_DOMAIN_SAVE_PAUSED
        await self._call(f"save to {path}", lambda: self._dom.saveFlags(str(path), None, flags))
        self._pid = None

    async def destroy(self) -> None:
        """Stop the domain at once (its definition stays); nothing if it does not run.

        Raises:
            LibvirtError: libvirt could not stop it.
        """
        if self.alive():
            await self._call("destroy", self._dom.destroy)
        self._pid = None

    async def start(self) -> None:
        """Start the defined domain.

        Raises:
            LibvirtError: libvirt could not start it.
        """
        await self._call("start", self._dom.create)
