"""The caller <-> execd transport: gRPC over mutual TLS.

One concern per module, re-exported here (import from ``lockstep.rpc``):

- :mod:`~lockstep.rpc.calls`: the call table, every RPC declared once (:data:`CALLS`);
- :mod:`~lockstep.rpc.tls`: the group's CA, certificates, gRPC credentials;
- :mod:`~lockstep.rpc.server`: the execd side, a thin adapter over ``ExecdApi``;
- :mod:`~lockstep.rpc.client`: the caller side, :class:`HostClient`;
- :mod:`~lockstep.rpc.probe`: the light clock-probe path beside gRPC (UDP, keyed);
- :mod:`~lockstep.rpc.convert`: dataclasses <-> protobuf messages;
- ``lockstep.rpc.generated``: code generated from ``proto/lockstep/v1/execd.proto``
  (``python -m lockstep.rpc.gen`` regenerates it).

Nothing here knows about VMs; nothing here imports the caller or the CLI.
"""

from lockstep.rpc.calls import CALLS, Call, ServedBy, Timeout
from lockstep.rpc.client import HostClient
from lockstep.rpc.convert import ERROR_KIND_KEY
from lockstep.rpc.probe import ProbeKey, ProbeResponder, UdpProbePath
from lockstep.rpc.server import (
    STATUS_FOR_ERROR,
    ExecdServer,
    ExecdServicer,
    serve,
    start_server,
)
from lockstep.rpc.tls import (
    CaFiles,
    CertFiles,
    CertKind,
    channel_credentials,
    issue,
    load_ca,
    make_ca,
    server_credentials,
)

__all__ = [
    "CALLS",
    "ERROR_KIND_KEY",
    "STATUS_FOR_ERROR",
    "CaFiles",
    "Call",
    "CertFiles",
    "CertKind",
    "ExecdServer",
    "ExecdServicer",
    "HostClient",
    "ProbeKey",
    "ProbeResponder",
    "ServedBy",
    "Timeout",
    "UdpProbePath",
    "channel_credentials",
    "issue",
    "load_ca",
    "make_ca",
    "serve",
    "server_credentials",
    "start_server",
]
