"""A libvirt domain's XML, read and rewritten: its disks, its NICs, a snapshot's description.

Pure functions over the XML text (the standard library's ElementTree): what
lockstep needs to know of a user's domain (which disks it layers, which taps
its NICs use) and the few changes it makes (a disk on a fresh overlay, an
external snapshot of memory and disks). Everything else in the XML is left
exactly as the user wrote it.

A disk is layered when it is a read-write file-backed qcow2 disk; read-only
disks (a CD-ROM, a shared ISO) and shareable disks (a cluster's shared
storage) are left alone, and :func:`skipped` says why for each.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AGENT_CHANNEL",
    "DomainDisk",
    "DomainNic",
    "agent_connected",
    "disks",
    "identity",
    "layered",
    "nics",
    "skipped",
    "snapshot_xml",
    "with_disk_sources",
    "with_taps",
]


# The virtio-serial port qemu-ga listens on in the guest (libvirt's channel target name).
AGENT_CHANNEL = "org.qemu.guest_agent.0"


@dataclass(frozen=True)
class DomainDisk:
    """One ``<disk>`` of a domain."""

    target: str  # the guest-side name: vda, sdb...
    device: str  # disk, cdrom, floppy, lun
    source: Path | None  # the file it reads (None: no file, or not a file)
    driver_type: str  # raw, qcow2...
    readonly: bool
    shareable: bool


@dataclass(frozen=True)
class DomainNic:
    """One ``<interface>`` of a domain: its MAC, bridge and (live) tap device."""

    mac: str
    kind: str  # bridge, network, ethernet...
    bridge: str | None
    tap: str | None  # <target dev=...>: set while the domain runs, or fixed by the user


def _root(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)  # noqa: S314 (libvirt's own XML, not a stranger's)
    except ET.ParseError as exc:
        raise ValueError(f"the domain XML does not parse: {exc}") from exc


def identity(xml: str) -> tuple[str, str]:
    """The domain's name and UUID ("" where the XML has none)."""
    root = _root(xml)
    return (root.findtext("name") or "").strip(), (root.findtext("uuid") or "").strip().lower()


def disks(xml: str) -> list[DomainDisk]:
    """The domain's disks, in XML order."""
    out = []
    for disk in _root(xml).iterfind("./devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        driver = disk.find("driver")
        file = source.get("file") if source is not None else None
        out.append(
            DomainDisk(
                target=target.get("dev", "") if target is not None else "",
                device=disk.get("device", "disk"),
                source=Path(file) if file and disk.get("type", "file") == "file" else None,
                driver_type=driver.get("type", "raw") if driver is not None else "raw",
                readonly=disk.find("readonly") is not None,
                shareable=disk.find("shareable") is not None,
            )
        )
    return out


def _why_not(disk: DomainDisk) -> str:
    if disk.device != "disk":
        return f"a {disk.device}"
    if disk.readonly:
        return "read-only"
    if disk.shareable:
        return "shareable (shared storage)"
    if disk.source is None:
        return "not a file"
    if disk.driver_type != "qcow2":
        return f"{disk.driver_type}, not qcow2"
    return ""


def layered(xml: str) -> list[DomainDisk]:
    """The disks a state keeps as layers: read-write qcow2 files."""
    return [d for d in disks(xml) if not _why_not(d)]


def skipped(xml: str) -> dict[str, str]:
    """The disks left alone, by target, with why (for the report)."""
    return {d.target: why for d in disks(xml) if (why := _why_not(d))}


def agent_connected(xml: str) -> bool:
    """Whether the live domain's guest agent channel is connected (qemu-ga runs in the guest)."""
    for channel in _root(xml).iterfind("./devices/channel/target"):
        if channel.get("name") == AGENT_CHANNEL:
            return channel.get("state") == "connected"
    return False


def nics(xml: str) -> list[DomainNic]:
    """The domain's NICs, in XML order."""
    out = []
    for nic in _root(xml).iterfind("./devices/interface"):
        mac = nic.find("mac")
        source = nic.find("source")
        target = nic.find("target")
        out.append(
            DomainNic(
                mac=(mac.get("address", "") if mac is not None else "").lower(),
                kind=nic.get("type", ""),
                bridge=source.get("bridge") if source is not None else None,
                tap=target.get("dev") if target is not None else None,
            )
        )
    return out


def with_disk_sources(xml: str, sources: Mapping[str, Path]) -> str:
    """``xml`` with the disks named in ``sources`` (by target) on those files, as qcow2.

    libvirt works the backing chain out from the files themselves, so any
    ``<backingStore>`` the XML described is dropped for those disks.

    Raises:
        ValueError: a target names no disk of the domain.
    """
    root = _root(xml)
    seen = set()
    for disk in root.iterfind("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev is None or dev not in sources:
            continue
        seen.add(dev)
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        source.attrib.clear()
        source.set("file", str(sources[dev]))
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", {"name": "qemu"})
        driver.set("type", "qcow2")
        for backing in disk.findall("backingStore"):
            disk.remove(backing)
    missing = sorted(set(sources) - seen)
    if missing:
        raise ValueError(f"the domain has no disk {', '.join(missing)}")
    return ET.tostring(root, encoding="unicode")


def with_taps(xml: str, taps: Sequence[str]) -> str:
    """``xml`` with its NICs, in order, on the tap devices ``taps`` (``<target dev=...>``).

    libvirt then opens (or makes) those taps instead of naming new ones.

    Raises:
        ValueError: the domain has not as many NICs as ``taps``.
    """
    root = _root(xml)
    found = root.findall("./devices/interface")
    if len(found) != len(taps):
        raise ValueError(f"the domain has {len(found)} NICs, not {len(taps)}")
    for nic, tap in zip(found, taps, strict=True):
        target = nic.find("target")
        if target is None:
            target = ET.SubElement(nic, "target")
        target.attrib.clear()
        target.set("dev", tap)
    return ET.tostring(root, encoding="unicode")


def snapshot_xml(
    name: str, memory: Path, overlays: Mapping[str, Path], others: Sequence[str]
) -> str:
    """An external snapshot: memory to ``memory``, each disk of ``overlays`` onto its new file.

    ``others`` are the disks left alone (``snapshot='no'``).
    """
    snap = ET.Element("domainsnapshot")
    ET.SubElement(snap, "name").text = name
    ET.SubElement(snap, "memory", {"snapshot": "external", "file": str(memory)})
    listed = ET.SubElement(snap, "disks")
    for target, overlay in overlays.items():
        disk = ET.SubElement(listed, "disk", {"name": target, "snapshot": "external"})
        ET.SubElement(disk, "driver", {"type": "qcow2"})
        ET.SubElement(disk, "source", {"file": str(overlay)})
    for target in others:
        ET.SubElement(listed, "disk", {"name": target, "snapshot": "no"})
    return ET.tostring(snap, encoding="unicode")
