"""A crash-safe record of everything the lab made, so it can always be taken down.

The lab records each object *before* it creates it: if lockstep dies halfway
(killed, power cut), the ledger lists everything that may exist, and
``lockstep lab down`` removes exactly that, in reverse order, and nothing else.
An entry whose object was never made costs nothing at teardown: removal ignores
what is already gone.

The ledger is one JSON file (``$LOCKSTEP_STATE/lab/<lab>/ledger.json``, by default
under ``/var/lib/lockstep``)::

    {"format": 1, "entries": [
        {"kind": "netns", "name": "lslab-h1"},
        {"kind": "link", "name": "lan0", "netns": "lslab-h1"},
        {"kind": "process", "pid": 4242, "starttime": 123456, "what": "execd h1"},
        {"kind": "path", "path": "/var/lib/lockstep/lab/lslab/h1"}
    ]}

Every change rewrites the whole file (write a temporary file, fsync, rename,
fsync the folder), so a reader sees the old or the new list, never half of one.
Writers take an exclusive ``flock`` on the folder, so several processes (the CLI,
the execds it starts) can record into one ledger.

A process entry carries the process's start time (field 22 of
``/proc/<pid>/stat``, in clock ticks since boot): a pid the kernel has since
given to another process does not match, so that process is never signalled.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockstep.errors import LabError

__all__ = [
    "DEFAULT_STATE_DIR",
    "STATE_ENV",
    "Entry",
    "Ledger",
    "LinkEntry",
    "NetnsEntry",
    "PathEntry",
    "ProcessEntry",
    "lab_ledger_path",
    "process_starttime",
]

STATE_ENV = "LOCKSTEP_STATE"
DEFAULT_STATE_DIR = "/var/lib/lockstep"
_FORMAT = 1


@dataclass(frozen=True)
class NetnsEntry:
    """A named network namespace (``/run/netns/<name>``)."""

    name: str

    def describe(self) -> str:
        """Say what this is, for messages and lab_down's report."""
        return f"namespace {self.name}"


@dataclass(frozen=True)
class LinkEntry:
    """A network link, in the root namespace (``netns`` None) or a named one."""

    name: str
    netns: str | None = None

    def describe(self) -> str:
        """Say what this is, for messages and lab_down's report."""
        where = "the root namespace" if self.netns is None else f"namespace {self.netns}"
        return f"link {self.name} in {where}"


@dataclass(frozen=True)
class ProcessEntry:
    """A process the lab started; ``starttime`` tells it apart from a later pid reuse."""

    pid: int
    starttime: int
    what: str

    @classmethod
    def of(cls, pid: int, what: str) -> ProcessEntry:
        """Describe running process ``pid`` (read its start time now).

        Raises:
            LabError: there is no process ``pid``.
        """
        start = process_starttime(pid)
        if start is None:
            raise LabError(f"cannot record {what}: process {pid} is not running")
        return cls(pid=pid, starttime=start, what=what)

    def describe(self) -> str:
        """Say what this is, for messages and lab_down's report."""
        return f"process {self.pid} ({self.what})"

    def alive(self) -> bool:
        """Whether this very process (not a reuse of its pid) still runs (zombies do not)."""
        fields = _stat_fields(self.pid)
        return fields is not None and fields[0] != "Z" and int(fields[19]) == self.starttime


@dataclass(frozen=True)
class PathEntry:
    """A file or folder tree to delete at teardown (an absolute path, never ``/``)."""

    path: str

    def __post_init__(self) -> None:
        if not os.path.isabs(self.path) or os.path.normpath(self.path) == "/":
            raise LabError(f"a ledger path entry must be absolute and not '/', not {self.path!r}")

    def describe(self) -> str:
        """Say what this is, for messages and lab_down's report."""
        return f"path {self.path}"


Entry = NetnsEntry | LinkEntry | ProcessEntry | PathEntry


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None if there is no such process.

    The command name (field 2) may hold spaces and parentheses, so split after
    its last closing parenthesis.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_starttime(pid: int) -> int | None:
    """Start time of process ``pid`` (field 22 of /proc/pid/stat), or None if it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def entry_to_json(entry: Entry) -> dict[str, Any]:
    """The JSON object that stands for ``entry`` in the ledger file."""
    match entry:
        case NetnsEntry(name=name):
            return {"kind": "netns", "name": name}
        case LinkEntry(name=name, netns=netns):
            return {"kind": "link", "name": name, "netns": netns}
        case ProcessEntry(pid=pid, starttime=starttime, what=what):
            return {"kind": "process", "pid": pid, "starttime": starttime, "what": what}
        case PathEntry(path=path):
            return {"kind": "path", "path": path}


def entry_from_json(obj: object) -> Entry:
    """Read one entry of a ledger file.

    Raises:
        ValueError: ``obj`` is not a well-formed entry (the caller names the file).
    """
    if not isinstance(obj, dict):
        raise ValueError(f"an entry must be an object, not {obj!r}")
    kind = obj.get("kind")
    try:
        if kind == "netns":
            return NetnsEntry(name=_str(obj, "name"))
        if kind == "link":
            ns = obj.get("netns")
            if ns is not None and not isinstance(ns, str):
                raise ValueError(f"'netns' must be a string or null in {obj!r}")
            return LinkEntry(name=_str(obj, "name"), netns=ns)
        if kind == "process":
            return ProcessEntry(
                pid=_int(obj, "pid"), starttime=_int(obj, "starttime"), what=_str(obj, "what")
            )
        if kind == "path":
            return PathEntry(path=_str(obj, "path"))
    except LabError as exc:
        raise ValueError(str(exc)) from exc
    raise ValueError(f"unknown entry kind {kind!r}")


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key!r} must be a non-empty string in {obj!r}")
    return value


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{key!r} must be a positive integer in {obj!r}")
    return value


def lab_ledger_path(lab: str) -> Path:
    """Where the ledger of lab ``lab`` lives: ``$LOCKSTEP_STATE/lab/<lab>/ledger.json``."""
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR) / "lab" / lab / "ledger.json"


class Ledger:
    """The list of objects one lab made, kept in one JSON file (see the module doc)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)

    @classmethod
    def for_lab(cls, lab: str) -> Ledger:
        """The ledger of lab ``lab`` at its default place (:func:`lab_ledger_path`)."""
        return cls(lab_ledger_path(lab))

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    def __repr__(self) -> str:
        return f"Ledger({str(self._path)!r})"

    def exists(self) -> bool:
        """Whether the ledger file exists (a lab, or what is left of one, is recorded)."""
        return self._path.exists()

    def entries(self) -> list[Entry]:
        """Every recorded entry, oldest first; empty if there is no ledger.

        Raises:
            LabError: the file cannot be read or is not a ledger.
        """
        try:
            text = self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise LabError(f"cannot read the lab ledger {self._path}: {exc.strerror}") from exc
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ValueError(f"expected an object with format {_FORMAT}")
            raw = doc.get("entries")
            if not isinstance(raw, list):
                raise ValueError("'entries' must be a list")
            return [entry_from_json(item) for item in raw]
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise LabError(
                f"the lab ledger {self._path} is damaged ({exc}); "
                "remove what it lists by hand, then delete it"
            ) from exc

    def record(self, entry: Entry) -> None:
        """Append ``entry`` (unless it is already there); it is on disk when this returns.

        Raises:
            LabError: the ledger cannot be read or written.
        """
        self._update(lambda current: current if entry in current else [*current, entry])

    def forget(self, entry: Entry) -> None:
        """Drop ``entry``: its object turned out not to be ours (creating it found one there).

        Raises:
            LabError: the ledger cannot be read or written.
        """
        self._update(lambda current: [e for e in current if e != entry])

    def remove(self) -> None:
        """Delete the ledger file, and its lab folder if that is then empty.

        Raises:
            LabError: the file exists but cannot be deleted.
        """
        if not self._path.parent.is_dir():
            return
        with self._locked():
            try:
                self._path.unlink(missing_ok=True)
            except OSError as exc:
                raise LabError(
                    f"cannot delete the lab ledger {self._path}: {exc.strerror}"
                ) from exc
            with contextlib.suppress(OSError):  # not empty: others keep files there
                self._path.parent.rmdir()

    def _update(self, change: Callable[[list[Entry]], list[Entry]]) -> None:
        """Read, change and rewrite the entries under the lock (skip the write if unchanged)."""
        with self._locked():
            current = self.entries()
            changed = change(current)
            if changed != current:
                self._write(changed)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        folder = self._path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise LabError(f"cannot open the lab ledger folder {folder}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self, entries: list[Entry]) -> None:
        folder = self._path.parent
        doc = {"format": _FORMAT, "entries": [entry_to_json(e) for e in entries]}
        data = (json.dumps(doc, indent=1) + "\n").encode("utf-8")
        tmp = ""
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ledger-", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
            tmp = ""
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            why = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
            raise LabError(f"cannot write the lab ledger {self._path}: {why}") from exc
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
