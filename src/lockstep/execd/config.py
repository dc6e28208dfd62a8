"""The execd's config file (TOML), validated into :class:`ExecdConfig`.

::

    host = "h1"                        # this host's name in the group
    root = "/var/lib/lockstep/h1"      # layers, states, runtime
    listen = "10.123.0.11:7443"
    [tls]                              # mandatory: mutual TLS only
    ca = "ca.pem"
    cert = "h1.pem"
    key = "h1.key"
    [frames]
    in_memory = 4096                   # per VM, then spilled to disk
    limit = 262144                     # per VM, then dropped and counted
    lead_ms = 20                       # NICs freeze this long before the VMs pause
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lockstep.errors import ConfigError
from lockstep.execd.model import ExecdConfig
from lockstep.group import HostSpec, TlsSpec, validate_name

__all__ = ["load_execd_config"]


class _Frames(BaseModel):
    model_config = ConfigDict(extra="forbid")
    in_memory: int = Field(default=4096, ge=0)
    limit: int = Field(default=262144, ge=1)
    lead_ms: float = Field(default=20.0, ge=0, le=1000)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str
    root: Path
    listen: str
    tls: TlsSpec
    frames: _Frames = Field(default_factory=_Frames)
    qemu_binary: str = "qemu-system-x86_64"


def load_execd_config(path: Path, *, clock_offset: float = 0.0) -> ExecdConfig:
    """Read and validate an execd config file; relative paths are from its folder.

    Raises:
        ConfigError: the file is missing, not TOML, or invalid (one sentence).
    """
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such execd config file") from exc
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read execd config: {exc}") from exc
    try:
        f = _File.model_validate(data)
        validate_name("host", f.host)
        HostSpec(address=f.listen)
    except (ValidationError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise ConfigError(f"{path}: {where}: {msg}") from exc
        raise ConfigError(f"{path}: {exc}") from exc
    base = path.resolve().parent

    def rel(p: Path) -> Path:
        return p if p.is_absolute() else base / p

    return ExecdConfig(
        host=f.host,
        root=rel(f.root),
        listen=f.listen,
        ca=rel(f.tls.ca),
        cert=rel(f.tls.cert),
        key=rel(f.tls.key),
        clock_offset=clock_offset,
        qemu_binary=f.qemu_binary,
        frames_in_memory=f.frames.in_memory,
        frames_limit=f.frames.limit,
        frames_lead=f.frames.lead_ms / 1000,
    )
