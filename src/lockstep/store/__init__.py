"""lockstep.store: the states kept on one host (pure file management, no QEMU).

Imports only ``errors`` and ``group``; the execd composes it with ``disk``.
"""

from lockstep.store.manifest import (
    MANIFEST_FILE,
    DiskRecord,
    FileRecord,
    Manifest,
    VmRecord,
    check_relpath,
    parse_utc,
    utc_now,
)
from lockstep.store.store import Staging, StagingState, StateStore, Verified

__all__ = [
    "MANIFEST_FILE",
    "DiskRecord",
    "FileRecord",
    "Manifest",
    "Staging",
    "StagingState",
    "StateStore",
    "Verified",
    "VmRecord",
    "check_relpath",
    "parse_utc",
    "utc_now",
]
