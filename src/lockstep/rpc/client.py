"""The caller's side of the Execd service: one :class:`HostClient` per execd.

Every call is declared once, in :data:`lockstep.rpc.calls.CALLS`: a method names
its call's entry, which gives the timeout class and the reply type. The client
mirrors :class:`lockstep.execd.api.ExecdApi` and returns the same model
dataclasses, so the caller never sees protobuf or gRPC.

gRPC errors are mapped here, at the boundary, keeping the original as the cause:

- UNAVAILABLE (refused, down, TLS handshake failed) and a deadline that passed
  before any connection was made -> :class:`~lockstep.errors.HostUnreachable`;
- DEADLINE_EXCEEDED on a connected channel -> :class:`~lockstep.errors.HostTimeout`;
- any other status -> :class:`~lockstep.errors.RemoteError` carrying ``host``,
  ``kind`` (the execd's error class, from the ``lockstep-error`` metadata) and
  ``code`` (the status code's name, e.g. ``"NOT_FOUND"``).

``asyncio.CancelledError`` is never caught: a cancelled call cancels its RPC.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from lockstep.aio import AsyncClosing
from lockstep.errors import HostTimeout, HostUnreachable, RemoteError, RpcError
from lockstep.execd.model import (
    FaultAction,
    FaultReply,
    GuestTime,
    ProbeReply,
    SaveProgress,
    StateInfo,
    VmReport,
    VmStatus,
)
from lockstep.group import VmSpec
from lockstep.rpc import convert
from lockstep.rpc.calls import (
    ABORT,
    CALLS,
    COMMIT,
    DOWN,
    DRAIN,
    EXTEND,
    INJECT_FAULT,
    PAUSE,
    PREPARE_RESTORE,
    PROBE,
    PROBE_KEY,
    RESUME,
    SAVE_MEMORY,
    STATE_DELETE,
    STATE_FRAMES,
    STATE_SHOW,
    STATES,
    STATUS,
    STOP,
    SWITCH,
    UP,
    VERIFY_STATE,
    Call,
    Timeout,
)
from lockstep.rpc.convert import ERROR_KIND_KEY
from lockstep.rpc.generated import execd_pb2 as pb
from lockstep.rpc.generated import execd_pb2_grpc as pb_grpc
from lockstep.rpc.probe import ProbeCounts, ProbeKey, UdpProbePath
from lockstep.store import Verified

__all__ = ["HostClient"]

M = TypeVar("M", bound=Message)
Req = TypeVar("Req", bound=Message)
Rep = TypeVar("Rep", bound=Message)


# What gRPC's UNAVAILABLE details say when TLS (rather than the network) refused.
_TLS_MARKERS = ("andshake", "Socket closed", "certificate", "Hostname Verification")


class HostClient(AsyncClosing):
    """An mTLS gRPC client for one execd; every method may raise :class:`RpcError`.

    ``address`` is ``HOST:PORT`` as dialled. ``target_name`` overrides the name the
    server certificate must carry (default: the host part of ``address``, which
    :func:`lockstep.rpc.tls.issue` puts in the SAN when listed in ``hosts``).
    ``timeouts`` overrides the seconds of some timeout classes.

    The channel is created on first use, inside the running loop; :meth:`close`
    (or ``async with``) releases it.
    """

    def __init__(
        self,
        host: str,
        address: str,
        creds: grpc.ChannelCredentials,
        *,
        target_name: str | None = None,
        timeouts: Mapping[Timeout, float] | None = None,
    ) -> None:
        self.host = host
        self.address = address
        self._creds = creds
        self._options: list[tuple[str, Any]] = [
            # A restarted execd is found again within seconds, not minutes.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        if target_name is not None:
            self._options.append(("grpc.ssl_target_name_override", target_name))
        self._timeouts = {t: t.value for t in Timeout} | dict(timeouts or {})
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._closed = False

    def __repr__(self) -> str:
        return f"HostClient({self.host!r}, {self.address!r})"

    async def close(self) -> None:
        """Close the channel, cancelling calls still running; idempotent."""
        self._closed = True
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close(None)

    def _connect(self) -> Any:
        """The generated stub over a secure channel, made on first use."""
        if self._closed:
            raise RpcError(f"the client for host {self.host} is closed")
        if self._stub is None:
            self._channel = grpc.aio.secure_channel(self.address, self._creds, self._options)
            self._stub = pb_grpc.ExecdStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    def timeout(self, call: str) -> float:
        """Seconds ``call`` (a key of :data:`CALLS`) may take."""
        return self._timeouts[CALLS[call].timeout]

    def _error(self, call: str, exc: grpc.aio.AioRpcError) -> RpcError:
        """Translate a failed RPC into the error tree."""
        code = exc.code()
        details = exc.details() or code.name
        where = f"host {self.host} ({self.address})"
        if code is grpc.StatusCode.UNAVAILABLE:
            hint = ""
            if any(marker in details for marker in _TLS_MARKERS):
                hint = (
                    "; if its execd is running, check the certificates (both from the"
                    " group's CA, not expired, the server's naming this address)"
                )
            return HostUnreachable(f"{where} is unreachable: {details}{hint}")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            seconds = self.timeout(call)
            state = self._channel.get_state() if self._channel is not None else None
            if state is not grpc.ChannelConnectivity.READY:
                return HostUnreachable(
                    f"{where} is unreachable: no connection within {seconds:g} s"
                )
            return HostTimeout(f"{where} did not answer {call} within {seconds:g} s")
        kind = ""
        # grpc.aio returns a Metadata of (key, value) pairs; grpc-stubs says otherwise.
        metadata = cast("Iterable[tuple[str, str | bytes]]", exc.trailing_metadata() or ())
        for key, value in metadata:
            if key == ERROR_KIND_KEY:
                kind = value.decode() if isinstance(value, bytes) else value
        return RemoteError(f"{self.host}: {details}", host=self.host, kind=kind, code=code.name)

    async def _call(self, call: Call[Req, Rep], request: Req) -> Rep:
        """Make unary ``call`` within its timeout (its entry gives it and the reply type).

        The RPC fuzz tests call it too, with requests no method builds.
        """
        method = getattr(self._connect(), call.method)
        try:
            reply = await method(request, timeout=self.timeout(call.method))
        except grpc.aio.AioRpcError as exc:
            raise self._error(call.method, exc) from exc
        return cast(Rep, reply)

    async def _stream(self, call: Call[Req, Rep], request: Req) -> AsyncGenerator[Rep, None]:
        """Make streaming ``call`` and yield its replies; closing this cancels the call."""
        stream = getattr(self._connect(), call.method)(request, timeout=self.timeout(call.method))
        try:
            async for reply in stream:
                yield cast(Rep, reply)
        except grpc.aio.AioRpcError as exc:
            raise self._error(call.method, exc) from exc
        finally:
            stream.cancel()  # a no-op once the call has finished

    async def probe(self, sent: float) -> ProbeReply:
        """One clock probe; ``sent`` is the caller's send time (for the record).

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        reply = await self._call(PROBE, pb.ProbeRequest(sent=sent))
        return convert.probe_reply_from_pb(reply)

    async def probe_key(self) -> ProbeKey:
        """A fresh key for the execd's UDP probe path (``port`` 0: it has none).

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        reply = await self._call(PROBE_KEY, pb.Empty())
        counts = ProbeCounts(reply.answered, reply.forged, reply.replayed, reply.stale)
        return ProbeKey(reply.port, reply.key_id, reply.key, reply.valid_for, counts)

    async def probe_path(self) -> UdpProbePath | None:
        """The UDP probe path to this execd under a fresh key; None if it offers none.

        The path goes to the address the gRPC channel dials, on the port the
        execd names; the caller closes it after its sync.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError (the key call),
                or the address does not resolve.
        """
        key = await self.probe_key()
        if not key.port:
            return None
        name = self.address.rpartition(":")[0].strip("[]")
        try:
            infos = socket.getaddrinfo(name, key.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise HostUnreachable(f"host {self.host}: cannot resolve {name}: {exc}") from exc
        target = infos[0][4]
        return UdpProbePath(self.host, (str(target[0]), int(target[1])), key)

    async def up(self, group: str, vms: Sequence[VmSpec]) -> list[VmStatus]:
        """Start the host's VMs of ``group`` that are not running.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        request = pb.UpRequest(group=group, vm_specs_json=convert.specs_to_json(vms))
        return convert.vm_statuses_from_pb(await self._call(UP, request))

    async def down(self, vms: Sequence[str] = ()) -> list[VmStatus]:
        """Stop the named VMs (all of this host when empty).

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        request = pb.DownRequest(vms=list(vms))
        return convert.vm_statuses_from_pb(await self._call(DOWN, request))

    async def status(self) -> list[VmStatus]:
        """The host's VMs as they are now.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        return convert.vm_statuses_from_pb(await self._call(STATUS, pb.Empty()))

    async def pause(
        self, op: str, state: str, at: float, vms: Sequence[str], deadline: float
    ) -> list[VmReport]:
        """Open save ``op`` of ``state``; pause at ``at``; self-resume at ``deadline``.

        Times are on the execd's clock.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        request = pb.PauseRequest(op=op, state=state, at=at, vms=list(vms), deadline=deadline)
        return convert.vm_reports_from_pb(await self._call(PAUSE, request))

    async def save_memory(
        self,
        op: str,
        keep_running: bool,
        progress: Callable[[SaveProgress], None] | None = None,
    ) -> list[VmReport]:
        """Write the paused VMs' memory, calling ``progress`` for each step reported.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError (also when the
                stream ends without a result).
            Exception: whatever ``progress`` raises (the call is then cancelled).
        """
        request = pb.SaveMemoryRequest(op=op, keep_running=keep_running)
        async with contextlib.aclosing(self._stream(SAVE_MEMORY, request)) as stream:
            async for msg in stream:
                if msg.HasField("result"):
                    return convert.vm_reports_from_pb(msg.result)
                if progress is not None:
                    progress(convert.save_progress_from_pb(msg))
        raise RemoteError(f"{self.host}: SaveMemory ended without a result", host=self.host)

    async def drain(self, op: str, quiet: float, limit: float) -> list[VmReport]:
        """Capture until ``quiet`` seconds pass without a frame (at most ``limit``).

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        request = pb.DrainRequest(op=op, quiet=quiet, limit=limit)
        return convert.vm_reports_from_pb(await self._call(DRAIN, request))

    async def resume(
        self, op: str, at: float, guest_time: GuestTime | None = None
    ) -> list[VmReport]:
        """Resume ``op``'s VMs at ``at`` (execd clock) and deliver their frames.

        A restore then sets the wall clocks of the guests ``guest_time`` names.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        request = pb.ResumeRequest(op=op, at=at)
        convert.guest_time_to_pb(request, guest_time)
        return convert.vm_reports_from_pb(await self._call(RESUME, request))

    async def stop(self, op: str) -> list[VmReport]:
        """Destroy ``op``'s VMs (``save --stop``).

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        request = pb.OpRequest(op=op)
        return convert.vm_reports_from_pb(await self._call(STOP, request))

    async def commit(self, op: str) -> StateInfo | None:
        """Make ``op`` permanent; a save returns the state now visible.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        reply = await self._call(COMMIT, pb.OpRequest(op=op))
        return convert.state_from_pb(reply.state) if reply.HasField("state") else None

    async def abort(self, op: str, resume_at: float | None) -> list[VmReport]:
        """Undo ``op``; resume its VMs at ``resume_at`` (execd clock) if given.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        request = pb.AbortRequest(op=op)
        if resume_at is not None:
            request.resume_at = resume_at
        return convert.vm_reports_from_pb(await self._call(ABORT, request))

    async def extend(self, op: str, deadline: float) -> None:
        """Push ``op``'s dead-man deadline back to ``deadline`` (execd clock).

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        await self._call(EXTEND, pb.ExtendRequest(op=op, deadline=deadline))

    async def prepare_restore(self, op: str, state: str, deadline: float) -> list[VmReport]:
        """Load ``state``'s VMs of this host, paused, for restore ``op``.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        request = pb.PrepareRestoreRequest(op=op, state=state, deadline=deadline)
        reply = await self._call(PREPARE_RESTORE, request)
        return convert.vm_reports_from_pb(reply)

    async def switch(self, op: str, at: float) -> list[VmReport]:
        """Pause restore ``op``'s old VMs at ``at`` (execd clock) and put the new ones in place.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        request = pb.ResumeRequest(op=op, at=at)
        return convert.vm_reports_from_pb(await self._call(SWITCH, request))

    async def states(self) -> list[StateInfo]:
        """The committed states on this host.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        return convert.states_from_pb(await self._call(STATES, pb.Empty()))

    async def state_show(self, name: str) -> dict[str, Any]:
        """State ``name``'s manifest.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError (also when the
                manifest is not a JSON object).
        """
        reply = await self._call(STATE_SHOW, pb.StateRequest(name=name))
        try:
            return convert.manifest_from_pb(reply)
        except ValueError as exc:
            raise RemoteError(f"{self.host}: {exc}", host=self.host) from exc

    async def verify_state(self, name: str, deep: bool) -> Verified:
        """Check every file of state ``name`` against its manifest (RAM hashes with ``deep``).

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError (kind
                ``StateDamaged`` naming the VM and file when the state is damaged).
        """
        reply = await self._call(VERIFY_STATE, pb.VerifyStateRequest(name=name, deep=deep))
        return Verified(reply.files, reply.hashed_bytes, reply.seconds)

    async def state_frames(self, name: str, vm: str) -> list[tuple[str, bytes]]:
        """The pcap files of the frames state ``name`` holds for ``vm``: (file name, content).

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        request = pb.StateFramesRequest(name=name, vm=vm)
        files: list[tuple[str, bytearray]] = []
        async with contextlib.aclosing(self._stream(STATE_FRAMES, request)) as stream:
            async for chunk in stream:
                if not files or files[-1][0] != chunk.file:
                    files.append((chunk.file, bytearray()))
                files[-1][1].extend(chunk.data)
        return [(file, bytes(data)) for file, data in files]

    async def state_delete(self, name: str) -> list[str]:
        """Delete state ``name``; returns the layers removed.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        reply = await self._call(STATE_DELETE, pb.StateRequest(name=name))
        return list(reply.removed_layers)

    async def inject_fault(self, group: str, fault_id: str, action: FaultAction) -> FaultReply:
        """Inject fault ``fault_id`` on this host's VMs of ``group``, heal, or list its faults.

        Raises:
            RpcError: HostUnreachable, HostTimeout or RemoteError.
        """
        request = convert.fault_request_to_pb(group, fault_id, action)
        return convert.fault_reply_from_pb(await self._call(INJECT_FAULT, request))
