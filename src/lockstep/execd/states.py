"""The states one execd holds, as the caller asks about them: list, show, frames, verify, delete."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lockstep import disk
from lockstep.errors import StateNotFound, StoreError
from lockstep.execd.host import Host
from lockstep.execd.model import StateInfo
from lockstep.execd.save import state_info
from lockstep.group import validate_name
from lockstep.store import Verified

__all__ = ["StateCatalog"]

_CHUNK = 1 << 20  # bytes per piece when a state's file is sent


class StateCatalog:
    """Queries and deletion of this host's committed states."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._lock = asyncio.Lock()

    def listed(self) -> list[StateInfo]:
        """The committed states on this host, oldest first."""
        return [state_info(m) for m in self.host.store.list()]

    def show(self, name: str) -> dict[str, Any]:
        """One state's manifest as JSON-ready data.

        Raises:
            StateNotFound: no such state here.
        """
        data: dict[str, Any] = json.loads(self.host.store.show(name).to_json())
        return data

    async def verify(self, name: str, deep: bool) -> Verified:
        """Check every file of state ``name`` against its manifest (on a worker thread).

        Sizes always; the hashes of device state and frames always, of the
        guests' RAM with ``deep``.

        Raises:
            StateDamaged: a file is missing or not as committed (host, VM and file named).
            StateNotFound: no such state here.
        """
        validate_name("state", name)
        return await asyncio.to_thread(self.host.store.verify, name, deep=deep)

    def frames(self, name: str, vm: str) -> Iterator[tuple[str, bytes]]:
        """The frames held for ``vm`` in state ``name``: its NICs' pcap files, in chunks.

        Yields (file name, chunk) pairs, file after file in NIC order; a file
        with no frame still yields its pcap header.

        Raises:
            StateNotFound: no such state here, or the state holds no VM ``vm`` here.
        """
        validate_name("state", name)
        manifest = self.host.store.show(name)
        rec = manifest.vms.get(vm)
        if rec is None:
            raise StateNotFound(
                f"state {name!r} on host {self.host.name} has no VM {vm!r}"
                f" (it has {', '.join(sorted(manifest.vms)) or 'none'})"
            )
        return _file_chunks([self.host.store.states_dir / name / f for f in rec.frames])

    async def delete(self, name: str) -> list[str]:
        """Delete a state nothing depends on; return the layer ids removed.

        Raises:
            StateNotFound: no such state here.
            StateInUse: another state or a VM depends on its layers.
        """
        async with self._lock:
            garbage = self.host.store.delete(name, self.host.chains_in_use())
            for layer in garbage:
                disk.remove_layer(disk.layer_path(self.host.store.layers_dir, layer))
            return sorted(garbage)


def _file_chunks(paths: Sequence[Path]) -> Iterator[tuple[str, bytes]]:
    """(file name, chunk) pairs of ``paths``, read ``_CHUNK`` bytes at a time.

    Raises:
        StoreError: a file cannot be read (the state is damaged).
    """
    for path in paths:
        try:
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    yield path.name, chunk
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
