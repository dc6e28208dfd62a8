"""The gRPC adapter end to end: the real server and client over real mutual TLS on 127.0.0.1.

A stub ExecdApi records every call, so each test can tell what reached the
service (and that refused requests never did).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

import grpc
import pytest

from lockstep.errors import (
    ConfigError,
    HostTimeout,
    HostUnreachable,
    RemoteError,
    RpcError,
    StateDamaged,
    StateExists,
    StateInUse,
    StateNotFound,
    VmError,
)
from lockstep.execd.api import ExecdApi
from lockstep.execd.model import (
    FaultAction,
    FaultReply,
    FaultVm,
    Freeze,
    GuestTime,
    Heal,
    HeldFault,
    Kill,
    ListFaults,
    Loss,
    Partition,
    ProbeReply,
    SaveProgress,
    StateInfo,
    VmReport,
    VmStatus,
)
from lockstep.group import VmSpec
from lockstep.rpc import (
    CALLS,
    CertFiles,
    HostClient,
    ServedBy,
    Timeout,
    channel_credentials,
    issue,
    server_credentials,
    start_server,
)
from lockstep.rpc.generated import execd_pb2 as pb
from lockstep.rpc.generated import execd_pb2_grpc as pb_grpc
from lockstep.rpc.server import SERVED_BY_ADAPTER, ExecdServicer
from lockstep.store import Verified
from tests.helpers.rpc import LOOPBACK, Pki, free_port, run, serving

# --- the stub service -------------------------------------------------------

STATUS = [VmStatus("p1", "running", pid=11, layer="l-1", state="s0"), VmStatus("s1", "paused")]
STATES = [StateInfo("s0", "h1", "2026-11-26T05:00:00Z", vms=["p1", "s1"])]
MANIFEST = {"name": "s1", "vms": {"p1": {"layer": "l-1"}}, "complete": True}
HELD = [
    HeldFault("freeze-1", "freeze", ["p1"], "p1 paused", seconds_left=2.5),
    HeldFault("loss-2", "loss", [], "30 % of the frames to and from s1 dropped at random"),
]
# Two NICs' pcap files, the first in three chunks (the middle one 3 MiB).
FRAME_CHUNKS = [
    ("p1.nic0.pcap", b"A" * 1000),
    ("p1.nic0.pcap", bytes(range(256)) * 12288),
    ("p1.nic0.pcap", b"tail"),
    ("p1.nic1.pcap", b"B" * 24),
]


@dataclass
class StubApi:
    """An ExecdApi that records calls and returns canned values (or raises ``fail[name]``)."""

    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    fail: dict[str, Exception] = field(default_factory=dict)
    delay: float = 0.0
    save_cancelled: bool = False
    save_gate: asyncio.Event | None = None

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail[name]

    def probe(self) -> ProbeReply:
        self._record("probe")
        return ProbeReply(received=1000.25, sent=1000.5)

    def from_wall(self, wall: float) -> float:
        return wall

    async def up(self, group: str, vms: Sequence[VmSpec]) -> list[VmStatus]:
        self._record("up", group, list(vms))
        return [VmStatus(vm.name, "running", pid=4242, layer="l-1") for vm in vms]

    async def down(self, vms: Sequence[str]) -> list[VmStatus]:
        self._record("down", list(vms))
        return [VmStatus(name, "shutdown") for name in vms]

    async def status(self) -> list[VmStatus]:
        self._record("status")
        return list(STATUS)

    async def pause(
        self, op: str, state: str, at: float, vms: Sequence[str], deadline: float
    ) -> list[VmReport]:
        self._record("pause", op, state, at, list(vms), deadline)
        return [VmReport(name, paused_at=at + 0.001) for name in vms]

    async def save_memory(
        self, op: str, keep_running: bool, progress: Callable[[SaveProgress], None] | None
    ) -> list[VmReport]:
        self._record("save_memory", op, keep_running)
        assert progress is not None
        for done in (0, 512, 1024):
            progress(SaveProgress("p1", done, 1024))
            await asyncio.sleep(0)
        if self.save_gate is not None:
            try:
                await self.save_gate.wait()
            except asyncio.CancelledError:
                self.save_cancelled = True
                raise
        if "save_memory_late" in self.fail:
            raise self.fail["save_memory_late"]
        return [VmReport("p1", paused_at=5.0, memory_bytes=1024)]

    async def drain(self, op: str, quiet: float, limit: float) -> list[VmReport]:
        self._record("drain", op, quiet, limit)
        await asyncio.sleep(self.delay)
        return [VmReport("p1", frames_held=7)]

    async def resume(
        self, op: str, at: float, guest_time: GuestTime | None = None
    ) -> list[VmReport]:
        self._record("resume", op, at, guest_time)
        if guest_time is not None:
            return [VmReport("p1", resumed_at=at, clock_correction_ms=0.0, clock_note="")]
        return [VmReport("p1", resumed_at=at, frames_delivered=7, clock_note="no guest agent")]

    async def stop(self, op: str) -> list[VmReport]:
        self._record("stop", op)
        return [VmReport("p1")]

    async def commit(self, op: str) -> StateInfo | None:
        self._record("commit", op)
        if op == "restore-1":
            return None
        return StateInfo("s1", "h1", "2026-11-26T06:00:00Z", parent="s0", vms=["p1"], size_bytes=9)

    async def abort(self, op: str, resume_at: float | None) -> list[VmReport]:
        self._record("abort", op, resume_at)
        return [VmReport("p1", resumed_at=resume_at)]

    def extend(self, op: str, deadline: float) -> None:
        self._record("extend", op, deadline)

    async def prepare_restore(self, op: str, state: str, deadline: float) -> list[VmReport]:
        self._record("prepare_restore", op, state, deadline)
        return [VmReport("p1", memory_bytes=1024)]

    async def switch(self, op: str, at: float) -> list[VmReport]:
        self._record("switch", op, at)
        return [VmReport("p1", paused_at=at)]

    def states(self) -> list[StateInfo]:
        self._record("states")
        return list(STATES)

    def state_show(self, name: str) -> dict[str, Any]:
        self._record("state_show", name)
        return dict(MANIFEST)

    async def verify_state(self, name: str, deep: bool) -> Verified:
        self._record("verify_state", name, deep)
        return Verified(files=4, hashed_bytes=4096 if deep else 1024, seconds=0.25)

    async def state_delete(self, name: str) -> list[str]:
        self._record("state_delete", name)
        return ["l-1", "l-2"]

    def state_frames(self, name: str, vm: str) -> Iterator[tuple[str, bytes]]:
        self._record("state_frames", name, vm)
        return iter(FRAME_CHUNKS)

    async def inject_fault(self, group: str, fault_id: str, action: FaultAction) -> FaultReply:
        self._record("inject_fault", group, fault_id, action)
        return FaultReply(did=[f"{type(action).__name__} {fault_id}"], held=list(HELD))


def _is_execd_api(api: ExecdApi) -> ExecdApi:
    """Typed identity: mypy checks StubApi against the ExecdApi Protocol here."""
    return api


_is_execd_api(StubApi())


# --- a running server ------------------------------------------------------------


@contextlib.asynccontextmanager
async def connected(
    api: StubApi,
    pki: Pki,
    *,
    creds: grpc.ChannelCredentials | None = None,
    server_cert: CertFiles | None = None,
    server_creds: grpc.ServerCredentials | None = None,
    **client_args: Any,
) -> AsyncIterator[HostClient]:
    """A HostClient talking to a served ``api``."""
    async with serving(api, pki, server_cert, creds=server_creds) as address:
        client = HostClient("h1", address, creds or pki.client_creds(), **client_args)
        try:
            yield client
        finally:
            await client.close()


def _spec(name: str) -> VmSpec:
    return VmSpec(name=name, host="h1", kernel=Path("/boot/vmlinuz"), memory=256 << 20)


# --- round trips --------------------------------------------------------------


def test_every_unary_call_round_trips(pki: Pki) -> None:
    """Every unary RPC reaches the service with its arguments and returns the model values."""
    api = StubApi()

    async def body() -> None:
        async with connected(api, pki) as c:
            assert await c.probe(999.0) == ProbeReply(received=1000.25, sent=1000.5)
            specs = [_spec("p1"), _spec("s1")]
            assert await c.up("lab", specs) == [
                VmStatus("p1", "running", pid=4242, layer="l-1"),
                VmStatus("s1", "running", pid=4242, layer="l-1"),
            ]
            assert await c.down(["p1"]) == [VmStatus("p1", "shutdown")]
            assert await c.status() == STATUS
            assert await c.pause("op-1", "s1", 100.5, ["p1"], 130.0) == [
                VmReport("p1", paused_at=100.501)
            ]
            assert await c.drain("op-1", 0.2, 3.0) == [VmReport("p1", frames_held=7)]
            assert await c.resume("op-1", 200.0) == [
                VmReport("p1", resumed_at=200.0, frames_delivered=7, clock_note="no guest agent")
            ]
            # A correction of 0.0 stays 0.0 (not "unset"); the guest time arrives whole.
            assert await c.resume("op-5", 201.0, GuestTime(1.5e9, ("p1", "s1"))) == [
                VmReport("p1", resumed_at=201.0, clock_correction_ms=0.0)
            ]
            assert await c.stop("op-1") == [VmReport("p1")]
            assert await c.commit("op-1") == StateInfo(
                "s1", "h1", "2026-11-26T06:00:00Z", parent="s0", vms=["p1"], size_bytes=9
            )
            assert await c.commit("restore-1") is None
            assert await c.abort("op-2", None) == [VmReport("p1")]
            assert await c.abort("op-3", 0.0) == [VmReport("p1", resumed_at=0.0)]
            await c.extend("op-1", 160.0)
            assert await c.prepare_restore("op-4", "s1", 300.0) == [
                VmReport("p1", memory_bytes=1024)
            ]
            assert await c.states() == STATES
            assert await c.state_show("s1") == MANIFEST
            assert await c.verify_state("s1", True) == Verified(4, 4096, 0.25)
            assert await c.state_delete("s1") == ["l-1", "l-2"]

    run(body())
    names = [name for name, _ in api.calls]
    # The adapter reads the execd's clock (from_wall, not probe: a fault armed on
    # probes must not slow other calls) to refuse instants too far ahead.
    assert names == [
        "probe", "up", "down", "status", "pause", "drain", "resume", "resume", "stop",
        "commit", "commit", "abort", "abort", "extend", "prepare_restore", "states",
        "state_show", "verify_state", "state_delete",
    ]  # fmt: skip
    calls = dict(api.calls)
    assert calls["up"] == ("lab", [_spec("p1"), _spec("s1")])
    assert calls["pause"] == ("op-1", "s1", 100.5, ["p1"], 130.0)
    assert calls["drain"] == ("op-1", 0.2, 3.0)
    resumes = [call for call in api.calls if call[0] == "resume"]
    assert resumes == [
        ("resume", ("op-1", 200.0, None)),
        ("resume", ("op-5", 201.0, GuestTime(1.5e9, ("p1", "s1")))),
    ]
    aborts = [call for call in api.calls if call[0] == "abort"]
    assert aborts == [("abort", ("op-2", None)), ("abort", ("op-3", 0.0))]
    assert calls["extend"] == ("op-1", 160.0)
    assert calls["prepare_restore"] == ("op-4", "s1", 300.0)


def test_save_memory_streams_progress_then_result(pki: Pki) -> None:
    """SaveMemory delivers every progress step in order, then returns the final reports."""
    api = StubApi()
    seen: list[SaveProgress] = []

    async def body() -> list[VmReport]:
        async with connected(api, pki) as c:
            return await c.save_memory("op-1", True, seen.append)

    assert run(body()) == [VmReport("p1", paused_at=5.0, memory_bytes=1024)]
    assert seen == [SaveProgress("p1", d, 1024) for d in (0, 512, 1024)]
    assert api.calls == [("save_memory", ("op-1", True))]


def test_save_memory_failure_after_progress(pki: Pki) -> None:
    """A service error after some progress reaches the client as RemoteError with its kind."""
    api = StubApi(fail={"save_memory_late": VmError("QMP migrate of p1 failed")})
    seen: list[SaveProgress] = []

    async def body() -> None:
        async with connected(api, pki) as c:
            await c.save_memory("op-1", False, seen.append)

    with pytest.raises(RemoteError) as info:
        run(body())
    assert info.value.kind == "VmError"
    assert info.value.code == "FAILED_PRECONDITION"
    assert str(info.value) == "h1: QMP migrate of p1 failed"
    assert len(seen) == 3


def test_cancelled_save_memory_cancels_the_service_call(pki: Pki) -> None:
    """Cancelling the client's SaveMemory raises CancelledError and cancels the service's call."""
    api = StubApi()

    async def body() -> None:
        api.save_gate = asyncio.Event()  # never set: the save hangs after its progress
        got_progress = asyncio.Event()
        async with connected(api, pki) as c:
            task = asyncio.create_task(c.save_memory("op-1", True, lambda p: got_progress.set()))
            await got_progress.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(100):  # the server learns of the cancellation asynchronously
                if api.save_cancelled:
                    break
                await asyncio.sleep(0.02)

    run(body())
    assert api.save_cancelled


def test_state_frames_streams_each_file_whole_in_order(pki: Pki) -> None:
    """StateFrames brings back every NIC's file, in order, its chunks joined byte for byte."""
    api = StubApi()

    async def body() -> list[tuple[str, bytes]]:
        async with connected(api, pki) as c:
            return await c.state_frames("s1", "p1")

    files = run(body())
    assert [name for name, _ in files] == ["p1.nic0.pcap", "p1.nic1.pcap"]
    assert files[0][1] == b"".join(d for n, d in FRAME_CHUNKS if n == "p1.nic0.pcap")
    assert files[1][1] == b"B" * 24
    assert api.calls == [("state_frames", ("s1", "p1"))]


def test_state_frames_of_a_missing_state_is_not_found(pki: Pki) -> None:
    """A service error on the stream reaches the caller as NOT_FOUND with its sentence."""
    api = StubApi(fail={"state_frames": StateNotFound("state 's9' on host h1 has no VM 'p1'")})

    async def body() -> None:
        async with connected(api, pki) as c:
            await c.state_frames("s9", "p1")

    with pytest.raises(RemoteError, match="has no VM 'p1'") as info:
        run(body())
    assert (info.value.code, info.value.kind) == ("NOT_FOUND", "StateNotFound")


def test_inject_fault_carries_every_action_and_the_reply(pki: Pki) -> None:
    """Each fault action reaches the service as sent (MACs and sides in order); replies come back.

    A freeze's ``seconds_left`` stays optional: a held fault without one (a
    loss) comes back with None, not 0.
    """
    api = StubApi()
    side_a = (FaultVm("p1", ("52:54:00:00:00:01", "52:54:00:00:01:01")), FaultVm("p2", ()))
    side_b = (FaultVm("s1", ("52:54:00:00:00:03",)),)
    actions: list[tuple[str, FaultAction]] = [
        ("kill-1", Kill("p1")),
        ("freeze-1", Freeze("p1", 2.5)),
        ("partition-1", Partition(side_a, side_b)),
        ("loss-1", Loss("s1", 30)),
        ("", Heal(("loss-1", "freeze-1"))),
        ("", Heal()),
        ("", ListFaults()),
    ]

    async def body() -> list[FaultReply]:
        async with connected(api, pki) as c:
            return [await c.inject_fault("lab", fid, action) for fid, action in actions]

    replies = run(body())
    assert api.calls == [("inject_fault", ("lab", fid, action)) for fid, action in actions]
    assert [r.held for r in replies] == [HELD] * len(actions)
    assert replies[1].did == ["Freeze freeze-1"]


def test_proto_table_client_adapter_and_service_agree() -> None:
    """The proto, the call table, HostClient, ExecdServicer and ExecdApi declare the same calls.

    Every RPC of the proto has exactly one entry, whose request and reply types
    and streaming flag are the descriptor's; the servicer serves each with those
    types; HostClient has a method for each; ExecdApi has one for exactly the
    calls the service answers (the adapter answers the transport's, such as the
    UDP path's probe key, itself).
    """
    service = pb.DESCRIPTOR.services_by_name["Execd"]
    assert set(CALLS) == set(service.methods_by_name)
    for method, call in CALLS.items():
        proto = service.methods_by_name[method]
        assert call.method == method
        assert call.request.DESCRIPTOR is proto.input_type, method
        assert call.reply.DESCRIPTOR is proto.output_type, method
        assert call.stream == proto.server_streaming, method
        assert not proto.client_streaming, method
        assert callable(getattr(HostClient, call.python_name, None)), call.python_name
        served = getattr(ExecdServicer, method)
        assert served is not getattr(pb_grpc.ExecdServicer, method), method
        hints = get_type_hints(served)
        reply = get_args(hints["return"])[0] if call.stream else hints["return"]
        assert (hints["request"], reply) == (call.request, call.reply), method
    on_adapter = {c.method for c in CALLS.values() if c.served_by is ServedBy.ADAPTER}
    assert on_adapter == SERVED_BY_ADAPTER
    on_service = {c.python_name for c in CALLS.values() if c.method not in on_adapter}
    api = {name for name in vars(ExecdApi) if not name.startswith("_")}
    assert api == on_service | {"from_wall"}  # from_wall: the adapter reads the execd's clock


# --- error mapping --------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "code"),
    [
        ("pause", StateExists("state 's1' already exists on h1"), grpc.StatusCode.ALREADY_EXISTS),
        ("prepare_restore", StateNotFound("no state 's1' on h1"), grpc.StatusCode.NOT_FOUND),
        ("state_delete", StateInUse("s2 depends on s1"), grpc.StatusCode.FAILED_PRECONDITION),
        ("drain", ValueError("limit is shorter than quiet"), grpc.StatusCode.INVALID_ARGUMENT),
        ("stop", VmError("VM p1 is not paused"), grpc.StatusCode.FAILED_PRECONDITION),
        ("status", NotImplementedError("not yet"), grpc.StatusCode.UNIMPLEMENTED),
        ("verify_state", StateDamaged("s1.mem is missing"), grpc.StatusCode.DATA_LOSS),
    ],
)
def test_service_errors_map_to_codes_and_kinds(
    pki: Pki, call: str, error: Exception, code: grpc.StatusCode
) -> None:
    """A service error reaches the client as RemoteError with its message, class name and code."""
    api = StubApi(fail={call: error})
    invoke: dict[str, Callable[[HostClient], Awaitable[object]]] = {
        "pause": lambda c: c.pause("op-1", "s1", 1.0, ["p1"], 2.0),
        "prepare_restore": lambda c: c.prepare_restore("op-1", "s1", 2.0),
        "state_delete": lambda c: c.state_delete("s1"),
        "drain": lambda c: c.drain("op-1", 1.0, 0.5),
        "stop": lambda c: c.stop("op-1"),
        "status": lambda c: c.status(),
        "verify_state": lambda c: c.verify_state("s1", False),
    }

    async def body() -> None:
        async with connected(api, pki) as c:
            await invoke[call](c)

    with pytest.raises(RemoteError) as info:
        run(body())
    assert isinstance(info.value, RemoteError)
    assert str(info.value) == f"h1: {error}"
    assert info.value.host == "h1"
    assert info.value.kind == type(error).__name__
    assert info.value.code == code.name
    assert isinstance(info.value.__cause__, grpc.aio.AioRpcError)


def test_unexpected_error_is_internal_without_traceback(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception gives INTERNAL with one line; the traceback stays in the log."""
    api = StubApi(fail={"status": RuntimeError("boom\nFile secret.py, line 2")})

    async def body() -> None:
        async with connected(api, pki) as c:
            await c.status()

    with (
        caplog.at_level(logging.ERROR, logger="lockstep.rpc.server"),
        pytest.raises(RemoteError) as info,
    ):
        run(body())
    message = str(info.value)
    assert info.value.code == "INTERNAL"
    assert info.value.kind == "RuntimeError"
    assert "boom" in message
    assert "\n" not in message
    assert "Traceback" not in message
    assert "secret.py" not in message
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert logged
    assert "Status failed unexpectedly" in logged[0].getMessage()


def test_bad_spec_from_the_service_side_is_invalid_argument(pki: Pki) -> None:
    """A pydantic ValidationError raised by the service becomes INVALID_ARGUMENT in one line."""
    try:
        VmSpec.model_validate({"host": "h1"})
    except ValueError as exc:
        error = exc
    api = StubApi(fail={"up": error})

    async def body() -> None:
        async with connected(api, pki) as c:
            await c.up("lab", [_spec("p1")])

    with pytest.raises(RemoteError) as info:
        run(body())
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.kind == "ValidationError"
    assert "\n" not in str(info.value)


# --- input validation --------------------------------------------------------------


async def _raw_call(address: str, pki: Pki, method: str, request: Any) -> grpc.aio.AioRpcError:
    """Send a hand-made request (bypassing HostClient) and return the error it gets."""
    async with grpc.aio.secure_channel(address, pki.client_creds()) as channel:
        stub: Any = pb_grpc.ExecdStub(channel)  # type: ignore[no-untyped-call]
        call = getattr(stub, method)(request, timeout=5)
        try:
            if method in ("SaveMemory", "StateFrames"):  # server-streaming
                _ = [msg async for msg in call]
            else:
                await call
        except grpc.aio.AioRpcError as exc:
            return exc
    raise AssertionError(f"{method} was accepted")


NAN = math.nan


# (method, request, what the refusal says, the error kind named in the trailers)
BAD_INPUTS: list[tuple[str, Any, str, str]] = [
    ("Pause", pb.PauseRequest(op="op-1", state="../x", at=1, deadline=2), "state name '../x'", "InvalidName"),
    ("Pause", pb.PauseRequest(op="op-1", state="s1\n", at=1, deadline=2), "state name 's1\\n'", "InvalidName"),
    ("Pause", pb.PauseRequest(op="op-1", state="s1", at=NAN, deadline=2), "at must be a finite", "ValueError"),
    ("Pause", pb.PauseRequest(op="op 1", state="s1", at=1, deadline=2), "operation name", "InvalidName"),
    ("Pause", pb.PauseRequest(op="o", state="s", at=5, deadline=2), "deadline 2.0 is not after", "ValueError"),
    ("Pause", pb.PauseRequest(op="o", state="s", at=1, vms=["a", "a"], deadline=2), "twice", "ValueError"),
    ("Pause", pb.PauseRequest(op="o", state="s", at=1, vms=["a;reboot"], deadline=2), "VM name", "InvalidName"),
    ("Pause", pb.PauseRequest(op="o", state="s", at=1e12, deadline=2e12), "s ahead of this execd's clock", "ValueError"),
    ("Resume", pb.ResumeRequest(op="op-1", at=math.inf), "at must be a finite", "ValueError"),
    ("Resume", pb.ResumeRequest(op="op-1", at=1e12), "at most 600 s ahead", "ValueError"),
    ("Resume", pb.ResumeRequest(op="op-1", at=1, set_guest_time=["p1", "../x"]), "VM name '../x'", "InvalidName"),
    ("Resume", pb.ResumeRequest(op="op-1", at=1, set_guest_time=["p1"], true_at=NAN), "true_at must be a finite", "ValueError"),
    ("Switch", pb.ResumeRequest(op="op-1", at=math.inf), "at must be a finite", "ValueError"),
    ("Switch", pb.ResumeRequest(op="../op", at=1), "operation name", "InvalidName"),
    ("Drain", pb.DrainRequest(op="op-1", quiet=-1, limit=2), "quiet must be", "ValueError"),
    ("Drain", pb.DrainRequest(op="op-1", quiet=1, limit=NAN), "limit must be", "ValueError"),
    ("Abort", pb.AbortRequest(op="op-1", resume_at=NAN), "resume_at must be a finite", "ValueError"),
    ("Abort", pb.AbortRequest(op="op-1", resume_at=1e12), "resume_at 1000000000000.0 is", "ValueError"),
    ("Extend", pb.ExtendRequest(op="", deadline=1), "operation name ''", "InvalidName"),
    ("Extend", pb.ExtendRequest(op="op-1", deadline=-math.inf), "deadline must be a finite", "ValueError"),
    ("Stop", pb.OpRequest(op="$(reboot)"), "operation name '$(reboot)'", "InvalidName"),
    ("Commit", pb.OpRequest(op="op\x00"), "operation name 'op\\x00'", "InvalidName"),
    ("PrepareRestore", pb.PrepareRestoreRequest(op="o", state="a/b", deadline=1), "state name 'a/b'", "InvalidName"),
    ("PrepareRestore", pb.PrepareRestoreRequest(op="o", state="s", deadline=NAN), "deadline must", "ValueError"),
    ("StateShow", pb.StateRequest(name=".."), "state name '..'", "InvalidName"),
    ("VerifyState", pb.VerifyStateRequest(name="a/b"), "state name", "InvalidName"),
    ("StateDelete", pb.StateRequest(name="../../etc"), "state name", "InvalidName"),
    ("Down", pb.DownRequest(vms=["p1", "-x"]), "VM name '-x'", "InvalidName"),
    ("Up", pb.UpRequest(group="lab", vm_specs_json=["{bad json"]), "VM spec #1 is invalid", "ValueError"),
    ("Up", pb.UpRequest(group="lab", vm_specs_json=['{"host": 1}']), "VM spec #1 is invalid", "ValueError"),
    ("Up", pb.UpRequest(group="lab", vm_specs_json=['{"name": "p1", "host": "h1", "kernel": "/k", "nics": [{"network": "lan", "mac": "52:54:00:00:00:01", "bridge": "br0;x"}]}']), "is not a link name", "ValueError"),
    ("Up", pb.UpRequest(group="../g", vm_specs_json=[]), "group name", "InvalidName"),
    ("SaveMemory", pb.SaveMemoryRequest(op="../op"), "operation name", "InvalidName"),
    ("StateFrames", pb.StateFramesRequest(name="s/1", vm="p1"), "state name 's/1'", "InvalidName"),
    ("StateFrames", pb.StateFramesRequest(name="s1", vm="p1 p2"), "VM name 'p1 p2'", "InvalidName"),
    ("InjectFault", pb.FaultRequest(group="lab", id="kill-1"), "names no action", "ValueError"),
    ("InjectFault", pb.FaultRequest(group="../g", list=pb.Empty()), "group name '../g'", "InvalidName"),
    ("InjectFault", pb.FaultRequest(group="lab", id="a/b", kill=pb.KillFault(vm="p1")), "fault name 'a/b'", "InvalidName"),
    ("InjectFault", pb.FaultRequest(group="lab", kill=pb.KillFault(vm="p1")), "fault name ''", "InvalidName"),
    ("InjectFault", pb.FaultRequest(group="lab", id="k", kill=pb.KillFault(vm="p1;x")), "VM name 'p1;x'", "InvalidName"),
    ("InjectFault", pb.FaultRequest(group="lab", id="f", freeze=pb.FreezeFault(vm="p1", seconds=NAN)), "seconds must be a finite", "ValueError"),
    ("InjectFault", pb.FaultRequest(group="lab", id="f", freeze=pb.FreezeFault(vm="p1")), "lasts more than 0", "ValueError"),
    ("InjectFault", pb.FaultRequest(group="lab", id="f", freeze=pb.FreezeFault(vm="p1", seconds=1e6)), "at most 3600 s", "ValueError"),
    ("InjectFault", pb.FaultRequest(group="lab", id="l", loss=pb.LossFault(vm="p1")), "of the frames, not 0 %", "ValueError"),
    ("InjectFault", pb.FaultRequest(group="lab", id="l", loss=pb.LossFault(vm="p1", percent=101)), "not 101 %", "ValueError"),
    ("InjectFault", pb.FaultRequest(group="lab", id="p", partition=pb.PartitionFault(b=[pb.FaultVm(name="s1")])), "side a of the partition names no VM", "ValueError"),
    ("InjectFault", pb.FaultRequest(group="lab", id="p", partition=pb.PartitionFault(a=[pb.FaultVm(name="p1")], b=[pb.FaultVm(name="p1")])), "listed twice", "ValueError"),
    ("InjectFault", pb.FaultRequest(group="lab", id="p", partition=pb.PartitionFault(a=[pb.FaultVm(name="p1", macs=["52:54:00:00:00:1"])], b=[pb.FaultVm(name="s1")])), "is not a MAC address", "ValueError"),
    ("InjectFault", pb.FaultRequest(group="lab", id="p", partition=pb.PartitionFault(a=[pb.FaultVm(name="p1")], b=[pb.FaultVm(name="s1", macs=["01:00:5e:00:00:01"])])), "multicast MAC", "ValueError"),
    ("InjectFault", pb.FaultRequest(group="lab", id="heal-1", heal=pb.HealFaults()), "names its faults in ids", "ValueError"),
    ("InjectFault", pb.FaultRequest(group="lab", heal=pb.HealFaults(ids=["x\n"])), "fault name 'x\\n'", "InvalidName"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "request_", "fragment", "kind"), BAD_INPUTS)
def test_bad_inputs_are_refused_before_the_service(
    pki: Pki, method: str, request_: Any, fragment: str, kind: str
) -> None:
    """Bad names, non-finite or far-off times and malformed specs get INVALID_ARGUMENT.

    Nothing reaches the service but, for instants, a read of its clock.
    """
    api = StubApi()

    async def body() -> grpc.aio.AioRpcError:
        async with serving(api, pki) as address:
            return await _raw_call(address, pki, method, request_)

    error = run(body())
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (error.details() or "")
    assert "\n" not in (error.details() or "")
    metadata: Any = error.trailing_metadata()  # pairs at runtime, whatever grpc-stubs says
    assert ("lockstep-error", kind) in tuple(metadata)
    assert [name for name, _ in api.calls if name != "probe"] == []


def test_every_rpc_with_input_has_a_refusal_case() -> None:
    """Each RPC whose request carries fields has at least one bad-input case above.

    Probe's only field (the caller's send time) is never used by the execd.
    """
    service = pb.DESCRIPTOR.services_by_name["Execd"]
    with_input = {
        name
        for name, method in service.methods_by_name.items()
        if method.input_type.fields and name != "Probe"
    }
    assert with_input == {method for method, *_ in BAD_INPUTS}


def test_many_vm_names_are_checked_in_linear_time(pki: Pki) -> None:
    """A Pause naming 200 000 VMs, the last one twice, is refused quickly.

    Finding the duplicate used to be quadratic: one such request stalled the execd.
    """
    names = [f"vm{i}" for i in range(200_000)] + ["vm199999"]
    request = pb.PauseRequest(op="o", state="s", at=1, vms=names, deadline=2)
    api = StubApi()

    async def body() -> grpc.aio.AioRpcError:
        async with serving(api, pki) as address:
            return await _raw_call(address, pki, "Pause", request)

    start = time.monotonic()
    error = run(body())
    assert time.monotonic() - start < 5
    assert error.details() == "VM 'vm199999' is listed twice"


# --- unreachable hosts, timeouts ---------------------------------------------------


def test_host_down_is_unreachable_quickly(pki: Pki) -> None:
    """Calling a port nobody listens on raises HostUnreachable naming host and address, fast."""
    address = f"{LOOPBACK}:{free_port()}"

    async def body() -> None:
        async with HostClient("h1", address, pki.client_creds()) as c:
            await c.status()

    start = time.monotonic()
    with pytest.raises(HostUnreachable) as info:
        run(body())
    assert time.monotonic() - start < 3
    assert str(info.value).startswith(f"host h1 ({address}) is unreachable: ")
    assert isinstance(info.value.__cause__, grpc.aio.AioRpcError)


def test_silent_listener_is_unreachable_not_timeout(pki: Pki) -> None:
    """A port that accepts TCP but never answers TLS gives HostUnreachable after the timeout.

    The deadline passed before any connection was made, so the host was never
    reached: that is "unreachable", not "did not answer".
    """
    with socket.socket() as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen(8)
        address = f"{LOOPBACK}:{silent.getsockname()[1]}"

        async def body() -> None:
            creds = pki.client_creds()
            async with HostClient("h1", address, creds, timeouts={Timeout.FAST: 0.3}) as c:
                await c.status()

        start = time.monotonic()
        with pytest.raises(HostUnreachable) as info:
            run(body())
    assert time.monotonic() - start < 3
    assert str(info.value) == f"host h1 ({address}) is unreachable: no connection within 0.3 s"


def test_slow_call_times_out(pki: Pki) -> None:
    """A call slower than its timeout class raises HostTimeout naming the host and the call."""
    api = StubApi(delay=5.0)

    addresses: list[str] = []

    async def body() -> None:
        async with connected(api, pki, timeouts={Timeout.NORMAL: 0.3}) as c:
            assert c.timeout("Drain") == 0.3
            assert c.timeout("Probe") == Timeout.FAST.value
            addresses.append(c.address)
            await c.drain("op-1", 0.1, 1.0)

    start = time.monotonic()
    with pytest.raises(HostTimeout) as info:
        run(body())
    assert time.monotonic() - start < 3
    assert str(info.value) == f"host h1 ({addresses[0]}) did not answer Drain within 0.3 s"


def test_busy_port_is_a_clear_error(pki: Pki) -> None:
    """Serving on a port already served raises ConfigError naming the address (no SO_REUSEPORT)."""
    creds = server_credentials(pki.ca.cert, pki.server.cert, pki.server.key)

    async def body() -> None:
        server, port = await start_server(StubApi(), f"{LOOPBACK}:0", creds)
        try:
            await start_server(StubApi(), f"{LOOPBACK}:{port}", creds)
        finally:
            await server.stop(None)

    with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1:\d+: the address is"):
        run(body())


def test_closed_client_refuses_calls(pki: Pki) -> None:
    """A closed HostClient raises RpcError instead of reconnecting silently."""

    async def body() -> None:
        c = HostClient("h1", f"{LOOPBACK}:1", pki.client_creds())
        await c.close()
        await c.status()

    with pytest.raises(RpcError, match="the client for host h1 is closed"):
        run(body())


# --- TLS refusals ------------------------------------------------------------------


def _refused(pki: Pki, creds: grpc.ChannelCredentials, **kwargs: Any) -> tuple[str, StubApi]:
    """Try a Status call with ``creds``; return the HostUnreachable message and the stub."""
    api = StubApi()

    async def body() -> None:
        async with connected(api, pki, creds=creds, **kwargs) as c:
            await c.status()

    with pytest.raises(HostUnreachable) as info:
        run(body())
    message = str(info.value)
    assert message.startswith("host h1 (127.0.0.1:")
    assert "if its execd is running, check the certificates" in message
    return message, api


def test_plaintext_client_gets_nothing(pki: Pki) -> None:
    """A client without TLS is not served: its call fails UNAVAILABLE and the stub is not called."""
    api = StubApi()

    async def body() -> grpc.StatusCode:
        async with serving(api, pki) as address, grpc.aio.insecure_channel(address) as channel:
            stub: Any = pb_grpc.ExecdStub(channel)  # type: ignore[no-untyped-call]
            try:
                await stub.Status(pb.Empty(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        raise AssertionError("plaintext call was served")

    assert run(body()) is grpc.StatusCode.UNAVAILABLE
    assert api.calls == []


def test_client_cert_from_another_ca_is_refused(pki: Pki) -> None:
    """A caller whose certificate another CA signed cannot call the execd."""
    creds = channel_credentials(pki.ca.cert, pki.foreign_client.cert, pki.foreign_client.key)
    _, api = _refused(pki, creds)
    assert api.calls == []


def test_expired_client_cert_is_refused(pki: Pki) -> None:
    """A caller with an expired certificate (from the right CA) cannot call the execd."""
    _, api = _refused(pki, pki.raw_creds(pki.expired_client))
    assert api.calls == []


def test_client_without_cert_is_refused(pki: Pki) -> None:
    """A caller that presents no certificate at all cannot call the execd."""
    _, api = _refused(pki, pki.raw_creds(None))
    assert api.calls == []


def test_server_cert_from_another_ca_is_refused(pki: Pki) -> None:
    """The caller refuses an execd whose certificate is not from the group's CA."""
    _, api = _refused(pki, pki.client_creds(), server_cert=pki.foreign_server)
    assert api.calls == []


def test_expired_server_cert_is_refused(pki: Pki) -> None:
    """The caller refuses an execd whose certificate (from the right CA) has expired.

    lockstep's own loader would not even serve it; the server here is built
    around that check, so it is the caller's TLS that refuses.
    """
    server_creds = pki.raw_server_creds(pki.expired_server)
    _, api = _refused(pki, pki.client_creds(), server_creds=server_creds)
    assert api.calls == []


def test_server_cert_cannot_act_as_a_caller(pki: Pki) -> None:
    """An execd's certificate (serverAuth only) does not let its holder call another execd."""
    _, api = _refused(pki, pki.raw_creds(pki.server))
    assert api.calls == []


def test_caller_cert_cannot_act_as_an_execd(pki: Pki, tmp_path: Path) -> None:
    """A caller's certificate (clientAuth only) cannot serve: the caller refuses that execd."""
    impostor = issue(pki.ca, tmp_path, "h1", kind="client")
    server_creds = pki.raw_server_creds(impostor)
    _, api = _refused(pki, pki.client_creds(), server_creds=server_creds, target_name="h1")
    assert api.calls == []


def test_server_cert_must_name_the_dialled_address(pki: Pki) -> None:
    """A server cert without the dialled IP is refused, unless target_name names it ("h1")."""
    _, api = _refused(pki, pki.client_creds(), server_cert=pki.server_named_only)
    assert api.calls == []

    async def body() -> list[VmStatus]:
        async with connected(api, pki, server_cert=pki.server_named_only, target_name="h1") as c:
            return await c.status()

    assert run(body()) == STATUS


# --- generated code -----------------------------------------------------------------


def test_generated_code_is_in_sync() -> None:
    """The committed generated code equals what ``python -m lockstep.rpc.gen`` makes now."""
    result = subprocess.run(
        [sys.executable, "-m", "lockstep.rpc.gen", "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_gen_check_detects_stale_code(tmp_path: Path) -> None:
    """``--check`` against a folder with stale or missing files exits 1 and says how to fix it."""
    (tmp_path / "execd_pb2.py").write_text("# stale\n")
    result = subprocess.run(
        [sys.executable, "-m", "lockstep.rpc.gen", "--check", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "missing" in result.stderr
    assert "run: python -m lockstep.rpc.gen" in result.stderr
