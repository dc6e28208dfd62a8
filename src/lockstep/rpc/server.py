"""The execd's gRPC server: a thin adapter from the Execd service to an ``ExecdApi``.

The service (:class:`lockstep.execd.api.ExecdApi`) knows nothing of gRPC. Each
method of :class:`ExecdServicer` is named after its call in the table
(:data:`lockstep.rpc.calls.CALLS`) and takes the request alone; it is served
unary or streamed as its entry says. This module only

1. validates every request before the service sees it: a message that does not
   decode, a bad name, a time that is not finite or lies more than
   :data:`MAX_AHEAD` seconds ahead are all INVALID_ARGUMENT;
2. converts messages to and from the model dataclasses (:mod:`lockstep.rpc.convert`);
3. maps the service's errors to status codes (:data:`STATUS_FOR_ERROR`) with the
   error's class name in the ``lockstep-error`` trailing metadata, so the client
   can tell kinds apart. Unexpected exceptions become INTERNAL with a one-line
   message; their traceback goes to this process's log, never over the wire.

The server listens with mutual TLS only (:mod:`lockstep.rpc.tls`); there is no
plaintext port. Beside it, on the same address and port number over UDP, a
:class:`~lockstep.rpc.probe.ProbeResponder` answers clock probes keyed through
the ``ProbeKey`` call, which this adapter answers itself (:data:`SERVED_BY_ADAPTER`;
see :mod:`lockstep.rpc.probe`).
"""

# The servicer's method names are the proto's RPC names (Probe, SaveMemory, ...).
# ruff: noqa: N802

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar, overload

import grpc
from google.protobuf.message import Message
from pydantic import ValidationError

from lockstep.errors import (
    ConfigError,
    LockstepError,
    StateDamaged,
    StateExists,
    StateInUse,
    StateNotFound,
)
from lockstep.execd.api import ExecdApi
from lockstep.execd.fault import Fault
from lockstep.execd.model import (
    MAX_FREEZE_S,
    FaultAction,
    FaultVm,
    Freeze,
    Heal,
    Kill,
    ListFaults,
    Loss,
    Partition,
    SaveProgress,
    VmReport,
)
from lockstep.group import validate_mac, validate_name
from lockstep.rpc import convert
from lockstep.rpc.calls import CALLS, ServedBy
from lockstep.rpc.convert import ERROR_KIND_KEY
from lockstep.rpc.generated import execd_pb2 as pb
from lockstep.rpc.generated import execd_pb2_grpc as pb_grpc
from lockstep.rpc.probe import ProbeResponder

__all__ = [
    "MAX_AHEAD",
    "SERVED_BY_ADAPTER",
    "STATUS_FOR_ERROR",
    "ExecdServer",
    "ExecdServicer",
    "serve",
    "start_server",
]

log = logging.getLogger(__name__)

S = TypeVar("S")  # the servicer
Req = TypeVar("Req", bound=Message)
Rep = TypeVar("Rep", bound=Message)  # a reply, or a streamed message
Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:  # generic only in grpc-stubs
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor

# First match wins: subclasses before their bases.
STATUS_FOR_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (StateNotFound, grpc.StatusCode.NOT_FOUND),
    (StateDamaged, grpc.StatusCode.DATA_LOSS),
    (StateExists, grpc.StatusCode.ALREADY_EXISTS),
    (StateInUse, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # includes pydantic's ValidationError
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    (LockstepError, grpc.StatusCode.FAILED_PRECONDITION),
)
# Calls this adapter answers itself: transport, not the service's business.
SERVED_BY_ADAPTER: Final = frozenset(
    call.method for call in CALLS.values() if call.served_by is ServedBy.ADAPTER
)
_MAX_MESSAGE = 1000
# Actions are scheduled a few seconds ahead. An instant much later is a caller's
# bug, and waiting for it would tie up the call, and the operation it opened,
# until the caller gives up; no call may take longer than the slowest timeout
# class (600 s), so nothing further ahead can ever be met.
MAX_AHEAD = 600.0


@dataclass(frozen=True)
class _Failure:
    """What the client is told about an exception."""

    code: grpc.StatusCode
    message: str
    kind: str


def _one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, control characters escaped, cut if long."""
    if isinstance(exc, ValidationError):
        text = convert.validation_message(exc)
    else:
        text = next(iter(str(exc).strip().splitlines()), "") or type(exc).__name__
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _failure(call: str, exc: Exception) -> _Failure:
    """Classify ``exc`` raised while serving ``call``; log it as it deserves."""
    kind = type(exc).__name__
    for error_type, code in STATUS_FOR_ERROR:
        if isinstance(exc, error_type):
            message = _one_line(exc)
            log.info("%s refused: %s: %s", call, kind, message)
            return _Failure(code, message, kind)
    log.error("%s failed unexpectedly", call, exc_info=exc)
    return _Failure(
        grpc.StatusCode.INTERNAL,
        f"{call} failed with an internal error ({kind}: {_one_line(exc)});"
        " the execd's log has the details",
        kind,
    )


async def _abort(context: Context, failure: _Failure) -> NoReturn:
    await context.abort(
        failure.code, failure.message, trailing_metadata=((ERROR_KIND_KEY, failure.kind),)
    )


# Request validation: every field is checked before the service is called.


def _op(value: str) -> str:
    return validate_name("operation", value)


def _state(value: str) -> str:
    return validate_name("state", value)


def _vm(value: str) -> str:
    return validate_name("VM", value)


def _vms(values: Sequence[str]) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for value in values:
        name = _vm(value)
        if name in seen:
            raise ValueError(f"VM {name!r} is listed twice")
        seen.add(name)
        names.append(name)
    return names


def _instant(what: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite time, not {value}")
    return value


def _duration(what: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite, non-negative number of seconds, not {value}")
    return value


def _side(what: str, side: Sequence[FaultVm]) -> tuple[FaultVm, ...]:
    if not side:
        raise ValueError(f"side {what} of the partition names no VM")
    return tuple(FaultVm(_vm(v.name), tuple(validate_mac(m) for m in v.macs)) for v in side)


def _fault(fault_id: str, action: FaultAction) -> tuple[str, FaultAction]:
    """The fault's id (a name; "" with heal and list) and its action, every field checked."""
    if isinstance(action, Heal):
        if fault_id:
            raise ValueError("a heal names its faults in ids, not in id")
        return "", Heal(tuple(validate_name("fault", i) for i in action.ids))
    if isinstance(action, ListFaults):
        if fault_id:
            raise ValueError("a list of faults takes no id")
        return "", action
    fault_id = validate_name("fault", fault_id)
    if isinstance(action, Freeze):
        seconds = _duration("seconds", action.seconds)
        if not 0 < seconds <= MAX_FREEZE_S:
            raise ValueError(
                f"a freeze lasts more than 0 and at most {MAX_FREEZE_S:g} s, not {seconds}"
            )
        return fault_id, Freeze(_vm(action.vm), seconds)
    if isinstance(action, Loss):
        if not 1 <= action.percent <= 100:
            raise ValueError(f"a loss drops 1 to 100 % of the frames, not {action.percent} %")
        return fault_id, Loss(_vm(action.vm), action.percent)
    if isinstance(action, Partition):
        a, b = _side("a", action.a), _side("b", action.b)
        _vms([v.name for v in a + b])  # no VM twice, on one side or on both
        return fault_id, Partition(a, b)
    return fault_id, Kill(_vm(action.vm))


def _reap(task: asyncio.Task[Any]) -> None:
    """Retrieve the outcome of a task nobody awaits any more, so nothing is lost silently."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("abandoned service call failed", exc_info=task.exception())


class _DecodeInHandler(_Interceptor):
    """Decode each request inside its handler, so a corrupt one is refused as bad input.

    Left to gRPC, a request that is not a valid protobuf message ends the call
    with UNKNOWN and a traceback in the log; here it is INVALID_ARGUMENT in one line.
    """

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: Any = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler  # type: ignore[no-any-return]
        decode: Callable[[bytes], Any] = handler.request_deserializer
        call = handler_call_details.method.rsplit("/", 1)[-1]

        async def request(raw: bytes, context: Context) -> Any:
            try:
                return decode(raw)
            except Exception as exc:  # protobuf's DecodeError, or worse
                log.info("%s refused: the request is not a valid message: %s", call, exc)
                await _abort(
                    context,
                    _Failure(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"the {call} request is not a valid protobuf message",
                        type(exc).__name__,
                    ),
                )

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(raw: bytes, context: Context) -> Any:
                return await unary(await request(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def unary_stream(raw: bytes, context: Context) -> AsyncIterator[Any]:
                replies = stream(await request(raw, context), context)
                try:
                    async for reply in replies:
                        yield reply
                finally:
                    await replies.aclose()

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, response_serializer=handler.response_serializer
            )
        return handler  # type: ignore[no-any-return]


@overload
def _rpc(
    body: Callable[[S, Req], Coroutine[Any, Any, Rep]],
) -> Callable[[S, Req, Context], Coroutine[Any, Any, Rep]]: ...
@overload
def _rpc(
    body: Callable[[S, Req], AsyncIterator[Rep]],
) -> Callable[[S, Req, Context], AsyncIterator[Rep]]: ...
def _rpc(body: Callable[..., Any]) -> Callable[..., Any]:
    """Serve ``body`` as the call it is named after, unary or streamed as :data:`CALLS` says.

    On error the RPC is aborted with the mapped status; a streamed body is closed
    however the call ends (a client gone away included).

    Raises:
        TypeError: at import, when the call is not in the table or its body is a
            generator where the table says unary (or the other way round).
    """
    call = CALLS.get(body.__name__)
    if call is None:
        raise TypeError(f"{body.__name__} is not in the call table (lockstep.rpc.calls)")
    if inspect.isasyncgenfunction(body) != call.stream:
        shape = "streams" if call.stream else "is unary"
        raise TypeError(f"{call.method} {shape} in the call table; its body must match")

    if call.stream:

        @functools.wraps(body)
        async def streamed(self: Any, request: Message, context: Context) -> AsyncIterator[Any]:
            failure: _Failure | None = None
            try:
                async with contextlib.aclosing(body(self, request)) as replies:
                    async for reply in replies:
                        yield reply
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # CancelledError is a BaseException: it passes through
                failure = _failure(call.method, exc)
            if failure is not None:
                await _abort(context, failure)

        return streamed

    @functools.wraps(body)
    async def unary(self: Any, request: Message, context: Context) -> Any:
        try:
            return await body(self, request)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # CancelledError is a BaseException: it passes through
            failure = _failure(call.method, exc)
        await _abort(context, failure)

    return unary


class ExecdServicer(pb_grpc.ExecdServicer):
    """Serves one :class:`~lockstep.execd.api.ExecdApi` over gRPC."""

    def __init__(self, api: ExecdApi, probes: ProbeResponder | None = None) -> None:
        self._api = api
        self._probes = probes

    def _soon(self, what: str, value: float) -> float:
        """``value`` if it is a finite instant at most :data:`MAX_AHEAD` s from now."""
        _instant(what, value)
        ahead = value - self._api.from_wall(time.time())
        if ahead > MAX_AHEAD:
            raise ValueError(
                f"{what} {value} is {ahead:.0f} s ahead of this execd's clock;"
                f" an action is scheduled at most {MAX_AHEAD:.0f} s ahead"
            )
        return value

    @_rpc
    async def Probe(self, request: pb.ProbeRequest) -> pb.ProbeReply:
        """Stamp a clock probe (``request.sent`` is the caller's and not needed here)."""
        return convert.probe_reply_to_pb(self._api.probe())

    @_rpc
    async def ProbeKey(self, request: pb.Empty) -> pb.ProbeKeyReply:
        """A fresh key for the UDP probe path (port 0: there is none here)."""
        if self._probes is None or not self._probes.port:
            return pb.ProbeKeyReply(port=0)
        key = self._probes.issue_key()
        counts = key.counts
        assert counts is not None
        return pb.ProbeKeyReply(
            port=key.port,
            key_id=key.key_id,
            key=key.key,
            valid_for=key.valid_for,
            answered=counts.answered,
            forged=counts.forged,
            replayed=counts.replayed,
            stale=counts.stale,
        )

    @_rpc
    async def Up(self, request: pb.UpRequest) -> pb.VmStatusList:
        """Start the given VMs."""
        group = validate_name("group", request.group)
        specs = convert.specs_from_json(request.vm_specs_json)
        return convert.vm_statuses_to_pb(await self._api.up(group, specs))

    @_rpc
    async def Down(self, request: pb.DownRequest) -> pb.VmStatusList:
        """Stop the given VMs (all when none is named)."""
        vms = _vms(request.vms)
        return convert.vm_statuses_to_pb(await self._api.down(vms))

    @_rpc
    async def Status(self, request: pb.Empty) -> pb.VmStatusList:
        """The VMs of this host."""
        return convert.vm_statuses_to_pb(await self._api.status())

    @_rpc
    async def Pause(self, request: pb.PauseRequest) -> pb.VmReportList:
        """Open a save operation and pause at ``at``."""
        op, state, vms = _op(request.op), _state(request.state), _vms(request.vms)
        at = _instant("at", request.at)
        deadline = _instant("deadline", request.deadline)
        if deadline <= at:
            raise ValueError(f"deadline {deadline} is not after the pause time {at}")
        self._soon("at", at)
        return convert.vm_reports_to_pb(await self._api.pause(op, state, at, vms, deadline))

    @_rpc
    async def SaveMemory(self, request: pb.SaveMemoryRequest) -> AsyncIterator[pb.SaveProgress]:
        """Save memory, streaming progress; the last message carries the result.

        The service's progress callback must be called from the event loop's
        thread (it feeds an asyncio.Queue). If the client goes away, the service
        call is cancelled.
        """
        op = _op(request.op)
        queue: asyncio.Queue[SaveProgress | None] = asyncio.Queue()
        task: asyncio.Task[list[VmReport]] = asyncio.create_task(
            self._api.save_memory(op, request.keep_running, queue.put_nowait)
        )
        # The sentinel is queued after every progress the call reported.
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (progress := await queue.get()) is not None:
                yield convert.save_progress_to_pb(progress)
            reports = task.result()
        finally:
            if not task.done():  # the client went away (or we were cancelled)
                task.cancel()
                task.add_done_callback(_reap)
        yield pb.SaveProgress(result=convert.vm_reports_to_pb(reports))

    @_rpc
    async def Drain(self, request: pb.DrainRequest) -> pb.VmReportList:
        """Capture until quiet, then store the held frames."""
        op = _op(request.op)
        quiet = _duration("quiet", request.quiet)
        limit = _duration("limit", request.limit)
        return convert.vm_reports_to_pb(await self._api.drain(op, quiet, limit))

    @_rpc
    async def Resume(self, request: pb.ResumeRequest) -> pb.VmReportList:
        """Resume the operation's VMs at ``at`` (a restore: then set the guests' clocks)."""
        op, at = _op(request.op), self._soon("at", request.at)
        guest_time = convert.guest_time_from_pb(request)
        if guest_time is not None:
            _vms(guest_time.vms)
            _instant("true_at", guest_time.true_at)
        return convert.vm_reports_to_pb(await self._api.resume(op, at, guest_time))

    @_rpc
    async def Stop(self, request: pb.OpRequest) -> pb.VmReportList:
        """Destroy the operation's VMs."""
        return convert.vm_reports_to_pb(await self._api.stop(_op(request.op)))

    @_rpc
    async def Commit(self, request: pb.OpRequest) -> pb.CommitReply:
        """Make the operation's result permanent."""
        state = await self._api.commit(_op(request.op))
        if state is None:
            return pb.CommitReply()
        return pb.CommitReply(state=convert.state_to_pb(state))

    @_rpc
    async def Abort(self, request: pb.AbortRequest) -> pb.VmReportList:
        """Undo the operation."""
        op = _op(request.op)
        resume_at = (
            self._soon("resume_at", request.resume_at) if request.HasField("resume_at") else None
        )
        return convert.vm_reports_to_pb(await self._api.abort(op, resume_at))

    @_rpc
    async def Extend(self, request: pb.ExtendRequest) -> pb.Empty:
        """Push back the dead-man deadline."""
        self._api.extend(_op(request.op), _instant("deadline", request.deadline))
        return pb.Empty()

    @_rpc
    async def PrepareRestore(self, request: pb.PrepareRestoreRequest) -> pb.VmReportList:
        """Load the state's VMs, paused."""
        op, state = _op(request.op), _state(request.state)
        deadline = _instant("deadline", request.deadline)
        return convert.vm_reports_to_pb(await self._api.prepare_restore(op, state, deadline))

    @_rpc
    async def Switch(self, request: pb.ResumeRequest) -> pb.VmReportList:
        """Pause the restore's old VMs at ``at`` and put the new ones in place."""
        op, at = _op(request.op), self._soon("at", request.at)
        return convert.vm_reports_to_pb(await self._api.switch(op, at))

    @_rpc
    async def States(self, request: pb.Empty) -> pb.StateList:
        """The committed states here."""
        return convert.states_to_pb(self._api.states())

    @_rpc
    async def StateShow(self, request: pb.StateRequest) -> pb.StateDetail:
        """One state's manifest."""
        return convert.manifest_to_pb(self._api.state_show(_state(request.name)))

    @_rpc
    async def VerifyState(self, request: pb.VerifyStateRequest) -> pb.VerifyStateReply:
        """Check a state's files against its manifest."""
        checked = await self._api.verify_state(_state(request.name), request.deep)
        return pb.VerifyStateReply(
            files=checked.files, hashed_bytes=checked.hashed_bytes, seconds=checked.seconds
        )

    @_rpc
    async def StateDelete(self, request: pb.StateRequest) -> pb.StateDeleteReply:
        """Delete a state."""
        removed = await self._api.state_delete(_state(request.name))
        return pb.StateDeleteReply(removed_layers=removed)

    @_rpc
    async def StateFrames(self, request: pb.StateFramesRequest) -> AsyncIterator[pb.FileChunk]:
        """A state's held frames for one VM: its pcap files, chunk by chunk.

        Files are read on a worker thread: the event loop keeps serving (and
        meeting instants of) other calls meanwhile.
        """
        chunks = self._api.state_frames(_state(request.name), _vm(request.vm))
        while (item := await asyncio.to_thread(next, chunks, None)) is not None:
            yield pb.FileChunk(file=item[0], data=item[1])

    @_rpc
    async def InjectFault(self, request: pb.FaultRequest) -> pb.FaultReply:
        """Inject a fault on this host's VMs of the group, heal its faults, or list them."""
        group = validate_name("group", request.group)
        fault_id, action = _fault(request.id, convert.fault_action_from_pb(request))
        return convert.fault_reply_to_pb(await self._api.inject_fault(group, fault_id, action))


class ExecdServer:
    """The running gRPC server and the UDP probe responder beside it."""

    def __init__(self, server: grpc.aio.Server, port: int, probes: ProbeResponder | None) -> None:
        self.server = server
        self.port = port
        self.probes = probes

    async def stop(self, grace: float | None) -> None:
        """Stop serving (calls in flight get ``grace`` seconds) and close the probe path."""
        try:
            await self.server.stop(grace)
        finally:
            if self.probes is not None:
                await asyncio.to_thread(self.probes.close)


def _host_part(listen: str) -> str:
    host = listen.rpartition(":")[0]
    return host.strip("[]") or "0.0.0.0"  # noqa: S104 (the execd's own listen address)


async def start_server(
    api: ExecdApi, listen: str, creds: grpc.ServerCredentials, *, udp_probes: bool = True
) -> tuple[ExecdServer, int]:
    """Serve ``api`` on ``listen`` (``HOST:PORT``; port 0 picks one) with mutual TLS.

    Returns the started server and the port it is bound to. The UDP probe path
    answers on the same host and port number unless ``udp_probes`` is False (or
    that UDP port is taken: the callers then fall back to gRPC probes). Must be
    called inside the running event loop that will serve.

    Raises:
        ConfigError: the address cannot be bound (bad address, or in use).
    """
    # SO_REUSEPORT (gRPC's default) would let two execds share a port silently.
    server = grpc.aio.server(interceptors=[_DecodeInHandler()], options=[("grpc.so_reuseport", 0)])
    why = "the address is invalid, not on this host, or in use (another lockstep-execd?)"
    try:
        port = server.add_secure_port(listen, creds)
    except RuntimeError as exc:  # gRPC's text adds nothing; it stays the cause
        raise ConfigError(f"cannot listen on {listen}: {why}") from exc
    if port == 0:
        raise ConfigError(f"cannot listen on {listen}: {why}")
    probes = None
    if udp_probes:
        address = (_host_part(listen), port)
        probes = ProbeResponder(address, api.from_wall, Fault.from_env().slow_probe)
        if not probes.start():
            probes = None
    servicer = ExecdServicer(api, probes)
    pb_grpc.add_ExecdServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    await server.start()
    log.info(
        "execd listening on %s (port %d, mutual TLS; clock probes %s)",
        listen, port, f"also on UDP {port}" if probes else "over gRPC only",
    )  # fmt: skip
    return ExecdServer(server, port, probes), port


async def serve(api: ExecdApi, listen: str, creds: grpc.ServerCredentials) -> ExecdServer:
    """Serve ``api`` on ``listen`` with mutual TLS; the caller awaits termination or stops it.

    Raises:
        ConfigError: the address cannot be bound (bad address, or in use).
    """
    server, _ = await start_server(api, listen, creds)
    return server
