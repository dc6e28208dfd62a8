"""The operations in progress on one execd, on disk (``run/ops/<op>.json``).

An operation's record is written before any VM pauses or any new VM starts,
and rewritten as it moves on (its phase, its deadline), so an execd restarted
in the middle finds it: the VMs it had paused resume at its deadline, and a
restore's new VMs are discarded or kept as its phase says. A record is removed
when the operation ends.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["Journal"]

log = logging.getLogger(__name__)


class Journal:
    """One JSON record per operation in progress, written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, op: str) -> Path:
        return self.folder / f"{op}.json"

    def write(self, op: str, record: dict[str, Any]) -> None:
        """Write (or replace) the record of operation ``op``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(op)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def remove(self, op: str) -> None:
        """Forget operation ``op`` (it ended)."""
        self._path(op).unlink(missing_ok=True)

    def records(self) -> list[dict[str, Any]]:
        """Every record on disk, oldest name first; unreadable ones are dropped with a warning."""
        out = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                out.append(record)
            except (ValueError, OSError) as exc:
                log.warning("dropping unreadable operation record %s: %s", path, exc)
                path.unlink(missing_ok=True)
        return out
