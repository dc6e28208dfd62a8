"""The state store of one host: committed states, states being written, their layers.

Layout under the execd's root::

    root/layers/<layer-id>.qcow2   every qcow2 layer made here (the store only names the folder)
    root/states/<name>/            committed states: manifest.json + memory and frame files
    root/staging/<name>.<token>/   a state being written, or one being deleted

Crash safety comes from one rule: a state becomes visible only by one
``os.rename`` of a finished staging directory (files fsynced, manifest written
and fsynced) to ``states/<name>``, and disappears only by one ``os.rename`` back
into ``staging/`` before it is removed. So ``states/`` never holds a half-written
or half-deleted state; whatever a crash leaves in ``staging/`` is dropped by
:meth:`StateStore.cleanup_staging` when the execd starts again.

The store is plain file management and knows nothing of QEMU: it records layer
ids, refuses to delete a state whose layers others still use, and tells the
caller which layers became garbage; the execd removes those files (``disk/``).
Its methods block (hashing a memory file reads all of it); the execd runs them
in a worker thread.
"""

from __future__ import annotations

import builtins
import enum
import errno
import hashlib
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lockstep.errors import StateDamaged, StateExists, StateInUse, StateNotFound, StoreError
from lockstep.group import validate_name
from lockstep.store.manifest import MANIFEST_FILE, FileRecord, Manifest, check_relpath

__all__ = ["Staging", "StagingState", "StateStore", "Verified"]

_DELETING = "deleting"


def _state_name(name: str) -> str:
    try:
        return validate_name("state", name)
    except ValueError as exc:
        raise StoreError(str(exc)) from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _exists(root: Path, name: str) -> StateExists:
    return StateExists(
        f"state {name!r} already exists in {root}; choose another name"
        f" or `lockstep state delete {name}`"
    )


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in sorted(names))


def _hash_file(path: Path, *, sync: bool) -> FileRecord:
    """Size and sha256 of ``path``; with ``sync`` its data is also forced to disk."""
    with path.open("rb") as f:
        if sync:
            os.fsync(f.fileno())
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        size = f.tell()
    return FileRecord(size=size, sha256=digest)


def _walk(folder: Path) -> tuple[list[str], list[Path]]:
    """Relative paths of the regular files under ``folder`` (not the manifest), and its dirs.

    Raises:
        StoreError: something under ``folder`` is neither a regular file nor a
            directory (a symlink could point outside the store).
    """
    files: list[str] = []
    dirs: list[Path] = [folder]
    for top, subdirs, names in os.walk(folder):
        here = Path(top)
        for name in subdirs:
            if (here / name).is_symlink():
                raise StoreError(f"{here / name} is a symlink; a state holds only plain files")
            dirs.append(here / name)
        for name in names:
            path = here / name
            if path.is_symlink() or not path.is_file():
                raise StoreError(f"{path} is not a plain file; a state holds only plain files")
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST_FILE:
                files.append(rel)
    return sorted(files), dirs


@dataclass(frozen=True)
class Verified:
    """A state's files checked: how many, how many bytes were hashed, in how many seconds."""

    files: int
    hashed_bytes: int
    seconds: float


def _roles(manifest: Manifest) -> dict[str, tuple[str, str, bool]]:
    """Each file of a state: (its VM, what it is, whether its hash is checked every time).

    The guest's RAM (a RAM image, or a standard migration stream, which
    carries the RAM) is hashed only on a deep check: it can be gigabytes.
    """
    roles: dict[str, tuple[str, str, bool]] = {}
    for vm, rec in manifest.vms.items():
        if rec.memory is not None:
            fast = rec.ram is not None
            roles[rec.memory] = (vm, "device state" if fast else "memory stream", fast)
        if rec.ram is not None:
            roles[rec.ram] = (vm, "RAM image", False)
        for frames in rec.frames:
            roles[frames] = (vm, "held frames", True)
    return roles


class StagingState(enum.Enum):
    """Lifecycle of a :class:`Staging`: OPEN → COMMITTED, or OPEN → ABORTED."""

    OPEN = "open"
    COMMITTED = "committed"
    ABORTED = "aborted"


class Staging:
    """A state being written: files go in :attr:`path`; :meth:`commit` makes it visible.

    Made by :meth:`StateStore.begin`, never directly. After a commit, ``path``
    is the committed state's folder.
    """

    def __init__(self, store: StateStore, name: str, path: Path) -> None:
        self._store = store
        self.name = name
        self.path = path
        self.state = StagingState.OPEN

    def __repr__(self) -> str:
        return f"<Staging {self.name!r} {self.state.value} at {self.path}>"

    def _require_open(self, action: str) -> None:
        if self.state is not StagingState.OPEN:
            raise StoreError(
                f"cannot {action} state {self.name!r}: its staging {self.path} is"
                f" {self.state.value} already"
            )

    def file(self, relname: str) -> Path:
        """The path of file ``relname`` in the staging dir (its parent folders made).

        Raises:
            StoreError: ``relname`` is not a safe relative name (``..``, absolute,
                empty, ``manifest.json``), leads outside the staging dir, or the
                staging is no longer open.
        """
        self._require_open("write to")
        try:
            rel = check_relpath(relname)
        except ValueError as exc:
            raise StoreError(f"state {self.name!r}: {exc}") from exc
        path = self.path / rel
        if not _inside(path, self.path):
            raise StoreError(f"state file {relname!r} leads outside staging {self.path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot make folder {path.parent}: {exc.strerror}") from exc
        return path

    def commit(self, manifest: Manifest) -> Manifest:
        """Record every file, write the manifest and make the state visible atomically.

        ``manifest`` is the state as the caller knows it; its ``files`` and
        ``complete`` are replaced by what is actually in the staging dir. Every
        file and the manifest are fsynced before the one rename to
        ``states/<name>``; the states folder is fsynced after it.

        Raises:
            StateExists: a state of that name appeared meanwhile; the staging is
                left as it was, for :meth:`abort`.
            StoreError: the manifest is for another state, a memory or frame file
                it names is missing, the staging holds something other than plain
                files, or the disk refused a read, write or rename.
        """
        self._require_open("commit")
        if manifest.name != self.name:
            raise StoreError(
                f"cannot commit a manifest for state {manifest.name!r} as state {self.name!r}"
            )
        target = self._store.states_dir / self.name
        try:
            rels, dirs = _walk(self.path)
            missing = [
                f"{vm}: {f}"
                for vm, rec in manifest.vms.items()
                for f in rec.own_files()
                if f not in rels
            ]
            if missing:
                raise StoreError(
                    f"cannot commit state {self.name!r}: files named in its manifest are missing"
                    f" from {self.path} ({'; '.join(missing)})"
                )
            files = {rel: _hash_file(self.path / rel, sync=True) for rel in rels}
            final = Manifest.model_validate(
                {**manifest.model_dump(), "files": files, "complete": True}
            )
            with (self.path / MANIFEST_FILE).open("w", encoding="utf-8") as f:
                f.write(final.to_json())
                f.flush()
                os.fsync(f.fileno())
            for d in dirs:
                _fsync_dir(d)
            if target.exists() or target.is_symlink():
                raise _exists(self._store.root, self.name)
            try:
                os.rename(self.path, target)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise _exists(self._store.root, self.name) from exc
                raise
            self.state = StagingState.COMMITTED
            self.path = target
            _fsync_dir(self._store.states_dir)
        except OSError as exc:
            where = exc.filename or self.path
            raise StoreError(
                f"cannot commit state {self.name!r} at {where}: {exc.strerror}"
            ) from exc
        return final

    def abort(self) -> None:
        """Drop everything written to the staging dir; a second call does nothing.

        After a commit this does nothing either: the state is committed.

        Raises:
            StoreError: the staging dir could not be removed.
        """
        if self.state is not StagingState.OPEN:
            return
        self.state = StagingState.ABORTED
        try:
            shutil.rmtree(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot remove staging {self.path}: {exc.strerror}") from exc


class StateStore:
    """The states kept on one host, under ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        """Open (and create if needed) the store at ``root``.

        Raises:
            StoreError: the folders cannot be made.
        """
        self.root = root.absolute()
        for folder in (self.layers_dir, self.states_dir, self.staging_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot make state store folder {folder}: {exc.strerror}"
                ) from exc

    def __repr__(self) -> str:
        return f"<StateStore at {self.root}>"

    @property
    def layers_dir(self) -> Path:
        """Where every qcow2 layer of this host lives."""
        return self.root / "layers"

    @property
    def states_dir(self) -> Path:
        """Where committed states live, one folder each."""
        return self.root / "states"

    @property
    def staging_dir(self) -> Path:
        """Where states are written (and deleted) before they (dis)appear."""
        return self.root / "staging"

    def _state_dir(self, name: str) -> Path:
        path = self.states_dir / _state_name(name)
        if not _inside(path, self.states_dir):
            raise StoreError(f"state {name!r} leads outside {self.states_dir}")
        return path

    def begin(self, name: str) -> Staging:
        """Start writing state ``name``: a fresh staging dir no one else uses.

        Raises:
            StoreError: ``name`` is not a valid state name, or the staging dir
                cannot be made.
            StateExists: a state of that name is already committed here.
        """
        target = self._state_dir(name)
        if target.exists() or target.is_symlink():
            raise _exists(self.root, name)
        path = self.staging_dir / f"{name}.{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except OSError as exc:
            raise StoreError(f"cannot make staging {path}: {exc.strerror}") from exc
        return Staging(self, name, path)

    def _read(self, name: str) -> Manifest:
        """The committed manifest of ``name``.

        Raises:
            StoreError: invalid name.
            StateNotFound: no such state, or its manifest is missing, corrupt,
                for another state, or not complete.
        """
        folder = self._state_dir(name)
        source = folder / MANIFEST_FILE
        try:
            text = source.read_bytes()
        except FileNotFoundError as exc:
            if folder.is_dir():
                raise StateNotFound(
                    f"state {name!r} in {self.root} is not complete (it has no manifest)"
                ) from exc
            raise StateNotFound(f"no state {name!r} in {self.root}") from exc
        except OSError as exc:
            raise StateNotFound(
                f"state {name!r} in {self.root} cannot be read: {exc.strerror}"
            ) from exc
        try:
            manifest = Manifest.from_json(text, str(source))
        except StoreError as exc:
            raise StateNotFound(f"state {name!r} in {self.root} is not usable: {exc}") from exc
        if manifest.name != name:
            raise StateNotFound(
                f"state {name!r} in {self.root} is not usable: its manifest is for"
                f" state {manifest.name!r}"
            )
        if not manifest.complete:
            raise StateNotFound(f"state {name!r} in {self.root} is not complete")
        return manifest

    def list(self) -> list[Manifest]:
        """Every committed, complete state here, oldest first.

        Folders that are not valid states (bad names, missing or corrupt
        manifests) are skipped; :meth:`show` says what is wrong with one.

        Raises:
            StoreError: the states folder cannot be read.
        """
        try:
            names = sorted(p.name for p in self.states_dir.iterdir())
        except OSError as exc:
            raise StoreError(f"cannot list states in {self.states_dir}: {exc.strerror}") from exc
        found = []
        for name in names:
            try:
                found.append(self._read(name))
            except StoreError:
                continue
        return sorted(found, key=lambda m: (m.created, m.name))

    def show(self, name: str) -> Manifest:
        """The manifest of committed state ``name``.

        Raises:
            StoreError: ``name`` is not a valid state name.
            StateNotFound: there is no such state here, or it is not complete or
                its manifest is corrupt (the message names this store's root).
        """
        return self._read(name)

    def verify(self, name: str, *, deep: bool = True) -> Verified:
        """Check that state ``name`` still has exactly the files it was committed with.

        Every file's size is checked, and the sha256 of its device state (the
        fast path's migration stream), frames and other small files; with
        ``deep`` also of the guest's RAM (the fast path's RAM image, or the
        standard path's whole migration stream): gigabytes to read.

        Raises:
            StateDamaged: the first file that is missing, has another size or
                checksum, or was not committed with the state; the sentence
                names the host, the VM and the file.
            StoreError: invalid name.
            StateNotFound: as :meth:`show`.
        """
        manifest = self._read(name)
        folder = self._state_dir(name)
        roles = _roles(manifest)
        started = time.monotonic()
        hashed = 0

        def damaged(rel: str, what: str) -> StateDamaged:
            vm, role, _ = roles.get(rel, (None, "file", True))
            owner = f"VM {vm}'s {role}" if vm else role
            return StateDamaged(
                f"state {name!r} on host {manifest.host} is damaged: {owner} {folder / rel}"
                f" {what}; nothing was changed (restore another state, or save this one again)"
            )

        try:
            present, _ = _walk(folder)
            for rel, want in sorted(manifest.files.items()):
                path = folder / rel
                if rel not in present:
                    raise damaged(rel, "is missing")
                size = path.stat().st_size
                if size != want.size:
                    raise damaged(rel, f"has {size} bytes, not the {want.size} committed")
                if deep or roles.get(rel, (None, "", True))[2]:
                    got = _hash_file(path, sync=False)
                    hashed += got.size
                    if got.sha256 != want.sha256:
                        raise damaged(rel, "does not match its checksum")
            for rel in present:
                if rel not in manifest.files:
                    raise damaged(rel, "was not committed with the state")
        except OSError as exc:
            raise StoreError(
                f"state {name!r}: cannot read {exc.filename or folder}: {exc.strerror}"
            ) from exc
        return Verified(len(manifest.files), hashed, time.monotonic() - started)

    def delete(
        self, name: str, active_chains: Mapping[str, Sequence[str]] | None = None
    ) -> builtins.list[str]:
        """Delete state ``name`` and return the layer ids no one uses any more.

        ``active_chains`` maps each VM the host holds (a running one, or a
        libvirt domain shut off on its layers) to its chain of layer ids. The
        deletion is refused while another state's chain or a VM's chain uses
        a layer this state froze. The returned layers (from this state's
        chains, used by no remaining state and no VM) are garbage: the
        caller removes their files. A state whose manifest is unreadable is
        deleted too, but frees no layers (its chains are unknown).

        Raises:
            StoreError: invalid name, or the folder could not be removed.
            StateNotFound: there is no such state here.
            StateInUse: other states or running VMs use its layers (the message
                names them).
        """
        folder = self._state_dir(name)
        if not folder.is_dir() or folder.is_symlink():
            raise StateNotFound(f"no state {name!r} in {self.root}")
        try:
            manifest: Manifest | None = self._read(name)
        except StateNotFound:
            manifest = None
        garbage: set[str] = set()
        if manifest is not None:
            others = [m for m in self.list() if m.name != name]
            active = active_chains or {}
            own = manifest.layers()
            states = {m.name for m in others for chain in m.chains().values() if own & set(chain)}
            vms = {vm for vm, chain in active.items() if own & set(chain)}
            blockers = [
                (f"{kind} {_quoted(names)}", todo)
                for kind, names, todo in (
                    ("states", states, "delete those states"),
                    ("VMs", vms, "stop those VMs or restore another state into them"),
                )
                if names
            ]
            if blockers:
                who = " and ".join(b[0] for b in blockers)
                todo = " and ".join(b[1] for b in blockers)
                raise StateInUse(
                    f"state {name!r} cannot be deleted: {who} depend on its disk layers;"
                    f" {todo} first"
                )
            kept = {layer for m in others for chain in m.chains().values() for layer in chain}
            kept.update(layer for chain in active.values() for layer in chain)
            garbage = {layer for chain in manifest.chains().values() for layer in chain} - kept
        self._remove(name, folder)
        return sorted(garbage)

    def forget(self, name: str) -> None:
        """Remove state ``name``'s record and files but none of its disk layers.

        This undoes a commit whose group operation failed on another host: the
        state must not be listed, while VMs may run on top of its layers (they
        stay as plain links of those VMs' chains).

        Raises:
            StoreError: invalid name, or the folder could not be removed.
            StateNotFound: there is no such state here.
        """
        folder = self._state_dir(name)
        if not folder.is_dir() or folder.is_symlink():
            raise StateNotFound(f"no state {name!r} in {self.root}")
        self._remove(name, folder)

    def _remove(self, name: str, folder: Path) -> None:
        # Move it out of states/ in one rename, so a crash never leaves half a state.
        doomed = self.staging_dir / f"{name}.{secrets.token_hex(4)}.{_DELETING}"
        try:
            os.rename(folder, doomed)
            _fsync_dir(self.states_dir)
            shutil.rmtree(doomed)
        except OSError as exc:
            raise StoreError(
                f"cannot delete state {name!r} at {exc.filename or folder}: {exc.strerror}"
            ) from exc

    def cleanup_staging(self) -> builtins.list[Path]:
        """Remove every leftover staging dir (states half written or half deleted).

        Call it only when no :class:`Staging` is open: at execd start, after a crash.

        Raises:
            StoreError: a leftover could not be removed.
        """
        removed = []
        try:
            for path in sorted(self.staging_dir.iterdir()):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
        except OSError as exc:
            raise StoreError(
                f"cannot clean up staging at {exc.filename or self.staging_dir}: {exc.strerror}"
            ) from exc
        return removed
