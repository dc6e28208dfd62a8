"""Round trips between the execd's dataclasses and the protobuf messages (lockstep.rpc.convert)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockstep.execd.model import GuestTime, ProbeReply, SaveProgress, StateInfo, VmReport, VmStatus
from lockstep.group import VmSpec
from lockstep.rpc import convert
from lockstep.rpc.generated import execd_pb2 as pb

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
COUNT = st.integers(min_value=0, max_value=2**63 - 1)
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)  # proto strings are UTF-8
NON_EMPTY = TEXT.filter(bool)
TIME = st.floats(allow_nan=False)
MAYBE_TIME = st.none() | TIME | st.just(0.0)


def _wire(msg: Any) -> Any:
    """Serialise and parse ``msg`` again, as the network would."""
    return type(msg).FromString(msg.SerializeToString())


@given(st.builds(ProbeReply, received=TIME, sent=TIME))
def test_probe_reply_round_trip(reply: ProbeReply) -> None:
    """A probe reply's two stamps survive the wire exactly."""
    assert convert.probe_reply_from_pb(_wire(convert.probe_reply_to_pb(reply))) == reply


@given(
    st.builds(
        VmStatus,
        name=TEXT,
        runstate=TEXT,
        pid=st.none() | st.integers(min_value=1, max_value=2**63 - 1),
        layer=st.none() | NON_EMPTY,
        state=st.none() | NON_EMPTY,
    )
)
def test_vm_status_round_trip(status: VmStatus) -> None:
    """A VM status survives the wire, None pid/layer/state included."""
    assert convert.vm_status_from_pb(_wire(convert.vm_status_to_pb(status))) == status


def test_vm_status_absent_values_travel_as_zero() -> None:
    """pid None travels as 0 and layer/state None as "", and come back as None."""
    msg = convert.vm_status_to_pb(VmStatus(name="p1", runstate="shutdown"))
    assert (msg.pid, msg.layer, msg.state) == (0, "", "")
    assert convert.vm_status_from_pb(msg) == VmStatus(name="p1", runstate="shutdown")


@given(
    st.builds(
        VmReport,
        name=TEXT,
        paused_at=MAYBE_TIME,
        resumed_at=MAYBE_TIME,
        memory_bytes=INT64,
        frames_held=INT64,
        frames_delivered=INT64,
        frames_dropped=INT64,
        clock_correction_ms=MAYBE_TIME,
        clock_note=TEXT,
    )
)
def test_vm_report_round_trip(report: VmReport) -> None:
    """A VM report survives the wire; its optional instants and correction keep None apart from 0.0."""
    assert convert.vm_report_from_pb(_wire(convert.vm_report_to_pb(report))) == report


def test_vm_report_zero_instant_is_not_none() -> None:
    """paused_at=0.0 is sent as a set field and resumed_at=None as an unset one."""
    msg = _wire(convert.vm_report_to_pb(VmReport(name="p1", paused_at=0.0)))
    assert msg.HasField("paused_at")
    assert not msg.HasField("resumed_at")
    back = convert.vm_report_from_pb(msg)
    assert back.paused_at == 0.0
    assert back.resumed_at is None


@given(st.lists(st.builds(VmReport, name=TEXT, paused_at=MAYBE_TIME, frames_held=COUNT)))
def test_vm_report_list_round_trip(reports: list[VmReport]) -> None:
    """A list of VM reports keeps its order and contents."""
    assert convert.vm_reports_from_pb(_wire(convert.vm_reports_to_pb(reports))) == reports


@given(st.lists(st.builds(VmStatus, name=TEXT, runstate=TEXT)))
def test_vm_status_list_round_trip(statuses: list[VmStatus]) -> None:
    """A list of VM statuses keeps its order and contents."""
    assert convert.vm_statuses_from_pb(_wire(convert.vm_statuses_to_pb(statuses))) == statuses


@given(st.builds(SaveProgress, vm=TEXT, done=INT64, total=INT64))
def test_save_progress_round_trip(progress: SaveProgress) -> None:
    """A progress step survives the wire and is sent without a result."""
    msg = _wire(convert.save_progress_to_pb(progress))
    assert not msg.HasField("result")
    assert convert.save_progress_from_pb(msg) == progress


STATES = st.builds(
    StateInfo,
    name=TEXT,
    host=TEXT,
    created_at=TEXT,
    parent=st.none() | NON_EMPTY,
    vms=st.lists(TEXT),
    size_bytes=INT64,
)


@given(STATES)
def test_state_info_round_trip(state: StateInfo) -> None:
    """A state's listing survives the wire, parent None included."""
    assert convert.state_from_pb(_wire(convert.state_to_pb(state))) == state


@given(st.lists(STATES))
def test_state_list_round_trip(states: list[StateInfo]) -> None:
    """A list of states keeps its order and contents."""
    assert convert.states_from_pb(_wire(convert.states_to_pb(states))) == states


JSON = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda children: st.lists(children) | st.dictionaries(TEXT, children),
    max_leaves=20,
)


@given(st.dictionaries(TEXT, JSON))
def test_manifest_round_trip(manifest: dict[str, Any]) -> None:
    """A state manifest (any JSON object) survives the wire."""
    assert convert.manifest_from_pb(_wire(convert.manifest_to_pb(manifest))) == manifest


@pytest.mark.parametrize(
    ("text", "match"),
    [("{not json", "not valid JSON"), ("[1, 2]", "a JSON list, not an object")],
)
def test_manifest_that_is_not_an_object_is_refused(text: str, match: str) -> None:
    """A manifest that is not a JSON object raises ValueError saying why."""
    with pytest.raises(ValueError, match=match):
        convert.manifest_from_pb(pb.StateDetail(manifest_json=text))


def test_manifest_that_cannot_be_json_is_refused() -> None:
    """A manifest holding something JSON cannot carry raises ValueError, not TypeError."""
    with pytest.raises(ValueError, match="cannot be sent as JSON"):
        convert.manifest_to_pb({"path": Path("/x")})
    with pytest.raises(ValueError, match="cannot be sent as JSON"):
        convert.manifest_to_pb({"x": float("nan")})


def _spec(name: str, **extra: Any) -> VmSpec:
    return VmSpec(name=name, host="h1", kernel=Path("/boot/vmlinuz"), **extra)


def test_specs_round_trip() -> None:
    """VM specs travel as their JSON model and come back equal."""
    specs = [_spec("p1", memory="512M", cmdline="console=ttyS0"), _spec("s1", vcpus=2)]
    assert convert.specs_from_json(convert.specs_to_json(specs)) == specs


@pytest.mark.parametrize(
    ("texts", "match"),
    [
        (["{bad"], r"VM spec #1 is invalid: Invalid JSON"),
        (['{"name": "p1"}'], r"VM spec #1 is invalid: host: is missing"),
        (
            [_spec("p1").model_dump_json(), '{"name": "p2", "host": "h1", "disk": "/d", "x": 1}'],
            r"VM spec #2 is invalid: x: is not a known key",
        ),
        (['{"name": "../x", "host": "h1", "kernel": "/k"}'], r"VM name '\.\./x' is not allowed"),
        ([_spec("p1").model_dump_json()] * 2, r"VM 'p1' is listed twice"),
    ],
)
def test_bad_specs_are_refused_in_one_line(texts: list[str], match: str) -> None:
    """A bad spec raises ValueError with a one-line message naming the spec."""
    with pytest.raises(ValueError, match=match) as info:
        convert.specs_from_json(texts)
    assert "\n" not in str(info.value)


def test_guest_time_rides_on_the_resume_request() -> None:
    """The guests whose clock to set and true time arrive whole; none listed is None (a save)."""
    request = pb.ResumeRequest(op="op-1", at=5.0)
    convert.guest_time_to_pb(request, GuestTime(1.5e9, ("p1", "s1")))
    assert convert.guest_time_from_pb(_wire(request)) == GuestTime(1.5e9, ("p1", "s1"))
    for nothing in (None, GuestTime(1.5e9, ())):
        bare = pb.ResumeRequest(op="op-1", at=5.0)
        convert.guest_time_to_pb(bare, nothing)
        assert convert.guest_time_from_pb(_wire(bare)) is None


def test_every_model_field_is_carried() -> None:
    """Each dataclass's fields all have a field of the same name in its message.

    Guards the hand-written conversions against a field added on one side only.
    """
    pairs: list[tuple[Any, Any]] = [
        (ProbeReply, pb.ProbeReply),
        (VmStatus, pb.VmStatus),
        (VmReport, pb.VmReport),
        (SaveProgress, pb.SaveProgress),
        (StateInfo, pb.StateInfo),
    ]
    for model, message in pairs:
        model_fields = set(model.__dataclass_fields__)
        message_fields = set(message.DESCRIPTOR.fields_by_name) - {"result"}
        assert model_fields == message_fields, model.__name__


def test_manifest_is_sent_as_sorted_json() -> None:
    """The manifest text is deterministic (sorted keys), so equal manifests compare equal."""
    msg = convert.manifest_to_pb({"b": 1, "a": [1, 2]})
    assert json.loads(msg.manifest_json) == {"a": [1, 2], "b": 1}
    assert msg.manifest_json.index('"a"') < msg.manifest_json.index('"b"')
