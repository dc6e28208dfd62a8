from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("sent",)
    SENT_FIELD_NUMBER: _ClassVar[int]
    sent: float
    def __init__(self, sent: _Optional[float] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("received", "sent")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    received: float
    sent: float
    def __init__(self, received: _Optional[float] = ..., sent: _Optional[float] = ...) -> None: ...

class ProbeKeyReply(_message.Message):
    __slots__ = ("port", "key_id", "key", "valid_for", "answered", "forged", "replayed", "stale")
    PORT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALID_FOR_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    FORGED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    port: int
    key_id: bytes
    key: bytes
    valid_for: float
    answered: int
    forged: int
    replayed: int
    stale: int
    def __init__(self, port: _Optional[int] = ..., key_id: _Optional[bytes] = ..., key: _Optional[bytes] = ..., valid_for: _Optional[float] = ..., answered: _Optional[int] = ..., forged: _Optional[int] = ..., replayed: _Optional[int] = ..., stale: _Optional[int] = ...) -> None: ...

class UpRequest(_message.Message):
    __slots__ = ("group", "vm_specs_json")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VM_SPECS_JSON_FIELD_NUMBER: _ClassVar[int]
    group: str
    vm_specs_json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group: _Optional[str] = ..., vm_specs_json: _Optional[_Iterable[str]] = ...) -> None: ...

class DownRequest(_message.Message):
    __slots__ = ("vms",)
    VMS_FIELD_NUMBER: _ClassVar[int]
    vms: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, vms: _Optional[_Iterable[str]] = ...) -> None: ...

class VmStatus(_message.Message):
    __slots__ = ("name", "runstate", "pid", "layer", "state", "driver", "domain", "uuid", "xml")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RUNSTATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    XML_FIELD_NUMBER: _ClassVar[int]
    name: str
    runstate: str
    pid: int
    layer: str
    state: str
    driver: str
    domain: str
    uuid: str
    xml: str
    def __init__(self, name: _Optional[str] = ..., runstate: _Optional[str] = ..., pid: _Optional[int] = ..., layer: _Optional[str] = ..., state: _Optional[str] = ..., driver: _Optional[str] = ..., domain: _Optional[str] = ..., uuid: _Optional[str] = ..., xml: _Optional[str] = ...) -> None: ...

class VmStatusList(_message.Message):
    __slots__ = ("vms",)
    VMS_FIELD_NUMBER: _ClassVar[int]
    vms: _containers.RepeatedCompositeFieldContainer[VmStatus]
    def __init__(self, vms: _Optional[_Iterable[_Union[VmStatus, _Mapping]]] = ...) -> None: ...

class VmReport(_message.Message):
    __slots__ = ("name", "paused_at", "resumed_at", "memory_bytes", "frames_held", "frames_delivered", "frames_dropped", "memory_path", "memory_note", "frames_ignored", "clock_correction_ms", "clock_note")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAUSED_AT_FIELD_NUMBER: _ClassVar[int]
    RESUMED_AT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_HELD_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PATH_FIELD_NUMBER: _ClassVar[int]
    MEMORY_NOTE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_IGNORED_FIELD_NUMBER: _ClassVar[int]
    CLOCK_CORRECTION_MS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    paused_at: float
    resumed_at: float
    memory_bytes: int
    frames_held: int
    frames_delivered: int
    frames_dropped: int
    memory_path: str
    memory_note: str
    frames_ignored: int
    clock_correction_ms: float
    clock_note: str
    def __init__(self, name: _Optional[str] = ..., paused_at: _Optional[float] = ..., resumed_at: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., frames_held: _Optional[int] = ..., frames_delivered: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., memory_path: _Optional[str] = ..., memory_note: _Optional[str] = ..., frames_ignored: _Optional[int] = ..., clock_correction_ms: _Optional[float] = ..., clock_note: _Optional[str] = ...) -> None: ...

class VmReportList(_message.Message):
    __slots__ = ("vms",)
    VMS_FIELD_NUMBER: _ClassVar[int]
    vms: _containers.RepeatedCompositeFieldContainer[VmReport]
    def __init__(self, vms: _Optional[_Iterable[_Union[VmReport, _Mapping]]] = ...) -> None: ...

class OpRequest(_message.Message):
    __slots__ = ("op",)
    OP_FIELD_NUMBER: _ClassVar[int]
    op: str
    def __init__(self, op: _Optional[str] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("op", "state", "at", "vms", "deadline")
    OP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    VMS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    op: str
    state: str
    at: float
    vms: _containers.RepeatedScalarFieldContainer[str]
    deadline: float
    def __init__(self, op: _Optional[str] = ..., state: _Optional[str] = ..., at: _Optional[float] = ..., vms: _Optional[_Iterable[str]] = ..., deadline: _Optional[float] = ...) -> None: ...

class SaveMemoryRequest(_message.Message):
    __slots__ = ("op", "keep_running")
    OP_FIELD_NUMBER: _ClassVar[int]
    KEEP_RUNNING_FIELD_NUMBER: _ClassVar[int]
    op: str
    keep_running: bool
    def __init__(self, op: _Optional[str] = ..., keep_running: _Optional[bool] = ...) -> None: ...

class SaveProgress(_message.Message):
    __slots__ = ("vm", "done", "total", "result")
    VM_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    vm: str
    done: int
    total: int
    result: VmReportList
    def __init__(self, vm: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., result: _Optional[_Union[VmReportList, _Mapping]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("op", "quiet", "limit")
    OP_FIELD_NUMBER: _ClassVar[int]
    QUIET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    op: str
    quiet: float
    limit: float
    def __init__(self, op: _Optional[str] = ..., quiet: _Optional[float] = ..., limit: _Optional[float] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("op", "at", "set_guest_time", "true_at")
    OP_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    SET_GUEST_TIME_FIELD_NUMBER: _ClassVar[int]
    TRUE_AT_FIELD_NUMBER: _ClassVar[int]
    op: str
    at: float
    set_guest_time: _containers.RepeatedScalarFieldContainer[str]
    true_at: float
    def __init__(self, op: _Optional[str] = ..., at: _Optional[float] = ..., set_guest_time: _Optional[_Iterable[str]] = ..., true_at: _Optional[float] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("op", "resume_at")
    OP_FIELD_NUMBER: _ClassVar[int]
    RESUME_AT_FIELD_NUMBER: _ClassVar[int]
    op: str
    resume_at: float
    def __init__(self, op: _Optional[str] = ..., resume_at: _Optional[float] = ...) -> None: ...

class ExtendRequest(_message.Message):
    __slots__ = ("op", "deadline")
    OP_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    op: str
    deadline: float
    def __init__(self, op: _Optional[str] = ..., deadline: _Optional[float] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: StateInfo
    def __init__(self, state: _Optional[_Union[StateInfo, _Mapping]] = ...) -> None: ...

class PrepareRestoreRequest(_message.Message):
    __slots__ = ("op", "state", "deadline")
    OP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    op: str
    state: str
    deadline: float
    def __init__(self, op: _Optional[str] = ..., state: _Optional[str] = ..., deadline: _Optional[float] = ...) -> None: ...

class StateInfo(_message.Message):
    __slots__ = ("name", "host", "created_at", "parent", "vms", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    VMS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    host: str
    created_at: str
    parent: str
    vms: _containers.RepeatedScalarFieldContainer[str]
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., host: _Optional[str] = ..., created_at: _Optional[str] = ..., parent: _Optional[str] = ..., vms: _Optional[_Iterable[str]] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class StateList(_message.Message):
    __slots__ = ("states",)
    STATES_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedCompositeFieldContainer[StateInfo]
    def __init__(self, states: _Optional[_Iterable[_Union[StateInfo, _Mapping]]] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class StateDetail(_message.Message):
    __slots__ = ("manifest_json",)
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    manifest_json: str
    def __init__(self, manifest_json: _Optional[str] = ...) -> None: ...

class VerifyStateRequest(_message.Message):
    __slots__ = ("name", "deep")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEEP_FIELD_NUMBER: _ClassVar[int]
    name: str
    deep: bool
    def __init__(self, name: _Optional[str] = ..., deep: _Optional[bool] = ...) -> None: ...

class VerifyStateReply(_message.Message):
    __slots__ = ("files", "hashed_bytes", "seconds")
    FILES_FIELD_NUMBER: _ClassVar[int]
    HASHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    files: int
    hashed_bytes: int
    seconds: float
    def __init__(self, files: _Optional[int] = ..., hashed_bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class StateDeleteReply(_message.Message):
    __slots__ = ("removed_layers",)
    REMOVED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    removed_layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, removed_layers: _Optional[_Iterable[str]] = ...) -> None: ...

class StateFramesRequest(_message.Message):
    __slots__ = ("name", "vm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VM_FIELD_NUMBER: _ClassVar[int]
    name: str
    vm: str
    def __init__(self, name: _Optional[str] = ..., vm: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("file", "data")
    FILE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file: str
    data: bytes
    def __init__(self, file: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class FaultRequest(_message.Message):
    __slots__ = ("group", "id", "kill", "freeze", "partition", "loss", "heal", "list")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    KILL_FIELD_NUMBER: _ClassVar[int]
    FREEZE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    HEAL_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    group: str
    id: str
    kill: KillFault
    freeze: FreezeFault
    partition: PartitionFault
    loss: LossFault
    heal: HealFaults
    list: Empty
    def __init__(self, group: _Optional[str] = ..., id: _Optional[str] = ..., kill: _Optional[_Union[KillFault, _Mapping]] = ..., freeze: _Optional[_Union[FreezeFault, _Mapping]] = ..., partition: _Optional[_Union[PartitionFault, _Mapping]] = ..., loss: _Optional[_Union[LossFault, _Mapping]] = ..., heal: _Optional[_Union[HealFaults, _Mapping]] = ..., list: _Optional[_Union[Empty, _Mapping]] = ...) -> None: ...

class KillFault(_message.Message):
    __slots__ = ("vm",)
    VM_FIELD_NUMBER: _ClassVar[int]
    vm: str
    def __init__(self, vm: _Optional[str] = ...) -> None: ...

class FreezeFault(_message.Message):
    __slots__ = ("vm", "seconds")
    VM_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    vm: str
    seconds: float
    def __init__(self, vm: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class FaultVm(_message.Message):
    __slots__ = ("name", "macs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MACS_FIELD_NUMBER: _ClassVar[int]
    name: str
    macs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., macs: _Optional[_Iterable[str]] = ...) -> None: ...

class PartitionFault(_message.Message):
    __slots__ = ("a", "b")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    a: _containers.RepeatedCompositeFieldContainer[FaultVm]
    b: _containers.RepeatedCompositeFieldContainer[FaultVm]
    def __init__(self, a: _Optional[_Iterable[_Union[FaultVm, _Mapping]]] = ..., b: _Optional[_Iterable[_Union[FaultVm, _Mapping]]] = ...) -> None: ...

class LossFault(_message.Message):
    __slots__ = ("vm", "percent")
    VM_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    vm: str
    percent: int
    def __init__(self, vm: _Optional[str] = ..., percent: _Optional[int] = ...) -> None: ...

class HealFaults(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class HeldFault(_message.Message):
    __slots__ = ("id", "kind", "vms", "what", "seconds_left")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VMS_FIELD_NUMBER: _ClassVar[int]
    WHAT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    vms: _containers.RepeatedScalarFieldContainer[str]
    what: str
    seconds_left: float
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., vms: _Optional[_Iterable[str]] = ..., what: _Optional[str] = ..., seconds_left: _Optional[float] = ...) -> None: ...

class FaultReply(_message.Message):
    __slots__ = ("did", "held")
    DID_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    did: _containers.RepeatedScalarFieldContainer[str]
    held: _containers.RepeatedCompositeFieldContainer[HeldFault]
    def __init__(self, did: _Optional[_Iterable[str]] = ..., held: _Optional[_Iterable[_Union[HeldFault, _Mapping]]] = ...) -> None: ...
