"""Fuzzing the execd's RPCs: a real HostService behind the real gRPC server, real mutual TLS.

Every RPC is called with random and malformed fields (names with ``../``, ``/``,
NUL, shell metacharacters, 100 000 characters; NaN, infinite, negative and
far-off times; malformed VM spec JSON; unknown operations), one call at a time
and in sequences that walk the operation lifecycle, and finally as raw garbage
bytes. After every call:

- the client got a valid reply or a RemoteError whose code says "your request"
  (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS), in one
  printable line; never INTERNAL (an unexpected exception in the execd), never
  a timeout;
- a Probe still answers (the server did not crash or wedge);
- nothing outside the service's root changed (a snapshot of the files around it,
  with checksums: a base image, a victim file behind a symlink, the working
  directory), and nothing under the root has an unsafe name or resolves outside it.

The service runs with no VM: its QEMU binary does not exist, so any VM it is
asked to start fails to start. It runs in this host's network namespace (in a
private one, pyroute2 forks a helper from this gRPC process, and that child
sometimes dies in gRPC's poller), so NICs never name a link that exists here and
no tap can be made; its start-up cleanup only touches lockstep's own freeze
links, and the fixture checks there are none. Instants are never drawn from the
next 20 minutes: those are valid requests to wait (the service does), which
functional tests cover.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lockstep.errors import RemoteError
from lockstep.execd.model import (
    ExecdConfig,
    FaultVm,
    Freeze,
    Heal,
    Kill,
    ListFaults,
    Loss,
    Partition,
)
from lockstep.execd.service import HostService
from lockstep.group import VmSpec
from lockstep.net.links import OUR_LINK
from lockstep.rpc import (
    CALLS,
    ExecdServer,
    HostClient,
    Timeout,
    server_credentials,
    start_server,
)
from lockstep.rpc.calls import UP
from lockstep.rpc.generated import execd_pb2 as pb
from lockstep.rpc.server import MAX_AHEAD
from lockstep.store import Manifest, StateStore, VmRecord, utc_now
from tests.helpers.fuzz import FUZZ, names
from tests.helpers.rpc import LOOPBACK, Pki

T = TypeVar("T")

# What a refusal of a caller's request may look like; INTERNAL means the execd broke.
REFUSALS = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS"}
SAFE_PATH_PART = re.compile(r"[A-Za-z0-9_.-]+")
BASE = "@BASE@"  # in spec JSON: replaced by a real image outside the root
SEEDED = ("seed", "evil", "evil-link", "corrupt")
T0 = time.time()


# --- strategies ------------------------------------------------------------------


def _host_links() -> list[str]:
    return os.listdir("/sys/class/net")


def _absent_link(name: str) -> bool:
    """Whether no link of that name exists here (so a tap can never be enslaved to it)."""
    return "/" in name or name in ("", ".", "..") or name not in _host_links()


ops = names(["op-1", "op-2"])
states = names(["s1", *SEEDED])
vms = names(["p1", "s1"])
vm_lists = st.lists(vms, max_size=4)
instants = st.one_of(
    st.floats(max_value=T0 - 60),  # already passed (down to -inf)
    st.floats(min_value=T0 + 2 * MAX_AHEAD),  # too far ahead (up to +inf)
    st.sampled_from([math.nan, -0.0, 0.0, 5e-324, 1.7976931348623157e308]),
)
anything = st.floats()  # durations and deadlines: NaN, infinities, negatives included

paths = st.one_of(
    st.sampled_from(
        [BASE, "/nonexistent/k", "relative/disk.img", "../../etc/passwd", "/etc/passwd", ""]
    ),
    st.sampled_from(["a\x00b", "/" + "a" * 300, f"{BASE}/../x", "~/k"]),
    st.text(max_size=40),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``strategy``, sometimes any JSON value."""
    return st.one_of(strategy, strategy, strategy, json_values)


link_names = names(["br0", "lan", "nobridge"]).filter(_absent_link)
nics = st.fixed_dictionaries(
    {
        "network": maybe(link_names),
        "mac": maybe(st.sampled_from(["52:54:00:00:00:01"]) | st.text(max_size=20)),
    },
    optional={
        "bridge": maybe(link_names),
        "model": maybe(st.sampled_from(["e1000", "x"])),
    },
)
spec_dicts = st.fixed_dictionaries(
    {"name": maybe(vms), "host": maybe(names(["h1"]))},
    optional={
        "vcpus": maybe(st.integers()),
        "memory": maybe(st.integers() | st.sampled_from(["256M", "9" * 400, "-1"])),
        "accel": maybe(st.sampled_from(["tcg", "kvm", "xen"])),
        "disk": maybe(paths),
        "kernel": maybe(paths),
        "initrd": maybe(paths),
        "cmdline": maybe(st.text(max_size=40)),
        "nics": maybe(st.lists(nics, max_size=2)),
        "extra_args": maybe(st.lists(st.text(max_size=30), max_size=3)),
        "bogus": json_values,
    },
)
# Specs that pass validation, or nearly, so the service itself gets to work on them.
# Absolute paths, so the service itself gets to them: a real image outside the root,
# missing files, a file that is no image, a folder.
abs_paths = st.one_of(
    st.sampled_from([BASE, "/nonexistent/k", "/etc/passwd", "/etc", f"{BASE}/../base.img"]),
    st.sampled_from([BASE, "/nonexistent/k"]),
    paths,
)
plausible_specs = st.fixed_dictionaries(
    {"name": st.sampled_from(["p1", "s1"]), "host": st.just("h1"), "kernel": abs_paths},
    optional={
        "disk": abs_paths,
        "initrd": abs_paths,
        "cmdline": st.text(max_size=40),
        "memory": st.sampled_from(["256M", 1 << 20, "1T", 1 << 70]),
        "vcpus": st.integers(1, 64),
        "accel": st.sampled_from(["tcg", "kvm"]),
        "extra_args": st.lists(st.text(max_size=30), max_size=3),
        "nics": st.lists(
            st.fixed_dictionaries(
                {
                    "network": st.sampled_from(["lan", "n" * 20]),
                    "mac": st.sampled_from(["52:54:00:00:00:01", "52:54:00:00:00:02"]),
                    # no link of these names exists here (checked by the fixture)
                    "bridge": st.sampled_from(["br0", "nobridge", "b" * 16]),
                },
            ),
            max_size=2,
        ),
    },
)
spec_texts = st.one_of(
    plausible_specs.map(json.dumps),
    plausible_specs.map(json.dumps),
    spec_dicts.map(json.dumps),
    spec_dicts.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=100),
    st.sampled_from(["{", "[]", "null", '{"name": "p1"}', '{"name": "p1", "host": "h1"}']),
)

fault_vms = st.builds(
    FaultVm,
    vms,
    st.lists(
        st.sampled_from(["52:54:00:00:00:01", "01:00:5e:00:00:01"]) | st.text(max_size=20)
    ).map(tuple),
)
fault_sides = st.lists(fault_vms, max_size=3).map(tuple)
fault_actions = st.one_of(
    st.builds(Kill, vms),
    st.builds(Freeze, vms, anything),
    st.builds(Partition, fault_sides, fault_sides),
    st.builds(Loss, vms, st.integers(0, 2**32 - 1)),
    st.builds(Heal, st.lists(names(["kill-1", "partition-1"]), max_size=3).map(tuple)),
    st.just(ListFaults()),
)

# Arguments of each HostClient method (Up: the raw JSON it cannot send itself).
ARGS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "Probe": st.tuples(anything),
    "ProbeKey": st.tuples(),
    "Up": st.one_of(
        st.tuples(
            st.just("lab"), st.lists(plausible_specs.map(json.dumps), min_size=1, max_size=2)
        ),
        st.tuples(names(["lab"]), st.lists(spec_texts, max_size=3)),
    ),
    "Down": st.tuples(vm_lists),
    "Status": st.tuples(),
    "Pause": st.tuples(ops, states, instants, vm_lists, anything),
    "SaveMemory": st.tuples(ops, st.booleans()),
    "Drain": st.tuples(ops, anything, anything),
    "Resume": st.tuples(ops, instants),
    "Stop": st.tuples(ops),
    "Commit": st.tuples(ops),
    "Abort": st.tuples(ops, st.none() | instants),
    "Extend": st.tuples(ops, anything),
    "PrepareRestore": st.tuples(ops, states, anything),
    "Switch": st.tuples(ops, instants),
    "States": st.tuples(),
    "StateShow": st.tuples(states),
    "VerifyState": st.tuples(states, st.booleans()),
    "StateDelete": st.tuples(states),
    "StateFrames": st.tuples(states, vms),
    "InjectFault": st.tuples(names(["lab"]), names(["", "partition-1"]), fault_actions),
}


@dataclass(frozen=True)
class Call:
    """One RPC and its arguments, as passed to the HostClient method of that name."""

    method: str
    args: tuple[Any, ...]


calls = st.sampled_from(sorted(ARGS)).flatmap(lambda m: ARGS[m].map(lambda args: Call(m, args)))


# --- the execd under test ------------------------------------------------------------

Entry = tuple[Any, ...]


def _entry(path: Path, *, hash_files: bool) -> Entry:
    st_ = path.lstat()
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_dir():
        return ("dir",)
    if not hash_files:
        return ("file", st_.st_size, st_.st_mtime_ns)
    return ("file", st_.st_size, hashlib.sha256(path.read_bytes()).hexdigest())


def tree(top: Path, skip: set[Path], *, hash_files: bool) -> dict[str, Entry]:
    """Every entry under ``top`` (links not followed) but those under ``skip``."""
    found: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in [*dirnames, *filenames]:
            path = here / name
            found[str(path)] = _entry(path, hash_files=hash_files)
    return found


@dataclass
class Execd:
    """A served HostService, the client that fuzzes it and what must not change around it."""

    base: Path
    root: Path
    outside: Path
    sandbox: Path
    loop: asyncio.AbstractEventLoop
    client: HostClient
    channel: grpc.aio.Channel
    seeded_links: set[Path] = field(default_factory=set)
    around: dict[str, Entry] = field(default_factory=dict)

    @property
    def skip(self) -> set[Path]:
        """What may change: the root, and hypothesis' own cache should it land in the cwd."""
        return {self.root, self.sandbox / ".hypothesis"}

    def call(self, aw: Awaitable[T]) -> T:
        """Run ``aw`` on the service's loop, bounded."""

        async def bounded() -> T:
            return await asyncio.wait_for(aw, 60)

        return self.loop.run_until_complete(bounded())

    def seed(self) -> None:
        """(Re)make the states the fuzz meets: good, corrupt, and two that point outside."""
        store = StateStore(self.root)
        states = store.states_dir
        if not (states / "seed").exists():
            staging = store.begin("seed")
            staging.file("p1.mem").write_bytes(b"memory")
            spec = VmSpec(name="p1", host="h1", kernel=Path("/nonexistent/k"))
            staging.commit(
                Manifest(
                    name="seed",
                    group="lab",
                    host="h1",
                    created_at=utc_now(),
                    vms={"p1": VmRecord(spec=spec.model_dump(mode="json"), memory="p1.mem")},
                )
            )
        if not (states / "evil").exists():
            # A state whose memory file is a symlink to a file outside the store.
            (states / "evil").mkdir()
            manifest = (states / "seed" / "manifest.json").read_text()
            (states / "evil" / "manifest.json").write_text(
                manifest.replace('"name": "seed"', '"name": "evil"')
            )
            (states / "evil" / "p1.mem").symlink_to(self.outside / "victim.txt")
            self.seeded_links.add(states / "evil" / "p1.mem")
        if not (states / "evil-link").is_symlink():
            (states / "evil-link").symlink_to(self.outside)
            self.seeded_links.add(states / "evil-link")
        if not (states / "corrupt").exists():
            (states / "corrupt").mkdir()
            (states / "corrupt" / "manifest.json").write_text("{not json")

    def check_contained(self) -> None:
        """Nothing around the root changed; nothing in it is unsafe or leads out of it."""
        assert tree(self.base, self.skip, hash_files=True) == self.around
        root = self.root.resolve()
        for name, _ in tree(self.root, set(), hash_files=False).items():
            path = Path(name)
            rel = path.relative_to(self.root)
            for part in rel.parts:
                assert SAFE_PATH_PART.fullmatch(part), f"unsafe name in the store: {path!r}"
            if path in self.seeded_links:
                continue
            assert path.resolve().is_relative_to(root), f"{path} leads outside the root"


@pytest.fixture(scope="module")
def execd(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Execd]:
    """A real HostService with no VM, served over mutual TLS on 127.0.0.1, with its sandbox."""
    base = tmp_path_factory.mktemp("execd-fuzz")
    outside = base / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("must never change\n")
    (outside / "base.img").write_bytes(b"\0" * 65536)
    sandbox = base / "cwd"
    sandbox.mkdir()
    assert not [link for link in _host_links() if OUR_LINK.fullmatch(link)], (
        "lockstep's links exist on this host; the service's start-up cleanup would remove them"
    )
    assert all(_absent_link(name) for name in ("br0", "nobridge", "lan")), "a bridge exists"
    loop = asyncio.new_event_loop()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(sandbox)  # a relative path would land here, where it is seen
        config = ExecdConfig(host="h1", root=base / "root", qemu_binary=str(base / "no-such-qemu"))
        creds = server_credentials(pki.ca.cert, pki.server.cert, pki.server.key)

        async def setup() -> tuple[HostService, ExecdServer, HostClient, grpc.aio.Channel]:
            service = HostService(config)
            await service.start()
            server, port = await start_server(service, f"{LOOPBACK}:0", creds)
            address = f"{LOOPBACK}:{port}"
            client = HostClient(
                "h1", address, pki.client_creds(), timeouts=dict.fromkeys(Timeout, 20.0)
            )
            channel = grpc.aio.secure_channel(address, pki.client_creds())
            return service, server, client, channel

        service, server, client, channel = loop.run_until_complete(setup())
        ex = Execd(base, config.root, outside, sandbox, loop, client, channel)
        ex.seed()
        ex.around = tree(base, ex.skip, hash_files=True)
        try:
            yield ex
        finally:

            async def teardown() -> None:
                await client.close()
                await channel.close(None)
                await server.stop(None)
                await service.close()

            loop.run_until_complete(teardown())
            loop.close()
    shutil.rmtree(base / "root", ignore_errors=True)


@pytest.fixture
def untouched_session(execd: Execd) -> Iterator[None]:
    """After the test, nothing else in pytest's temporary folders changed either."""
    top = execd.base.parent
    before = tree(top, execd.skip, hash_files=False)
    yield
    assert tree(top, execd.skip, hash_files=False) == before


# --- calling ---------------------------------------------------------------------------


async def invoke(execd: Execd, call: Call) -> object:
    """Make ``call`` through the real HostClient."""
    client = execd.client
    if call.method == "Up":
        group, texts = call.args
        base_img = str(execd.outside / "base.img")
        request = pb.UpRequest(
            group=group, vm_specs_json=[t.replace(BASE, base_img) for t in texts]
        )
        # HostClient.up only sends valid VmSpecs; the wire must survive what it cannot send.
        return await client._call(UP, request)
    if call.method == "SaveMemory":
        op, keep_running = call.args
        return await client.save_memory(op, keep_running, lambda _p: None)
    method: Callable[..., Awaitable[object]] = getattr(client, CALLS[call.method].python_name)
    return await method(*call.args)


def outcome(execd: Execd, call: Call) -> None:
    """Make ``call``; assert it was answered or refused properly and changed nothing outside."""
    execd.seed()
    try:
        execd.call(invoke(execd, call))
    except RemoteError as exc:
        refused: RemoteError | None = exc
    else:
        refused = None
    if refused is not None:
        message = str(refused)
        assert refused.code in REFUSALS, (
            f"{call.method}: {refused.code} ({refused.kind}): {message}"
        )
        assert message.isprintable() and message.startswith("h1: "), message
    execd.call(execd.client.probe(0.0))  # the server still answers
    execd.check_contained()


# --- the fuzz tests --------------------------------------------------------------------


def test_every_rpc_is_fuzzed() -> None:
    """The strategies cover every RPC of the call table, and the HostClient has each."""
    assert set(ARGS) == set(CALLS)
    for method in ARGS:
        assert callable(getattr(HostClient, CALLS[method].python_name))


@pytest.mark.usefixtures("untouched_session")
@pytest.mark.parametrize("method", sorted(ARGS))
@settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 2))
@given(data=st.data())
def test_each_rpc_survives_random_fields(execd: Execd, method: str, data: st.DataObject) -> None:
    """Random and malformed fields of each RPC are answered or refused; nothing leaks out."""
    outcome(execd, Call(method, data.draw(ARGS[method], label="args")))


# Sequences draw operations and states from a tiny pool, so calls meet each other
# and walk the lifecycle: pause (no VM here), save, drain, resume, commit, abort.
_seq_ops = st.sampled_from(["op-a", "op-b"])
_seq_states = st.sampled_from(["s-a", "seed"])
_past = st.floats(min_value=0, max_value=T0 - 60)
sequence_calls = st.one_of(
    st.tuples(_seq_ops, _seq_states, _past, st.just([]), st.just(T0 + 3600)).map(
        lambda a: Call("Pause", a)
    ),
    st.tuples(_seq_ops, st.booleans()).map(lambda a: Call("SaveMemory", a)),
    st.tuples(_seq_ops, st.floats(0, 0.01), st.floats(0, 0.01)).map(lambda a: Call("Drain", a)),
    st.tuples(_seq_ops, _past).map(lambda a: Call("Resume", a)),
    _seq_ops.map(lambda op: Call("Commit", (op,))),
    _seq_ops.map(lambda op: Call("Stop", (op,))),
    st.tuples(_seq_ops, st.none() | _past).map(lambda a: Call("Abort", a)),
    st.tuples(_seq_ops, anything).map(lambda a: Call("Extend", a)),
    st.tuples(_seq_ops, _seq_states, anything).map(lambda a: Call("PrepareRestore", a)),
    st.tuples(_seq_ops, _past).map(lambda a: Call("Switch", a)),
    _seq_states.map(lambda s: Call("StateDelete", (s,))),
    calls,
)


@pytest.mark.usefixtures("untouched_session")
@settings(FUZZ)
@given(sequence=st.lists(sequence_calls, min_size=1, max_size=8))
@example(
    # An empty save runs the whole lifecycle, then its commit has no VM to record.
    sequence=[
        Call("Pause", ("op-a", "s-a", 1.0, [], T0 + 3600)),
        Call("SaveMemory", ("op-a", True)),
        Call("Drain", ("op-a", 0.0, 0.0)),
        Call("Resume", ("op-a", 1.0)),
        Call("Commit", ("op-a",)),
        Call("Abort", ("op-a", None)),
    ]
)
@example(sequence=[Call("Pause", ("op-a", "s-a", 1e300, [], math.inf))])  # no wait for ever
@example(sequence=[Call("Pause", ("op-a", "s-a", 1.0, ["vm1"] * 2, 2.0))])
@example(sequence=[Call("StateDelete", ("evil",)), Call("StateShow", ("evil-link",))])
@example(sequence=[Call("PrepareRestore", ("op-a", "seed", T0 + 3600))])
@example(
    sequence=[
        Call(
            "Up",
            (
                "lab",
                [
                    '{"name": "p1", "host": "h1", "kernel": "/k", "nics": [{"network": "lan",'
                    ' "mac": "52:54:00:00:00:01", "bridge": "b\\u0000"}]}'
                ],
            ),
        )
    ]
)
@example(
    # A control character in a path came back raw in the service's message.
    sequence=[
        Call("Up", ("lab", ['{"name": "p1", "host": "h1", "kernel": "@BASE@", "disk": "\\u001f"}']))
    ]
)
@example(sequence=[Call("Up", ("lab", ['{"name": "p1", "host": "h1", "kernel": "k"}']))])
@example(
    # The service's own refusals: no such image, no such bridge, no QEMU (after a layer).
    sequence=[
        Call("Up", ("lab", ['{"name": "p1", "host": "h1", "disk": "/nonexistent/d"}'])),
        Call(
            "Up",
            (
                "lab",
                [
                    '{"name": "p1", "host": "h1", "kernel": "/k", "nics": [{"network": "lan",'
                    ' "mac": "52:54:00:00:00:01", "bridge": "nobridge"}]}'
                ],
            ),
        ),
        Call(
            "Up",
            (
                "lab",
                [
                    '{"name": "p1", "host": "h1", "disk": "@BASE@"}',
                    '{"name": "s1", "host": "h1", "kernel": "@BASE@"}',
                ],
            ),
        ),
        Call("Down", ([],)),
    ]
)
@example(
    # Without its bridge, a NIC's network name (up to 63 characters) became a link name.
    sequence=[
        Call(
            "Up",
            (
                "lab",
                [
                    '{"name": "s1", "host": "h1", "kernel": "@BASE@", "nics": [{"network": "'
                    + "n" * 20
                    + '", "mac": "52:54:00:00:00:01"}]}'
                ],
            ),
        )
    ]
)
def test_call_sequences_survive(execd: Execd, sequence: list[Call]) -> None:
    """Sequences of calls on shared operations and states are answered or refused; nothing leaks."""
    for call in sequence:
        outcome(execd, call)


async def _send_raw(rpc: Any, payload: bytes, *, streaming: bool) -> None:
    """Call a raw-bytes multicallable (inside the loop, as grpc.aio needs)."""
    call = rpc(payload, timeout=20)
    if streaming:
        _ = [msg async for msg in call]
    else:
        await call


@pytest.mark.usefixtures("untouched_session")
@settings(FUZZ)
@given(method=st.sampled_from(sorted(ARGS)), payload=st.binary(max_size=300))
@example(method="Abort", payload=b"\x00")  # was UNKNOWN, with a traceback in the log
@example(method="SaveMemory", payload=b"\x00")
@example(method="StateShow", payload=b"\x0a\x02\xff\xfe")  # a name that is not UTF-8
def test_garbage_bytes_are_refused(execd: Execd, method: str, payload: bytes) -> None:
    """Random bytes as a request message are answered or refused, never UNKNOWN or INTERNAL.

    Left to gRPC, bytes that are no valid message ended the call with UNKNOWN and a
    traceback in the execd's log; the server now refuses them as INVALID_ARGUMENT.
    """
    path = f"/{pb.DESCRIPTOR.services_by_name['Execd'].full_name}/{method}"
    streaming = CALLS[method].stream
    kind = execd.channel.unary_stream if streaming else execd.channel.unary_unary
    rpc: Any = kind(path, request_serializer=None, response_deserializer=None)  # raw bytes
    try:
        execd.call(_send_raw(rpc, payload, streaming=streaming))
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
        assert code.name in REFUSALS, f"{method}: {code.name}: {details}"
    execd.call(execd.client.probe(0.0))
    execd.check_contained()


def test_unknown_methods_are_unimplemented(execd: Execd) -> None:
    """A method the service does not have, or another service, is UNIMPLEMENTED; nothing runs."""
    for path in ("/lockstep.v1.Execd/Nope", "/lockstep.v1.Other/Pause", "/x"):
        rpc: Any = execd.channel.unary_unary(
            path, request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            execd.call(_send_raw(rpc, b"", streaming=False))
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    execd.check_contained()
