"""The lab in libvirt mode (``lockstep lab up --driver libvirt``): its VMs are libvirt domains.

Each lab host runs a libvirtd of its own, started by the lab in the host's
namespace, so the domains' QEMUs and taps are there, as the execd's VMs
are. Its files are the host's alone: in a mount namespace of its own it has
a fresh ``/run`` and the lab host's folders over ``/etc/libvirt``,
``/var/lib/libvirt``, ``/var/cache/libvirt`` and ``/var/log/libvirt`` (empty
mount points are made on the machine where they are missing, as Debian's
``libvirt-daemon-system`` has them), and its socket in the host's folder:
the execd, ``virsh`` and any other libvirt client reach it at
:func:`libvirt_uri`. Its ``qemu.conf`` runs QEMU as root without a security
driver, cgroups, private ``/dev`` or virtlogd (the lab's namespaces have
none of them); libvirt still wants its ``libvirt-qemu`` user to exist (set-up
makes it, as that package would).

The domains are defined from the same guest image as the QEMU driver's VMs
(kernel, initrd, command line; the root disk a qcow2 over the image's rootfs,
then the empty data disks, each a qcow2 file of the domain's own, as a user's
domain has them), with the same serial console log and control channel in
the execd's folder for the VM, so ``lab exec``, ``lab console`` and ``lab
verify`` work the same. Their NICs are on the host's VM bridge through taps
they name (``<target dev=...>``), so a restored domain has the same taps.
"""

from __future__ import annotations

import shlex
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from lockstep.vm.argv import QEMU_BINARY
from lockstep.vm.domainxml import AGENT_CHANNEL

__all__ = [
    "LIBVIRT_QEMU_CONF",
    "domain_xml",
    "lab_tap",
    "libvirt_uri",
    "libvirtd_argv",
    "socket_path",
    "write_libvirt_root",
]

# qemu.conf of a lab host's libvirtd (see the module docstring).
LIBVIRT_QEMU_CONF = """\
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
"""

# Each folder of a host's root and the machine's folder it stands for in its libvirtd.
_MOUNTS = {
    "etc": "/etc/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}


def socket_path(root: Path) -> Path:
    """The socket of the libvirtd whose files are under ``root``."""
    return root / "sock" / "libvirt-sock"


def libvirt_uri(root: Path) -> str:
    """The URI of the libvirtd whose files are under ``root``, for any libvirt client."""
    return f"qemu:///system?socket={socket_path(root)}"


def write_libvirt_root(root: Path) -> None:
    """Make ``root`` the folders and configuration of one lab host's libvirtd."""
    for d in (*_MOUNTS, "sock"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc" / "qemu.conf").write_text(LIBVIRT_QEMU_CONF)
    (root / "libvirtd.conf").write_text(
        f'unix_sock_dir = "{socket_path(root).parent}"\n'
        'unix_sock_rw_perms = "0700"\n'
        'auth_unix_rw = "none"\n'
        'auth_unix_ro = "none"\n'
        'log_outputs = "3:stderr"\n'
    )


def libvirtd_argv(netns: str, root: Path) -> list[str]:
    """The command that runs the libvirtd of ``root`` in ``netns`` (see the module docstring).

    ``ip netns exec`` gives it a mount namespace of its own, where the
    host's folders are mounted over libvirt's; it ends as libvirtd itself
    (same pid).
    """
    steps = ["set -e", "mount -t tmpfs lockstep-libvirt /run"]
    for d, target in _MOUNTS.items():
        steps.append(f"mkdir -p {target}")
        steps.append(f"mount --bind {shlex.quote(str(root / d))} {target}")
    steps.append(f"exec libvirtd -f {shlex.quote(str(root / 'libvirtd.conf'))}")
    return ["ip", "netns", "exec", netns, "sh", "-c", "; ".join(steps)]


def lab_tap(vm: str, index: int) -> str:
    """The tap a lab domain names for NIC ``index`` (not one of lockstep's own tap names)."""
    return f"lv{vm}n{index}"[:15]


def domain_xml(
    *,
    name: str,
    memory: int,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    disks: Sequence[Path],
    bridge: str,
    mac: str,
    tap: str,
    console: Path,
    channel: Path,
    agent: Path,
) -> str:
    """A lab domain: ``memory`` bytes, one vCPU under TCG, booted from the image's kernel.

    ``disks`` are its qcow2 files (vda, vdb...); ``console`` and ``channel``
    its first and second serial ports (a log file, a unix socket QEMU serves),
    ``agent`` the guest agent's socket (libvirt's own path for it, under the
    host's root, can be longer than a unix socket's path may be).
    """
    dom = ET.Element("domain", {"type": "qemu"})
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", {"unit": "KiB"}).text = str(memory // 1024)
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", {"arch": "x86_64", "machine": "pc"}).text = "hvm"
    ET.SubElement(os_, "kernel").text = str(kernel)
    ET.SubElement(os_, "initrd").text = str(initrd)
    ET.SubElement(os_, "cmdline").text = cmdline
    ET.SubElement(dom, "clock", {"offset": "utc"})
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = f"/usr/bin/{QEMU_BINARY}"
    for i, path in enumerate(disks):
        disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
        ET.SubElement(disk, "driver", {"name": "qemu", "type": "qcow2", "cache": "writeback"})
        ET.SubElement(disk, "source", {"file": str(path)})
        ET.SubElement(disk, "target", {"dev": f"vd{chr(ord('a') + i)}", "bus": "virtio"})
    nic = ET.SubElement(devices, "interface", {"type": "bridge"})
    ET.SubElement(nic, "mac", {"address": mac})
    ET.SubElement(nic, "source", {"bridge": bridge})
    ET.SubElement(nic, "target", {"dev": tap})
    ET.SubElement(nic, "model", {"type": "virtio"})
    serial = ET.SubElement(devices, "serial", {"type": "file"})
    ET.SubElement(serial, "source", {"path": str(console), "append": "on"})
    ET.SubElement(serial, "target", {"port": "0"})
    serial = ET.SubElement(devices, "serial", {"type": "unix"})
    ET.SubElement(serial, "source", {"mode": "bind", "path": str(channel)})
    ET.SubElement(serial, "target", {"port": "1"})
    channel_ = ET.SubElement(devices, "channel", {"type": "unix"})
    ET.SubElement(channel_, "source", {"mode": "bind", "path": str(agent)})
    ET.SubElement(channel_, "target", {"type": "virtio", "name": AGENT_CHANNEL})
    ET.SubElement(devices, "controller", {"type": "usb", "model": "none"})
    ET.SubElement(devices, "memballoon", {"model": "none"})
    return ET.tostring(dom, encoding="unicode")
