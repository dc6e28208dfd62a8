"""Conversions between the execd's dataclasses and the protobuf messages.

The only place that knows both shapes, so the server and the client stay thin and
the service stays free of protobuf. proto3 has no "unset" for scalars, so absent
values travel as the zero value where zero is never a real value:

- ``VmStatus.pid`` None <-> 0 (no process has pid 0), ``layer``/``state``/``domain``/``uuid``/
  ``xml`` None <-> "" and ``driver`` "" -> "qemu" (a message of an older execd);
- ``StateInfo.parent`` None <-> "" (state names are never empty);
- ``VmReport.paused_at``/``resumed_at``/``clock_correction_ms`` and
  ``AbortRequest.resume_at`` are proto ``optional``, so None and 0.0 stay distinct;
- ``ResumeRequest``'s guest time: no VM listed <-> None (no guest clock is set);
- ``CommitReply.state`` unset <-> None;
- a fault's action is the request's ``oneof``; ``HeldFault.seconds_left`` is
  proto ``optional`` (only a freeze has one).

VM specs travel as their pydantic JSON; :func:`specs_from_json` validates them and
raises ``ValueError`` with a one-line message naming the bad spec.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ValidationError

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
from lockstep.group import VmSpec, validate_name
from lockstep.rpc.generated import execd_pb2 as pb

# Trailing metadata key under which the server names the error's class
# (``StateNotFound``, ``ValueError``, ...), so the client can tell kinds apart.
ERROR_KIND_KEY = "lockstep-error"

__all__ = [
    "ERROR_KIND_KEY",
    "guest_time_from_pb",
    "guest_time_to_pb",
    "fault_action_from_pb",
    "fault_reply_from_pb",
    "fault_reply_to_pb",
    "fault_request_to_pb",
    "manifest_from_pb",
    "manifest_to_pb",
    "probe_reply_from_pb",
    "probe_reply_to_pb",
    "save_progress_from_pb",
    "save_progress_to_pb",
    "specs_from_json",
    "specs_to_json",
    "state_from_pb",
    "state_to_pb",
    "states_from_pb",
    "states_to_pb",
    "validation_message",
    "vm_report_from_pb",
    "vm_report_to_pb",
    "vm_reports_from_pb",
    "vm_reports_to_pb",
    "vm_status_from_pb",
    "vm_status_to_pb",
    "vm_statuses_from_pb",
    "vm_statuses_to_pb",
]


def probe_reply_to_pb(reply: ProbeReply) -> pb.ProbeReply:
    """A clock probe's stamps as a message."""
    return pb.ProbeReply(received=reply.received, sent=reply.sent)


def probe_reply_from_pb(msg: pb.ProbeReply) -> ProbeReply:
    """A clock probe's stamps from a message."""
    return ProbeReply(received=msg.received, sent=msg.sent)


def vm_status_to_pb(status: VmStatus) -> pb.VmStatus:
    """A VM's status as a message (None -> 0 / "")."""
    return pb.VmStatus(
        name=status.name,
        runstate=status.runstate,
        pid=status.pid or 0,
        layer=status.layer or "",
        state=status.state or "",
        driver=status.driver,
        domain=status.domain or "",
        uuid=status.uuid or "",
        xml=status.xml or "",
    )


def vm_status_from_pb(msg: pb.VmStatus) -> VmStatus:
    """A VM's status from a message (0 / "" -> None)."""
    return VmStatus(
        name=msg.name,
        runstate=msg.runstate,
        pid=msg.pid or None,
        layer=msg.layer or None,
        state=msg.state or None,
        driver=msg.driver or "qemu",
        domain=msg.domain or None,
        uuid=msg.uuid or None,
        xml=msg.xml or None,
    )


def vm_statuses_to_pb(statuses: Iterable[VmStatus]) -> pb.VmStatusList:
    """Several VMs' status as one message."""
    return pb.VmStatusList(vms=[vm_status_to_pb(s) for s in statuses])


def vm_statuses_from_pb(msg: pb.VmStatusList) -> list[VmStatus]:
    """Several VMs' status from one message."""
    return [vm_status_from_pb(m) for m in msg.vms]


def vm_report_to_pb(report: VmReport) -> pb.VmReport:
    """What a step did to a VM, as a message (optional instants stay optional)."""
    msg = pb.VmReport(
        name=report.name,
        memory_bytes=report.memory_bytes,
        frames_held=report.frames_held,
        frames_delivered=report.frames_delivered,
        frames_dropped=report.frames_dropped,
        frames_ignored=report.frames_ignored,
        memory_path=report.memory_path,
        memory_note=report.memory_note,
        clock_note=report.clock_note,
    )
    if report.paused_at is not None:
        msg.paused_at = report.paused_at
    if report.resumed_at is not None:
        msg.resumed_at = report.resumed_at
    if report.clock_correction_ms is not None:
        msg.clock_correction_ms = report.clock_correction_ms
    return msg


def vm_report_from_pb(msg: pb.VmReport) -> VmReport:
    """What a step did to a VM, from a message."""
    return VmReport(
        name=msg.name,
        paused_at=msg.paused_at if msg.HasField("paused_at") else None,
        resumed_at=msg.resumed_at if msg.HasField("resumed_at") else None,
        memory_bytes=msg.memory_bytes,
        frames_held=msg.frames_held,
        frames_delivered=msg.frames_delivered,
        frames_dropped=msg.frames_dropped,
        frames_ignored=msg.frames_ignored,
        memory_path=msg.memory_path,
        memory_note=msg.memory_note,
        clock_correction_ms=(
            msg.clock_correction_ms if msg.HasField("clock_correction_ms") else None
        ),
        clock_note=msg.clock_note,
    )


def guest_time_to_pb(request: pb.ResumeRequest, guest_time: GuestTime | None) -> None:
    """Put the guests whose wall clock to set, and true time at the resume, in ``request``."""
    if guest_time is not None and guest_time.vms:
        request.set_guest_time.extend(guest_time.vms)
        request.true_at = guest_time.true_at


def guest_time_from_pb(request: pb.ResumeRequest) -> GuestTime | None:
    """The guest time a ResumeRequest asks for (None: no guest's clock is set)."""
    if not request.set_guest_time:
        return None
    return GuestTime(true_at=request.true_at, vms=tuple(request.set_guest_time))


def vm_reports_to_pb(reports: Iterable[VmReport]) -> pb.VmReportList:
    """Several VM reports as one message."""
    return pb.VmReportList(vms=[vm_report_to_pb(r) for r in reports])


def vm_reports_from_pb(msg: pb.VmReportList) -> list[VmReport]:
    """Several VM reports from one message."""
    return [vm_report_from_pb(m) for m in msg.vms]


def save_progress_to_pb(progress: SaveProgress) -> pb.SaveProgress:
    """One progress step of SaveMemory as a stream message (``result`` unset)."""
    return pb.SaveProgress(vm=progress.vm, done=progress.done, total=progress.total)


def save_progress_from_pb(msg: pb.SaveProgress) -> SaveProgress:
    """One progress step of SaveMemory from a stream message."""
    return SaveProgress(vm=msg.vm, done=msg.done, total=msg.total)


def state_to_pb(state: StateInfo) -> pb.StateInfo:
    """A committed state as a message (parent None -> "")."""
    return pb.StateInfo(
        name=state.name,
        host=state.host,
        created_at=state.created_at,
        parent=state.parent or "",
        vms=list(state.vms),
        size_bytes=state.size_bytes,
    )


def state_from_pb(msg: pb.StateInfo) -> StateInfo:
    """A committed state from a message ("" parent -> None)."""
    return StateInfo(
        name=msg.name,
        host=msg.host,
        created_at=msg.created_at,
        parent=msg.parent or None,
        vms=list(msg.vms),
        size_bytes=msg.size_bytes,
    )


def states_to_pb(states: Iterable[StateInfo]) -> pb.StateList:
    """Several states as one message."""
    return pb.StateList(states=[state_to_pb(s) for s in states])


def states_from_pb(msg: pb.StateList) -> list[StateInfo]:
    """Several states from one message."""
    return [state_from_pb(m) for m in msg.states]


def manifest_to_pb(manifest: dict[str, Any]) -> pb.StateDetail:
    """A state's manifest (JSON-ready data) as a message.

    Raises:
        ValueError: the manifest is not JSON-serialisable.
    """
    try:
        text = json.dumps(manifest, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the state manifest cannot be sent as JSON: {exc}") from exc
    return pb.StateDetail(manifest_json=text)


def manifest_from_pb(msg: pb.StateDetail) -> dict[str, Any]:
    """A state's manifest from a message.

    Raises:
        ValueError: the text is not a JSON object.
    """
    try:
        data = json.loads(msg.manifest_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the state manifest is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"the state manifest is a JSON {type(data).__name__}, not an object")
    return data


def specs_to_json(specs: Iterable[VmSpec]) -> list[str]:
    """VM specs as the JSON strings UpRequest carries."""
    return [spec.model_dump_json() for spec in specs]


def validation_message(exc: ValidationError) -> str:
    """The first problem of a pydantic error as ``where: what`` on one line."""
    errors = exc.errors()
    if not errors:
        return "invalid"
    err = errors[0]
    where = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "is not a known key"
    elif err["type"] == "missing":
        msg = "is missing"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where + ': ' if where else ''}{msg}{more}"


def specs_from_json(texts: Sequence[str]) -> list[VmSpec]:
    """Validate the JSON VM specs of an UpRequest.

    Raises:
        ValueError: a spec is not valid JSON, not a valid VM spec, has a bad name,
            a relative file path or a NIC without its bridge, or two specs have the
            same name; the message names the spec.
    """
    specs: list[VmSpec] = []
    seen: set[str] = set()
    for i, text in enumerate(texts):
        try:
            spec = VmSpec.model_validate_json(text)
        except ValidationError as exc:
            raise ValueError(f"VM spec #{i + 1} is invalid: {validation_message(exc)}") from exc
        validate_name("VM", spec.name)
        for j, nic in enumerate(spec.nics):
            if nic.bridge is None:  # the caller fills it in from the group's [networks]
                raise ValueError(f"VM spec #{i + 1} is invalid: nics.{j}.bridge: is missing")
        files = [(key, getattr(spec, key)) for key in ("kernel", "initrd", "define")]
        files += [(f"disks.{j}.path", d.path) for j, d in enumerate(spec.disks)]
        for key, path in files:
            if path is not None and not path.is_absolute():
                # It would be taken from the execd's working directory.
                raise ValueError(
                    f"VM spec #{i + 1} is invalid: {key}: {str(path)!r} is not an absolute path"
                )
        if spec.name in seen:
            raise ValueError(f"VM {spec.name!r} is listed twice")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _side_to_pb(side: Sequence[FaultVm]) -> list[pb.FaultVm]:
    return [pb.FaultVm(name=v.name, macs=list(v.macs)) for v in side]


def _side_from_pb(side: Iterable[pb.FaultVm]) -> tuple[FaultVm, ...]:
    return tuple(FaultVm(v.name, tuple(v.macs)) for v in side)


def fault_request_to_pb(group: str, fault_id: str, action: FaultAction) -> pb.FaultRequest:
    """A fault to inject (or heal, or list) as a request; the action is its ``oneof``."""
    msg = pb.FaultRequest(group=group, id=fault_id)
    if isinstance(action, Kill):
        msg.kill.vm = action.vm
    elif isinstance(action, Freeze):
        msg.freeze.CopyFrom(pb.FreezeFault(vm=action.vm, seconds=action.seconds))
    elif isinstance(action, Partition):
        msg.partition.CopyFrom(pb.PartitionFault(a=_side_to_pb(action.a), b=_side_to_pb(action.b)))
    elif isinstance(action, Loss):
        msg.loss.CopyFrom(pb.LossFault(vm=action.vm, percent=action.percent))
    elif isinstance(action, Heal):
        msg.heal.CopyFrom(pb.HealFaults(ids=list(action.ids)))
    else:
        msg.list.CopyFrom(pb.Empty())
    return msg


def fault_action_from_pb(msg: pb.FaultRequest) -> FaultAction:
    """The action of a fault request, as it came (the server validates its values).

    Raises:
        ValueError: the request names no action.
    """
    which = msg.WhichOneof("action")
    if which == "kill":
        return Kill(msg.kill.vm)
    if which == "freeze":
        return Freeze(msg.freeze.vm, msg.freeze.seconds)
    if which == "partition":
        return Partition(_side_from_pb(msg.partition.a), _side_from_pb(msg.partition.b))
    if which == "loss":
        return Loss(msg.loss.vm, msg.loss.percent)
    if which == "heal":
        return Heal(tuple(msg.heal.ids))
    if which == "list":
        return ListFaults()
    raise ValueError(
        "the fault request names no action (kill, freeze, partition, loss, heal, list)"
    )


def fault_reply_to_pb(reply: FaultReply) -> pb.FaultReply:
    """What a host did about a fault, and the faults it holds, as a message."""
    held = []
    for h in reply.held:
        m = pb.HeldFault(id=h.id, kind=h.kind, vms=h.vms, what=h.what)
        if h.seconds_left is not None:
            m.seconds_left = h.seconds_left
        held.append(m)
    return pb.FaultReply(did=reply.did, held=held)


def fault_reply_from_pb(msg: pb.FaultReply) -> FaultReply:
    """What a host did about a fault, and the faults it holds, from a message."""
    held = [
        HeldFault(
            id=h.id,
            kind=h.kind,
            vms=list(h.vms),
            what=h.what,
            seconds_left=h.seconds_left if h.HasField("seconds_left") else None,
        )
        for h in msg.held
    ]
    return FaultReply(did=list(msg.did), held=held)
