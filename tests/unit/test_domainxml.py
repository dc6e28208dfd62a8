"""A libvirt domain's XML as lockstep reads and rewrites it (a virt-install domain, two disks)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lockstep.vm import domainxml

# As `virsh dumpxml` prints a running domain made by virt-install (trimmed):
# two qcow2 disks, an ISO on a read-only CD-ROM, a shareable raw disk, two NICs.
DOMAIN = """<domain type='kvm' id='3'>
  <name>db1</name>
  <uuid>9b0e1c1e-3f0a-4d8e-9f3e-2b9c1d1e5a11</uuid>
  <memory unit='KiB'>1048576</memory>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/db1.qcow2' index='2'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/debian12.qcow2'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/db1-data.qcow2' index='1'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/iso/debian-12.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/srv/shared/quorum.img'/>
      <target dev='vdc' bus='virtio'/>
      <shareable/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:AB:CD:01'/>
      <source bridge='br0'/>
      <target dev='vnet4'/>
      <model type='virtio'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:ab:cd:02'/>
      <source network='default' bridge='virbr0'/>
      <target dev='vnet5'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>"""


def test_disks_are_read_in_order_with_what_they_are() -> None:
    """Every disk, with its target, device, file, format and flags."""
    found = domainxml.disks(DOMAIN)
    assert [d.target for d in found] == ["vda", "vdb", "sda", "vdc"]
    assert found[0].source == Path("/var/lib/libvirt/images/db1.qcow2")
    assert (found[2].device, found[2].readonly) == ("cdrom", True)
    assert (found[3].shareable, found[3].driver_type) == (True, "raw")


def test_only_read_write_qcow2_disks_are_layered_and_the_rest_said_why() -> None:
    """The two qcow2 disks are layered; the ISO and the shared disk are left alone, said so."""
    assert [d.target for d in domainxml.layered(DOMAIN)] == ["vda", "vdb"]
    assert domainxml.skipped(DOMAIN) == {"sda": "a cdrom", "vdc": "shareable (shared storage)"}


def test_nics_give_mac_bridge_and_live_tap() -> None:
    """Each NIC's MAC (lower case), its bridge and the tap libvirt made for it."""
    assert [(n.mac, n.bridge, n.tap) for n in domainxml.nics(DOMAIN)] == [
        ("52:54:00:ab:cd:01", "br0", "vnet4"),
        ("52:54:00:ab:cd:02", "virbr0", "vnet5"),
    ]


def test_disks_move_to_new_overlays_and_nothing_else_changes() -> None:
    """Rewritten disks read their new files as qcow2, with no stale backing chain.

    Everything else (name, UUID, the other disks, the NICs) is as it was.
    """
    new = {"vda": Path("/layers/db1-a.qcow2"), "vdb": Path("/layers/db1-b.qcow2")}
    xml = domainxml.with_disk_sources(DOMAIN, new)
    after = {d.target: d for d in domainxml.disks(xml)}
    assert after["vda"].source == new["vda"] and after["vdb"].source == new["vdb"]
    assert after["sda"].source == Path("/srv/iso/debian-12.iso")
    assert "backingStore" not in xml
    root = ET.fromstring(xml)
    assert root.findtext("name") == "db1"
    assert root.findtext("uuid") == "9b0e1c1e-3f0a-4d8e-9f3e-2b9c1d1e5a11"
    assert domainxml.nics(xml) == domainxml.nics(DOMAIN)


def test_rewriting_a_disk_the_domain_lacks_is_refused() -> None:
    """Naming a target the domain does not have is an error naming it."""
    with pytest.raises(ValueError, match="has no disk vdz"):
        domainxml.with_disk_sources(DOMAIN, {"vdz": Path("/x.qcow2")})


def test_snapshot_xml_takes_memory_and_the_layered_disks_only() -> None:
    """The snapshot writes memory and overlays the layered disks; the others are left alone."""
    xml = domainxml.snapshot_xml(
        "s1", Path("/states/s1/db1.mem"), {"vda": Path("/l/a.qcow2")}, ["sda", "vdc"]
    )
    root = ET.fromstring(xml)
    memory = root.find("memory")
    assert memory is not None and memory.attrib == {
        "snapshot": "external",
        "file": "/states/s1/db1.mem",
    }
    modes = {d.get("name"): d.get("snapshot") for d in root.iterfind("./disks/disk")}
    assert modes == {"vda": "external", "sda": "no", "vdc": "no"}


def test_xml_that_does_not_parse_is_one_clear_error() -> None:
    """Garbage is a ValueError saying the domain XML does not parse."""
    with pytest.raises(ValueError, match="the domain XML does not parse"):
        domainxml.disks("<domain><devices>")


def test_agent_connected_reads_the_guest_agent_channel_state() -> None:
    """The guest agent is there when its channel says connected; absent or disconnected, not."""
    channel = (
        "<domain><devices><channel type='unix'><source mode='bind' path='/a.sock'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0' state='{state}'/>"
        "</channel></devices></domain>"
    )
    assert domainxml.agent_connected(channel.format(state="connected"))
    assert not domainxml.agent_connected(channel.format(state="disconnected"))
    assert not domainxml.agent_connected("<domain><devices/></domain>")
