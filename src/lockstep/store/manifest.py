"""The manifest: what one host holds of a state, written as ``manifest.json``.

A state directory is only trusted through its manifest: the manifest says which
VMs the state has, which qcow2 layer froze each of their disks (and the chain under
it), which files hold memory and held frames, and the size and sha256 of every
file, so a state can be verified before it is restored. The model is strict
(frozen, unknown keys refused) so a manifest from a newer or broken writer fails
loudly instead of being half understood; ``extra`` is the room for later fields.

File names in a manifest reach paths, so every part of them is checked with
:func:`lockstep.group.validate_name` (no ``..``, no absolute paths).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lockstep.errors import StoreError
from lockstep.group import validate_name

__all__ = [
    "MANIFEST_FILE",
    "DiskRecord",
    "FileRecord",
    "Manifest",
    "VmRecord",
    "check_relpath",
    "parse_utc",
    "utc_now",
]

MANIFEST_FILE = "manifest.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_relpath(value: str) -> str:
    """Return ``value`` if it is a safe relative file path inside a state directory.

    Every ``/``-separated part must be a valid name, so ``..``, ``.``, empty
    parts and absolute paths are refused, and ``manifest.json`` is reserved.

    Raises:
        ValueError: the path is not allowed (the message says why).
    """
    if not value or value.startswith("/") or "\\" in value:
        raise ValueError(f"file name {value!r} is not a relative path inside the state")
    for part in value.split("/"):
        validate_name("file", part)
    if value == MANIFEST_FILE:
        raise ValueError(f"file name {value!r} is reserved for the state's manifest")
    return value


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string, as manifests record it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_utc(value: str) -> datetime:
    """Parse an ISO 8601 time that must be in UTC.

    Raises:
        ValueError: the text is not ISO 8601, or names no time zone, or not UTC.
    """
    when = datetime.fromisoformat(value)
    if when.utcoffset() != timedelta(0):
        raise ValueError(f"{value!r} is not a UTC time (end it with 'Z' or '+00:00')")
    return when


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRecord(_Model):
    """Size and sha256 of one file of a state, taken when it was committed."""

    size: int = Field(ge=0)
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _SHA256.match(v):
            raise ValueError(f"{v!r} is not a sha256 (64 lowercase hex digits)")
        return v


class DiskRecord(_Model):
    """One disk of a VM in a state: the image it froze at, as a base and lockstep's layers.

    ``chain`` lists layer ids above ``base``, oldest first; the last is the
    layer the state froze (:attr:`layer`). An empty chain froze ``base`` itself:
    a libvirt domain's disk as its user made it, which the domain stopped
    writing when its first state was saved. ``target`` names the disk to the
    guest (``vda``, ``sdb``...).
    """

    target: str
    base: str
    chain: list[str] = Field(default_factory=list)

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        return validate_name("disk", v)

    @field_validator("chain")
    @classmethod
    def _chain(cls, v: list[str]) -> list[str]:
        for layer in v:
            validate_name("layer", layer)
        if len(set(v)) != len(v):
            raise ValueError("a layer appears twice in the chain")
        return v

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        if not Path(v).is_absolute():
            raise ValueError(f"base image {v!r} is not an absolute path")
        return v

    @property
    def layer(self) -> str | None:
        """The layer the state froze (None: it froze ``base`` itself)."""
        return self.chain[-1] if self.chain else None


class VmRecord(_Model):
    """One VM of a state on this host: its frozen disks, spec, memory and frames.

    ``disks`` are the disks the state keeps, in the VM's order; ``skipped`` the
    disks it left alone, by target, with why (read-only, shared storage...).
    ``spec`` is the VM's spec, opaque to the store. A VM without a disk
    (booted from a kernel alone) has none. ``memory`` is the migration stream
    (a libvirt domain's: libvirt's save image); ``ram`` the guest's RAM image
    when the fast memory path saved it (the stream then holds only device
    state). A record written before VMs had several disks (``layer``,
    ``chain``, ``base``) reads as one disk ``vda``.
    """

    disks: list[DiskRecord] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict)
    spec: dict[str, Any] = Field(default_factory=dict)
    memory: str | None = None
    ram: str | None = None
    frames: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _one_disk(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not {"layer", "chain", "base"} & set(data):
            return data
        rest = {k: v for k, v in data.items() if k not in ("layer", "chain", "base")}
        layer, chain, base = data.get("layer"), data.get("chain") or [], data.get("base")
        if layer is None:
            if chain or base is not None:
                raise ValueError("a VM without a layer has no chain and no base image")
            return rest
        if not isinstance(chain, list) or not chain or chain[-1] != layer:
            raise ValueError(f"the chain must end with the state's layer {layer!r}")
        if base is None:
            raise ValueError(f"layer {layer!r} needs the base image its chain sits on")
        return {**rest, "disks": [{"target": "vda", "base": base, "chain": chain}]}

    @field_validator("memory", "ram")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        return None if v is None else check_relpath(v)

    @field_validator("frames")
    @classmethod
    def _frames(cls, v: list[str]) -> list[str]:
        return [check_relpath(f) for f in v]

    @model_validator(mode="after")
    def _disks(self) -> VmRecord:
        targets = [d.target for d in self.disks] + list(self.skipped)
        if len(set(targets)) != len(targets):
            raise ValueError("a disk appears twice")
        return self

    @property
    def layers(self) -> list[str]:
        """Every layer id this VM's disks stand on, disk after disk."""
        return [layer for d in self.disks for layer in d.chain]

    def own_files(self) -> list[str]:
        """The state files this VM needs: its memory files and its frame files."""
        return [f for f in (self.memory, self.ram) if f] + list(self.frames)


class Manifest(_Model):
    """What one host holds of a state; ``complete`` only once committed."""

    name: str
    group: str
    host: str
    created_at: str
    parent: str | None = None
    vms: dict[str, VmRecord] = Field(default_factory=dict)
    files: dict[str, FileRecord] = Field(default_factory=dict)
    complete: bool = False
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name", "parent")
    @classmethod
    def _state(cls, v: str | None) -> str | None:
        return None if v is None else validate_name("state", v)

    @field_validator("group")
    @classmethod
    def _group(cls, v: str) -> str:
        return validate_name("group", v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return validate_name("host", v)

    @field_validator("created_at")
    @classmethod
    def _created_at(cls, v: str) -> str:
        parse_utc(v)
        return v

    @field_validator("vms")
    @classmethod
    def _vms(cls, v: dict[str, VmRecord]) -> dict[str, VmRecord]:
        for vm in v:
            validate_name("VM", vm)
        return v

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, FileRecord]) -> dict[str, FileRecord]:
        for rel in v:
            check_relpath(rel)
        return v

    @property
    def created(self) -> datetime:
        """``created_at`` as an aware datetime (for sorting and display)."""
        return parse_utc(self.created_at)

    def layers(self) -> set[str]:
        """The layers this state froze (one per layered disk); deleting it may free them."""
        return {d.layer for vm in self.vms.values() for d in vm.disks if d.layer is not None}

    def chains(self) -> dict[str, list[str]]:
        """The layer ids each VM's disks stand on, by VM name (VMs on no layer left out)."""
        return {name: vm.layers for name, vm in self.vms.items() if vm.layers}

    def to_json(self) -> str:
        """The manifest as the JSON text of ``manifest.json``."""
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = MANIFEST_FILE) -> Manifest:
        """Parse a manifest; ``source`` names it in errors.

        Raises:
            StoreError: the text is not JSON or not a valid manifest (one sentence
                naming ``source``, the field and what is wrong).
        """
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "json_invalid":
                msg = f"is not valid JSON ({err.get('ctx', {}).get('error', msg)})"
                where = ""
            elif err["type"] == "extra_forbidden":
                msg = "is not a known field"
            elif err["type"] == "missing":
                msg = "is missing"
            detail = f"{where}: {msg}" if where else msg
            raise StoreError(f"state manifest {source} is corrupt: {detail}") from exc
