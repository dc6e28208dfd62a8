"""Every call of the Execd service, declared once (Ganeti-style): the table :data:`CALLS`.

An entry says what the proto says of a call (its gRPC method, request and reply
message types, whether the reply is a stream) and what only lockstep knows: its
:class:`Timeout` class and who answers it (the service, or the gRPC adapter
itself when the call is transport). Everything else follows from the table:

- :class:`~lockstep.rpc.client.HostClient` takes each call's timeout and reply
  type from its entry, so a client method names its call once;
- :class:`~lockstep.rpc.server.ExecdServicer` serves each method as its entry
  says (unary or streamed) and names the calls it answers itself
  (:data:`~lockstep.rpc.server.SERVED_BY_ADAPTER`) from the table;
- a protocol test checks the table against the proto's descriptor and that
  HostClient, ExecdServicer and :class:`~lockstep.execd.api.ExecdApi` each have
  the methods it calls for.

A new call is: the proto (regenerated first: this module needs its messages),
an entry here, a HostClient method, an ExecdServicer method and, if the
service answers it, an ExecdApi method.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar

from google.protobuf.message import Message

from lockstep.rpc.generated import execd_pb2 as pb

__all__ = [
    "ABORT",
    "CALLS",
    "COMMIT",
    "DOWN",
    "DRAIN",
    "EXTEND",
    "INJECT_FAULT",
    "PAUSE",
    "PREPARE_RESTORE",
    "PROBE",
    "PROBE_KEY",
    "RESUME",
    "SAVE_MEMORY",
    "STATES",
    "STATE_DELETE",
    "STATE_FRAMES",
    "STATE_SHOW",
    "STATUS",
    "STOP",
    "SWITCH",
    "UP",
    "VERIFY_STATE",
    "Call",
    "ServedBy",
    "Timeout",
]

Req = TypeVar("Req", bound=Message)
Rep = TypeVar("Rep", bound=Message)


class Timeout(enum.Enum):
    """Timeout classes; the value is the default in seconds."""

    FAST = 5.0  # answered from memory
    NORMAL = 30.0  # a few QMP commands, tc, small files
    SLOW = 600.0  # writes or loads guest memory, boots VMs


class ServedBy(enum.Enum):
    """Who answers a call on the execd."""

    SERVICE = "service"  # the transport-free ExecdApi, through the adapter
    ADAPTER = "adapter"  # the gRPC adapter itself: the call is transport


@dataclass(frozen=True)
class Call(Generic[Req, Rep]):
    """One RPC of the Execd service; ``reply`` is the streamed message when ``stream``."""

    method: str  # the gRPC method, as in the proto ("SaveMemory")
    timeout: Timeout
    request: type[Req]
    reply: type[Rep]
    stream: bool = False
    served_by: ServedBy = ServedBy.SERVICE

    @property
    def python_name(self) -> str:
        """The name of the call's HostClient and ExecdApi method ("save_memory")."""
        return re.sub(r"(?<!^)([A-Z])", r"_\1", self.method).lower()


PROBE: Final = Call("Probe", Timeout.FAST, pb.ProbeRequest, pb.ProbeReply)
PROBE_KEY: Final = Call(
    "ProbeKey", Timeout.FAST, pb.Empty, pb.ProbeKeyReply, served_by=ServedBy.ADAPTER
)
UP: Final = Call("Up", Timeout.SLOW, pb.UpRequest, pb.VmStatusList)
DOWN: Final = Call("Down", Timeout.NORMAL, pb.DownRequest, pb.VmStatusList)
STATUS: Final = Call("Status", Timeout.FAST, pb.Empty, pb.VmStatusList)
PAUSE: Final = Call("Pause", Timeout.NORMAL, pb.PauseRequest, pb.VmReportList)
SAVE_MEMORY: Final = Call(
    "SaveMemory", Timeout.SLOW, pb.SaveMemoryRequest, pb.SaveProgress, stream=True
)
DRAIN: Final = Call("Drain", Timeout.NORMAL, pb.DrainRequest, pb.VmReportList)
RESUME: Final = Call("Resume", Timeout.NORMAL, pb.ResumeRequest, pb.VmReportList)
STOP: Final = Call("Stop", Timeout.NORMAL, pb.OpRequest, pb.VmReportList)
# SLOW: fsyncs and hashes the state's memory files (guest RAM).
COMMIT: Final = Call("Commit", Timeout.SLOW, pb.OpRequest, pb.CommitReply)
ABORT: Final = Call("Abort", Timeout.NORMAL, pb.AbortRequest, pb.VmReportList)
EXTEND: Final = Call("Extend", Timeout.FAST, pb.ExtendRequest, pb.Empty)
PREPARE_RESTORE: Final = Call(
    "PrepareRestore", Timeout.SLOW, pb.PrepareRestoreRequest, pb.VmReportList
)
# SLOW: a libvirt domain is saved aside (its memory written) and the state's restored.
SWITCH: Final = Call("Switch", Timeout.SLOW, pb.ResumeRequest, pb.VmReportList)
STATES: Final = Call("States", Timeout.NORMAL, pb.Empty, pb.StateList)
STATE_SHOW: Final = Call("StateShow", Timeout.NORMAL, pb.StateRequest, pb.StateDetail)
# Slow: a deep check hashes the guests' RAM.
VERIFY_STATE: Final = Call("VerifyState", Timeout.SLOW, pb.VerifyStateRequest, pb.VerifyStateReply)
STATE_FRAMES: Final = Call(
    "StateFrames", Timeout.SLOW, pb.StateFramesRequest, pb.FileChunk, stream=True
)
STATE_DELETE: Final = Call("StateDelete", Timeout.NORMAL, pb.StateRequest, pb.StateDeleteReply)
# A QMP stop or cont, or one nft run.
INJECT_FAULT: Final = Call("InjectFault", Timeout.NORMAL, pb.FaultRequest, pb.FaultReply)

# The one table of calls, by gRPC method.
CALLS: Final[Mapping[str, Call[Any, Any]]] = MappingProxyType(
    {
        call.method: call
        for call in (
            PROBE,
            PROBE_KEY,
            UP,
            DOWN,
            STATUS,
            PAUSE,
            SAVE_MEMORY,
            DRAIN,
            RESUME,
            STOP,
            COMMIT,
            ABORT,
            EXTEND,
            PREPARE_RESTORE,
            SWITCH,
            STATES,
            STATE_SHOW,
            VERIFY_STATE,
            STATE_FRAMES,
            STATE_DELETE,
            INJECT_FAULT,
        )
    }
)
