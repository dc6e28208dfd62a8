"""The one error tree of lockstep.

Every error a user can see is a :class:`LockstepError` whose message is one
sentence saying what failed, where, and (when it helps) what to do. Errors from
lower layers (OSError, qemu.qmp, grpc, pyroute2, pydantic) are translated at the
boundary where they occur and kept as ``__cause__`` (``raise X(...) from exc``).
Cancellation (``asyncio.CancelledError``) is never caught or translated.

::

    LockstepError
     ├── ConfigError            bad group file, execd config or option value
     │    └── InvalidName       a name that could reach a path or command line (a ValueError too)
     ├── CommandError           an external command exited non-zero or could not start
     ├── VmError                a QEMU process or libvirt domain, from start to quit
     │    ├── QemuStartError    QEMU exited or failed to open QMP while starting
     │    ├── QmpError          a QMP command failed or the connection broke
     │    ├── LibvirtError      libvirt refused or failed a call (or is not there)
     │    ├── VmStateError      a VM method was called in the wrong lifecycle state
     │    └── GuestAgentError   the QEMU guest agent in a VM refused or did not answer
     ├── NetError               taps, bridges, namespaces, the freeze
     ├── DiskError              qcow2 layers
     ├── StoreError             the state store on one host
     │    ├── StateNotFound     no such state (or not complete) here
     │    ├── StateExists       a state of that name is already here
     │    ├── StateInUse        other states or running VMs depend on it
     │    └── StateDamaged      a file of the state is missing or not as committed
     ├── LabError               the embedded lab
     │    └── ImageBuildError   building the guest image failed
     ├── RpcError               talking to an execd
     │    ├── HostUnreachable   no connection could be made (or TLS refused)
     │    ├── HostTimeout       the host did not answer in time
     │    └── RemoteError       the execd refused or failed a call (host, kind, status code)
     ├── ClockError             clock sync could not meet the skew budget
     ├── OperationFailed        a group operation failed and was rolled back
     └── OperationError         (lockstep.execd.ops) an execd step asked out of order
"""

from __future__ import annotations


class LockstepError(Exception):
    """Base of every error lockstep raises on purpose; its message is for the user."""


class ConfigError(LockstepError):
    """A group file, execd config or option is invalid."""


class InvalidName(ConfigError, ValueError):
    """A state, VM, host, network, group or operation name that is not allowed.

    Names reach file paths and command lines, so every place one enters (group
    file, CLI argument, RPC field, manifest) checks it. It is a ``ValueError``
    too, so pydantic validators and ``except ValueError`` treat it as bad input.
    """


class CommandError(LockstepError):
    """An external command failed; carries its argv, exit status and stderr."""

    def __init__(self, message: str, argv: list[str], returncode: int | None, stderr: str) -> None:
        super().__init__(message)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class VmError(LockstepError):
    """A QEMU process could not be driven as asked."""


class QemuStartError(VmError):
    """QEMU exited, or did not offer QMP, while starting; message holds QEMU's stderr."""


class QmpError(VmError):
    """A QMP command failed, or the QMP connection broke."""


class LibvirtError(VmError):
    """libvirt refused or failed a call on a domain, or could not be reached."""


class VmStateError(VmError):
    """A VM method was called while the VM was in a state that does not allow it."""


class GuestAgentError(VmError):
    """The QEMU guest agent (qemu-ga) in a VM refused a command, or did not answer in time."""


class NetError(LockstepError):
    """A tap, bridge, namespace or freeze operation failed."""


class DiskError(LockstepError):
    """A qcow2 layer could not be created, inspected or removed."""


class StoreError(LockstepError):
    """The state store on a host refused or failed an operation."""


class StateNotFound(StoreError):
    """No complete state of that name exists in this store."""


class StateExists(StoreError):
    """A state of that name already exists in this store."""


class StateDamaged(StoreError):
    """A file of a state is missing, or its size or checksum is not what was committed."""


class StateInUse(StoreError):
    """The state cannot be deleted: other states or VMs depend on its layers."""


class LabError(LockstepError):
    """The embedded lab could not be brought up, inspected or taken down."""


class ImageBuildError(LabError):
    """Building the lab's guest image failed."""


class RpcError(LockstepError):
    """A call to an execd failed."""


class HostUnreachable(RpcError):
    """No (TLS) connection to the execd could be made."""


class HostTimeout(RpcError):
    """The execd did not answer within the call's timeout."""


class RemoteError(RpcError):
    """The execd answered with an error of its own; the message is the remote's.

    ``host`` is the execd's host name, ``kind`` the class name of the execd's error
    (``"StateNotFound"``; empty if unknown) and ``code`` the gRPC status code's
    name (``"NOT_FOUND"``; None when the reply was malformed rather than refused).
    """

    def __init__(
        self, message: str, *, host: str = "", kind: str = "", code: str | None = None
    ) -> None:
        super().__init__(message)
        self.host = host
        self.kind = kind
        self.code = code


class ClockError(LockstepError):
    """Clock synchronisation could not meet the skew budget."""


class OperationFailed(LockstepError):
    """A group operation failed on some host and was rolled back everywhere."""
