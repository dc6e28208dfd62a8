"""The lab's libvirt domains (``lab up --driver libvirt``): their XML and their libvirt root."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from lockstep.lab.domains import (
    LIBVIRT_QEMU_CONF,
    domain_xml,
    lab_tap,
    libvirt_uri,
    libvirtd_argv,
    write_libvirt_root,
)
from lockstep.vm import domainxml


def _xml() -> str:
    run = Path("/lab/hosts/h1/root/run/p1")
    return domain_xml(
        name="p1",
        memory=256 << 20,
        kernel=Path("/img/vmlinuz"),
        initrd=Path("/img/initrd"),
        cmdline="console=ttyS0 ls.ip=10.0.0.2/24",
        disks=[Path("/lab/domains/p1/vda.qcow2"), Path("/lab/domains/p1/vdb.qcow2")],
        bridge="lsvm",
        mac="52:54:00:4c:53:01",
        tap=lab_tap("p1", 0),
        console=run / "console.log",
        channel=run / "channel.sock",
        agent=run / "agent.sock",
    )


def test_a_lab_domain_is_what_lockstep_reads_back_from_a_users_domain() -> None:
    """Its two qcow2 disks are both layered, its NIC is on the VM bridge through its named tap.

    Read with the same code that reads a user's domain (lockstep.vm.domainxml),
    so the lab exercises what a user's virt-install domain goes through.
    """
    xml = _xml()
    assert domainxml.identity(xml) == ("p1", "")
    assert [(d.target, d.source) for d in domainxml.layered(xml)] == [
        ("vda", Path("/lab/domains/p1/vda.qcow2")),
        ("vdb", Path("/lab/domains/p1/vdb.qcow2")),
    ]
    assert domainxml.skipped(xml) == {}
    (nic,) = domainxml.nics(xml)
    assert (nic.mac, nic.kind, nic.bridge, nic.tap) == (
        "52:54:00:4c:53:01",
        "bridge",
        "lsvm",
        "lvp1n0",
    )
    root = ET.fromstring(xml)
    assert root.findtext("memory") == str(256 << 10)
    assert root.findtext("os/cmdline") == "console=ttyS0 ls.ip=10.0.0.2/24"


def test_serial_ports_and_agent_are_where_the_lab_looks_for_them() -> None:
    """Console log (append) on ttyS0, control channel on ttyS1, the agent socket in the run dir.

    The same files as a QEMU-driver VM's (lockstep.vm.argv.VmPaths), so lab
    exec, console and verify need not know which driver runs the guest.
    """
    root = ET.fromstring(_xml())
    serials = {
        s.find("target").get("port"): s.find("source").attrib  # type: ignore[union-attr]
        for s in root.iterfind("devices/serial")
    }
    assert serials == {
        "0": {"path": "/lab/hosts/h1/root/run/p1/console.log", "append": "on"},
        "1": {"mode": "bind", "path": "/lab/hosts/h1/root/run/p1/channel.sock"},
    }
    (agent,) = root.iterfind("devices/channel")
    assert agent.find("target").get("name") == domainxml.AGENT_CHANNEL  # type: ignore[union-attr]
    assert agent.find("source").get("path") == "/lab/hosts/h1/root/run/p1/agent.sock"  # type: ignore[union-attr]


def test_a_hosts_libvirtd_has_its_own_files_and_runs_qemu_as_root(tmp_path: Path) -> None:
    """A host's libvirtd: its own config, folders and socket; QEMU as root with nothing else.

    The qemu.conf asks for root, no security driver, no virtlogd, no cgroups
    and no private /dev; the daemon's socket is in the host's folder and its
    URI names it; the command runs in the host's namespace, mounts the
    host's folders over libvirt's (with a fresh /run) and ends as libvirtd.
    """
    root = tmp_path / "lv"
    write_libvirt_root(root)
    assert (root / "etc" / "qemu.conf").read_text() == LIBVIRT_QEMU_CONF
    for line in ('user = "root"', 'security_driver = "none"', 'stdio_handler = "file"'):
        assert line in LIBVIRT_QEMU_CONF
    assert "namespaces = [ ]" in LIBVIRT_QEMU_CONF
    conf = (root / "libvirtd.conf").read_text()
    assert f'unix_sock_dir = "{root / "sock"}"' in conf
    assert libvirt_uri(root) == f"qemu:///system?socket={root}/sock/libvirt-sock"
    for d in ("etc", "lib", "cache", "log", "sock"):
        assert (root / d).is_dir()
    argv = libvirtd_argv("lab-h1", root)
    assert argv[:5] == ["ip", "netns", "exec", "lab-h1", "sh"]
    script = argv[-1]
    assert script.index("mount -t tmpfs lockstep-libvirt /run") < script.index("exec libvirtd")
    assert f"mount --bind {root / 'lib'} /var/lib/libvirt" in script
    assert f"mount --bind {root / 'etc'} /etc/libvirt" in script
    assert script.endswith(f"exec libvirtd -f {root / 'libvirtd.conf'}")
    assert len(lab_tap("p12", 3)) <= 15
