"""The group file: which hosts, networks and VMs make up a group (one config model).

A group file is TOML::

    name = "lab"
    guest_time = "true"         # after a restore, set the guests' wall clocks to true
                                # time ("true"), or keep the time saved ("saved")

    [tls]                       # the caller's credentials (``lockstep certs``)
    ca = "certs/ca.pem"
    cert = "certs/caller.pem"
    key = "certs/caller.key"

    [hosts.h1]
    address = "10.123.0.1:7443"  # where its lockstep-execd listens

    [networks.lan]
    bridge = "lsvm"             # the VM bridge on every host
    hold = "all"                # frozen NICs hold every frame; "group": only the
                                # group's own (others are counted, not held)

    [vms.p1]
    host = "h1"
    memory = "256M"
    memory_path = "auto"        # "fast", "standard" or "auto" (docs/memory.md)
    guest_time = "saved"        # this VM only (default: the group's)
    kernel = "/var/cache/lockstep/images/.../vmlinuz"
    initrd = ".../initrd.img"
    cmdline = "console=ttyS0 root=/dev/vda"
    disk = ".../rootfs.qcow2"   # the base image; never written
    nics = [{ network = "lan", mac = "52:54:00:12:00:01" }]

    [vms.p2]                    # several disks: each writable one is a layer of every state
    host = "h1"
    kernel = "..."
    disks = [".../rootfs.qcow2", ".../data.qcow2",
             { path = "/srv/iso/tools.iso", readonly = true },     # left alone
             { path = "/srv/shared.img", shareable = true }]       # left alone

    [vms.db1]                   # a libvirt domain (virsh, virt-manager...): nothing else needed
    host = "h2"
    driver = "libvirt"
    domain = "db1"              # the domain's name on its host (default: the VM's name)

A host's libvirt URI is ``libvirt = "qemu:///system"`` in its ``[hosts.NAME]``
table (that is the default).

Relative paths are taken from the group file's folder. Every mistake is reported
as one sentence naming the file, the key and what is wrong (:class:`ConfigError`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lockstep.errors import ConfigError, InvalidName
from lockstep.units import parse_size

__all__ = [
    "DEFAULT_GROUP_FILE",
    "DEFAULT_LIBVIRT_URI",
    "DiskSpec",
    "GuestTimePolicy",
    "GroupSpec",
    "HostSpec",
    "NetworkSpec",
    "NicSpec",
    "TlsSpec",
    "VmSpec",
    "group_file_path",
    "is_dns_name",
    "load_group",
    "parse_group",
    "validate_mac",
    "validate_name",
]

DEFAULT_GROUP_FILE = "lockstep.toml"
DEFAULT_LIBVIRT_URI = "qemu:///system"
# Always fullmatch: with match(), "$" also matches before a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*")
_SHOWN = 40  # characters of a bad value quoted in a message


def _shown(value: str) -> str:
    """``value`` quoted for a one-line message: escaped, and cut if long."""
    return repr(value) if len(value) <= _SHOWN else repr(value[:_SHOWN]) + "..."


def validate_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a safe name for a VM, host, network or state.

    Names reach file paths and command lines, so only letters, digits and
    ``_ . -`` are allowed, starting with a letter or digit, at most 63 long.

    Raises:
        InvalidName: the name is not allowed (the message says why); it is a
            ``ValueError`` too, so pydantic validators report it as bad input.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        text = _shown(value) if isinstance(value, str) else f"of type {type(value).__name__}"
        raise InvalidName(
            f"{kind} name {text} is not allowed (use letters, digits, '_', '.', '-';"
            " start with a letter or digit; at most 63 characters; no '..')"
        )
    return value


def validate_mac(value: str) -> str:
    """``value`` in lower case, if it is a NIC's MAC address (unicast, ``52:54:00:12:34:56``).

    Raises:
        ValueError: it is not a MAC address, or it is a multicast one.
    """
    mac = value.lower()
    if not _MAC.fullmatch(mac):
        raise ValueError(f"{_shown(mac)} is not a MAC address (like 52:54:00:12:34:56)")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"{mac!r} is a multicast MAC; a NIC needs a unicast one")
    return mac


def is_dns_name(value: str) -> bool:
    """Whether ``value`` is a DNS name (letters, digits, '-' labels joined by '.')."""
    return _DNS_NAME.fullmatch(value) is not None


def _no_nul(what: str, value: str) -> None:
    if "\x00" in value:
        raise ValueError(f"{what} {_shown(value)} contains a NUL character")


def _size(value: Any) -> Any:
    if not isinstance(value, str | int):
        return value
    try:
        return parse_size(value)
    except OverflowError:  # "9999...9M": float() gives inf
        raise ValueError(f"{_shown(str(value))} is too large a size") from None


Size = Annotated[int, BeforeValidator(_size), Field(gt=0)]


def _guest_time(value: Any) -> Any:
    if value not in ("true", "saved"):
        shown = _shown(value) if isinstance(value, str) else repr(value).lower()
        raise ValueError(
            f'is {shown}; it must be "true" (a restore sets the guest\'s wall clock to true'
            ' time) or "saved" (it keeps the time saved), in quotes'
        )
    return value


GuestTimePolicy = Annotated[Literal["true", "saved"], BeforeValidator(_guest_time)]
"""What a restore does to a guest's wall clock: set it to true time, or keep the saved time."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSpec(_Model):
    """The caller's certificate, key and the group's CA (PEM files)."""

    ca: Path
    cert: Path
    key: Path


class HostSpec(_Model):
    """A host of the group: where its execd listens, as ``HOST:PORT``, and its libvirt URI."""

    address: str
    # Where its execd finds the libvirt domains of the group's libvirt VMs.
    libvirt: str = DEFAULT_LIBVIRT_URI

    @field_validator("libvirt")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not v.isprintable() or " " in v or "://" not in v:
            raise ValueError(f"{_shown(v)} is not a libvirt URI (like qemu:///system)")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        bad = ValueError(
            f"{_shown(v)} is not HOST:PORT (HOST an IPv4 address, [IPv6 address] or"
            " DNS name; PORT 1-65535)"
        )
        if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
            raise bad
        if host.startswith("[") and host.endswith("]"):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                raise bad from None
        elif not is_dns_name(host):  # an IPv4 address is a DNS name to this regex
            raise bad
        return v


class NetworkSpec(_Model):
    """An L2 segment; on every host its VMs' taps join ``bridge``."""

    bridge: str
    # What a frozen NIC on this network holds: every frame, or only those sent
    # by the group's own NICs (outside machines cannot fill the buffer).
    hold: Literal["all", "group"] = "all"

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, v: str) -> str:
        return _link_name(v)


def _link_name(v: str) -> str:
    if not _IFNAME.fullmatch(v):
        raise ValueError(f"{_shown(v)} is not a link name (1-15 of letters, digits, '_.-')")
    return v


class NicSpec(_Model):
    """One virtual NIC: the network it joins and its fixed MAC."""

    network: str
    mac: str
    model: Literal["virtio-net-pci", "e1000"] = "virtio-net-pci"
    # The network's bridge on the VM's host; filled in from [networks] on load,
    # so a VmSpec sent to an execd stands alone.
    bridge: str | None = None
    # On a network with hold = "group": the MACs whose frames a frozen NIC
    # holds (the group's NICs on that network); None holds every frame. Filled
    # in from [networks] on load, like the bridge.
    hold_from: list[str] | None = None

    @field_validator("network")
    @classmethod
    def _network(cls, v: str) -> str:
        return validate_name("network", v)

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, v: str | None) -> str | None:
        return None if v is None else _link_name(v)

    @field_validator("hold_from")
    @classmethod
    def _hold_from(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            for mac in v:
                if not _MAC.fullmatch(mac):
                    raise ValueError(f"hold_from: {_shown(mac)} is not a MAC address")
        return v

    @field_validator("mac", mode="before")
    @classmethod
    def _mac(cls, v: Any) -> Any:
        return validate_mac(v) if isinstance(v, str) else v


def _disk_path(value: Any) -> Any:
    """A disk given as a plain path is a writable disk of that file."""
    return {"path": value} if isinstance(value, str) else value


class DiskSpec(_Model):
    """One disk of a VM started by lockstep's QEMU driver: its image and how states treat it.

    A writable disk is layered: the image is never written, the VM writes a
    qcow2 layer over it, and every state keeps that layer. A ``readonly`` disk
    (a tools ISO) or a ``shareable`` one (a cluster's shared storage, written
    by several VMs) is attached as it is and left alone by states.
    """

    path: Path
    readonly: bool = False
    shareable: bool = False
    # The image's format; None: qemu-img tells when the VM starts.
    format: Literal["qcow2", "raw"] | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: Path) -> Path:
        if not str(v).isprintable():
            raise ValueError(f"disk path {_shown(str(v))} has a control character")
        return v

    @property
    def layered(self) -> bool:
        """Whether states keep this disk as a layer (else it is left alone)."""
        return not (self.readonly or self.shareable)

    @property
    def left_alone(self) -> str:
        """Why states leave this disk alone ("" if it is layered)."""
        if self.readonly:
            return "read-only"
        return "shareable (shared storage)" if self.shareable else ""


# What only lockstep's own QEMU driver uses; a libvirt domain has its own.
_QEMU_ONLY = (
    "vcpus", "memory", "accel", "disks", "kernel", "initrd", "cmdline", "extra_args", "memory_path",
)  # fmt: skip


class VmSpec(_Model):
    """One VM: where it runs and how QEMU starts it, or which libvirt domain it is.

    ``disk = PATH`` in a group file is one writable disk (``disks = [PATH]``).
    """

    name: str = ""
    host: str
    vcpus: int = Field(default=1, ge=1, le=64)
    memory: Size = 256 << 20
    accel: Literal["tcg", "kvm"] = "tcg"
    disks: list[Annotated[DiskSpec, BeforeValidator(_disk_path)]] = Field(default_factory=list)
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    nics: list[NicSpec] = Field(default_factory=list)
    extra_args: list[str] = Field(default_factory=list)
    # How guest RAM is saved and restored (docs/memory.md): "fast" keeps it in a
    # file and saves only device state, "standard" streams all of it through
    # migration, "auto" is fast where it works and says why when it is not.
    memory_path: Literal["fast", "standard", "auto"] = "auto"
    # "qemu": lockstep's execd starts QEMU itself; "libvirt": the VM is a domain
    # of the host's libvirt (``domain``, default the VM's name, at ``libvirt``,
    # the host's URI, filled in from [hosts] on load).
    driver: Literal["qemu", "libvirt"] = "qemu"
    domain: str | None = None
    libvirt: str = DEFAULT_LIBVIRT_URI
    # A libvirt domain lockstep up defines from this XML file (on the VM's host)
    # when the host has no domain of that name yet.
    define: Path | None = None
    # After a restore the guest's wall clock is as old as the state: "true" sets
    # it to true time (through its QEMU guest agent), "saved" keeps it. Filled
    # in from the group's guest_time when the VM does not say.
    guest_time: GuestTimePolicy = "true"

    @model_validator(mode="before")
    @classmethod
    def _one_disk(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "disk" not in data:
            return data
        rest = {k: v for k, v in data.items() if k != "disk"}
        if data["disk"] is None:
            return rest
        if "disks" in data:
            raise ValueError("give disk or disks, not both")
        return {**rest, "disks": [data["disk"]]}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # Empty until the group file fills it in from the VM's key.
        return v if v == "" else validate_name("VM", v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return validate_name("host", v)

    # These reach QEMU's argv; a NUL would only fail later, inside Popen.
    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, v: str) -> str:
        _no_nul("cmdline", v)
        return v

    # Paths also reach messages: a control character in one is a mistake, never a file.
    @field_validator("kernel", "initrd", "define")
    @classmethod
    def _path(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and not str(v).isprintable():
            raise ValueError(f"{info.field_name} path {_shown(str(v))} has a control character")
        return v

    @field_validator("extra_args")
    @classmethod
    def _args(cls, v: list[str]) -> list[str]:
        for arg in v:
            _no_nul("extra argument", arg)
        return v

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str | None) -> str | None:
        return None if v is None else validate_name("domain", v)

    @model_validator(mode="after")
    def _boot(self) -> VmSpec:
        if self.driver == "libvirt":
            return self
        if self.domain is not None or self.define is not None:
            raise ValueError("domain and define are for driver libvirt")
        if self.kernel is None and (self.initrd is not None or self.cmdline):
            raise ValueError("initrd and cmdline need a kernel")
        if self.kernel is None and not self.disks:
            raise ValueError("a VM needs a disk or a kernel to boot from")
        return self

    @property
    def domain_name(self) -> str:
        """The libvirt domain this VM is (its own name unless ``domain`` says)."""
        return self.domain or self.name

    @property
    def layered_disks(self) -> list[DiskSpec]:
        """The disks states keep as layers, in order."""
        return [d for d in self.disks if d.layered]


def _with_network(nic: Any, networks: dict[str, Any], held: dict[str, list[str]]) -> Any:
    """A NIC's raw table with its network's bridge and, if it holds only the group's, the MACs."""
    if not isinstance(nic, dict):
        return nic
    net = networks.get(str(nic.get("network")))
    if not isinstance(net, dict):
        return nic
    if "bridge" not in nic and isinstance(net.get("bridge"), str):
        nic = {**nic, "bridge": net["bridge"]}
    if net.get("hold") == "group" and "hold_from" not in nic:
        nic = {**nic, "hold_from": held.get(str(nic.get("network")), [])}
    return nic


def _group_macs(vms: dict[str, Any]) -> dict[str, list[str]]:
    """Per network, the (well-formed) MACs of the group's NICs on it, from the raw tables."""
    held: dict[str, set[str]] = {}
    for vm in vms.values():
        nics = vm.get("nics") if isinstance(vm, dict) else None
        for nic in nics if isinstance(nics, list) else []:
            mac = nic.get("mac") if isinstance(nic, dict) else None
            if isinstance(mac, str) and _MAC.fullmatch(mac.lower()):
                held.setdefault(str(nic.get("network")), set()).add(mac.lower())
    return {net: sorted(macs) for net, macs in held.items()}


class GroupSpec(_Model):
    """A whole group: its hosts, networks and VMs."""

    name: str = "group"
    # The default of every VM's guest_time (see VmSpec).
    guest_time: GuestTimePolicy = "true"
    tls: TlsSpec | None = None
    hosts: dict[str, HostSpec]
    networks: dict[str, NetworkSpec] = Field(default_factory=dict)
    vms: dict[str, VmSpec]

    @model_validator(mode="before")
    @classmethod
    def _names(cls, data: Any) -> Any:
        # A VM's name is its key, a NIC's bridge is its network's, and so is
        # what its freeze holds; its guest_time is the group's unless it says:
        # copy them in so a VmSpec stands alone.
        if not isinstance(data, dict) or not isinstance(data.get("vms"), dict):
            return data
        raw_networks = data.get("networks")
        networks: dict[str, Any] = raw_networks if isinstance(raw_networks, dict) else {}
        held = _group_macs(data["vms"])
        raw_hosts = data.get("hosts")
        hosts: dict[str, Any] = raw_hosts if isinstance(raw_hosts, dict) else {}
        vms = {}
        for key, vm in data["vms"].items():
            if isinstance(vm, dict):
                given = sorted({*_QEMU_ONLY, "disk"} & set(vm))
                if vm.get("driver") == "libvirt" and given:
                    raise ValueError(
                        f"VM {_shown(str(key))} is a libvirt domain: {', '.join(given)} is only"
                        " for driver qemu (the domain has its own)"
                    )
                vm = {**vm, "name": key}
                host = hosts.get(str(vm.get("host")))
                uri = host.get("libvirt") if isinstance(host, dict) else None
                if "libvirt" not in vm and isinstance(uri, str):
                    vm["libvirt"] = uri
                if "guest_time" in data and "guest_time" not in vm:
                    vm["guest_time"] = data["guest_time"]
                if isinstance(vm.get("nics"), list):
                    vm["nics"] = [_with_network(nic, networks, held) for nic in vm["nics"]]
            vms[key] = vm
        return {**data, "vms": vms}

    @model_validator(mode="after")
    def _references(self) -> GroupSpec:
        validate_name("group", self.name)
        for kind, names in (("host", self.hosts), ("network", self.networks), ("VM", self.vms)):
            for n in names:
                validate_name(kind, n)
        if not self.hosts:
            raise ValueError("a group needs at least one host")
        macs: dict[str, str] = {}
        domains: dict[tuple[str, str], str] = {}
        for vm in self.vms.values():
            if vm.host not in self.hosts:
                raise ValueError(
                    f"VM {vm.name!r} is on unknown host {vm.host!r}"
                    f" (hosts: {', '.join(sorted(self.hosts))})"
                )
            if vm.driver == "libvirt":
                other = domains.setdefault((vm.host, vm.domain_name), vm.name)
                if other != vm.name:
                    raise ValueError(
                        f"VMs {other!r} and {vm.name!r} are both domain {vm.domain_name!r}"
                        f" on host {vm.host!r}"
                    )
            for nic in vm.nics:
                if nic.network not in self.networks:
                    raise ValueError(
                        f"VM {vm.name!r} has a NIC on unknown network {nic.network!r}"
                        f" (networks: {', '.join(sorted(self.networks)) or 'none'})"
                    )
                if nic.mac in macs:
                    raise ValueError(
                        f"MAC {nic.mac} is used twice (VMs {macs[nic.mac]!r} and {vm.name!r})"
                    )
                macs[nic.mac] = vm.name
        return self

    def vms_on(self, host: str) -> list[VmSpec]:
        """The VMs placed on ``host``, in file order."""
        return [vm for vm in self.vms.values() if vm.host == host]

    def vm(self, name: str) -> VmSpec:
        """The group's VM ``name``.

        Raises:
            ConfigError: the group has no such VM (the message lists its VMs).
        """
        spec = self.vms.get(name)
        if spec is None:
            known = ", ".join(sorted(self.vms))
            raise ConfigError(f"group {self.name} has no VM {_shown(name)} (its VMs: {known})")
        return spec


def _printable(text: str) -> str:
    """``text`` as is if it prints on one line, else quoted and escaped."""
    return text if text.isprintable() else _shown(text)


def _loc(loc: tuple[int | str, ...]) -> str:
    """Where in the file an error is (``vms.p1.kernel``); a long key is quoted and cut."""
    parts = [str(p) for p in loc if not str(p).startswith("function-")]
    return ".".join(_shown(p) if len(p) > _SHOWN else _printable(p) for p in parts)


def _resolve(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative file paths absolute against ``base`` (the group file's folder)."""

    def fix(p: Any) -> Any:
        return str(base / p) if isinstance(p, str) and p and not os.path.isabs(p) else p

    out = dict(data)
    if isinstance(out.get("tls"), dict):
        out["tls"] = {k: fix(v) for k, v in out["tls"].items()}

    def fix_disk(d: Any) -> Any:
        return {**d, "path": fix(d.get("path"))} if isinstance(d, dict) else fix(d)

    def fix_vm(vm: dict[str, Any]) -> dict[str, Any]:
        vm = {
            k: fix(v) if k in ("disk", "kernel", "initrd", "define") else v for k, v in vm.items()
        }
        if isinstance(vm.get("disks"), list):
            vm["disks"] = [fix_disk(d) for d in vm["disks"]]
        return vm

    if isinstance(out.get("vms"), dict):
        out["vms"] = {
            name: fix_vm(vm) if isinstance(vm, dict) else vm for name, vm in out["vms"].items()
        }
    return out


def parse_group(data: dict[str, Any], source: str, *, check_files: bool = True) -> GroupSpec:
    """Validate already-parsed TOML ``data``; ``source`` names it in errors.

    Raises:
        ConfigError: one sentence naming ``source``, the key and what is wrong.
    """
    try:
        group = GroupSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _loc(err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "is not a known key"
        elif err["type"] == "missing":
            msg = "is missing"
        raise ConfigError(f"{source}: {where + ': ' if where else ''}{msg}") from exc
    if check_files:
        for vm in group.vms.values():
            files = [(key, getattr(vm, key)) for key in ("kernel", "initrd")]
            files += [(f"disks.{i}", d.path) for i, d in enumerate(vm.disks)]
            for key, path in files:
                if path is None:
                    continue
                where = f"{source}: vms.{vm.name}.{key}"
                try:
                    found = path.is_file()
                except OSError as exc:  # too long a name, no permission...
                    raise ConfigError(
                        f"{where}: cannot check file {_printable(str(path))}: {exc.strerror}"
                    ) from exc
                if not found:
                    raise ConfigError(f"{where}: no such file {_printable(str(path))}")
    return group


def group_file_path(option: str | None) -> Path:
    """The group file to use: ``-g``, else ``$LOCKSTEP_GROUP``, else ./lockstep.toml."""
    return Path(option or os.environ.get("LOCKSTEP_GROUP") or DEFAULT_GROUP_FILE)


def load_group(path: Path, *, check_files: bool = True) -> GroupSpec:
    """Read and validate a group file.

    Raises:
        ConfigError: the file is missing, not TOML, or not a valid group.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path}: no such group file (write one, or run `lockstep lab up` for the lab)"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read group file: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_group(_resolve(data, path.resolve().parent), str(path), check_files=check_files)
