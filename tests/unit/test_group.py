"""The group file: every kind of bad input gets one sentence naming file, key and fault."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lockstep.errors import ConfigError
from lockstep.group import group_file_path, load_group, parse_group, validate_name


def _group(**vms: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "g",
        "hosts": {"h1": {"address": "10.0.0.1:7443"}, "h2": {"address": "10.0.0.2:7443"}},
        "networks": {"lan": {"bridge": "lsvm"}},
        "vms": vms
        or {
            "p1": {
                "host": "h1",
                "kernel": "/k",
                "nics": [{"network": "lan", "mac": "52:54:00:00:00:01"}],
            }
        },
    }


def _fails(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse_group(data, "g.toml", check_files=False)
    assert str(info.value).startswith("g.toml: ")
    assert "\n" not in str(info.value)


def test_valid_group_fills_names_and_bridges() -> None:
    """A good file loads; each VM knows its name, each NIC its network's bridge."""
    g = parse_group(_group(), "g.toml", check_files=False)
    vm = g.vms["p1"]
    assert vm.name == "p1" and vm.memory == 256 << 20
    assert vm.nics[0].bridge == "lsvm"
    assert [v.name for v in g.vms_on("h1")] == ["p1"] and g.vms_on("h2") == []


def test_network_holding_only_the_group_lists_its_macs_on_every_nic() -> None:
    """hold = "group" gives each NIC on that network the group's MACs there; "all" gives None."""
    data = _group(
        p1={
            "host": "h1",
            "kernel": "/k",
            "nics": [
                {"network": "lan", "mac": "52:54:00:00:00:0A"},
                {"network": "wan", "mac": "52:54:00:00:01:01"},
            ],
        },
        s1={"host": "h2", "kernel": "/k", "nics": [{"network": "lan", "mac": "52:54:00:00:00:02"}]},
    )
    data["networks"] = {"lan": {"bridge": "lsvm", "hold": "group"}, "wan": {"bridge": "lswan"}}
    g = parse_group(data, "g.toml", check_files=False)
    group_macs = ["52:54:00:00:00:02", "52:54:00:00:00:0a"]
    assert g.vms["p1"].nics[0].hold_from == group_macs
    assert g.vms["s1"].nics[0].hold_from == group_macs
    assert g.vms["p1"].nics[1].hold_from is None
    data["networks"]["lan"]["hold"] = "some"
    _fails(data, r"networks\.lan\.hold: .*'all' or 'group'")


def test_unknown_host() -> None:
    """A VM on a host not in [hosts] is named, with the hosts there are."""
    _fails(
        _group(p1={"host": "h9", "kernel": "/k"}),
        r"VM 'p1' is on unknown host 'h9' \(hosts: h1, h2\)",
    )


def test_duplicate_mac() -> None:
    """Two NICs with one MAC are refused, naming both VMs."""
    nic = [{"network": "lan", "mac": "52:54:00:00:00:01"}]
    _fails(
        _group(
            a={"host": "h1", "kernel": "/k", "nics": nic},
            b={"host": "h2", "kernel": "/k", "nics": nic},
        ),
        r"MAC 52:54:00:00:00:01 is used twice \(VMs 'a' and 'b'\)",
    )


def test_memory_not_a_size() -> None:
    """A memory value that is not a size names the key and gives examples."""
    _fails(
        _group(p1={"host": "h1", "kernel": "/k", "memory": "12X"}),
        r"vms\.p1\.memory: '12X' is not a size",
    )


def test_unknown_key() -> None:
    """A misspelt key is named as unknown."""
    _fails(
        _group(p1={"host": "h1", "kernel": "/k", "memroy": "1G"}),
        r"vms\.p1\.memroy: is not a known key",
    )


def test_bad_mac_and_multicast_mac() -> None:
    """A malformed MAC and a multicast MAC are both refused."""
    _fails(
        _group(p1={"host": "h1", "kernel": "/k", "nics": [{"network": "lan", "mac": "zz"}]}),
        "is not a MAC",
    )
    _fails(
        _group(
            p1={
                "host": "h1",
                "kernel": "/k",
                "nics": [{"network": "lan", "mac": "01:00:5e:00:00:01"}],
            }
        ),
        "multicast MAC",
    )


def test_unknown_network() -> None:
    """A NIC on a network not in [networks] is refused."""
    _fails(
        _group(
            p1={
                "host": "h1",
                "kernel": "/k",
                "nics": [{"network": "wan", "mac": "52:54:00:00:00:09"}],
            }
        ),
        "unknown network 'wan'",
    )


def test_bad_address_and_accel_and_boot() -> None:
    """Bad HOST:PORT, an unknown accelerator, and a VM with nothing to boot are refused."""
    g = _group()
    g["hosts"]["h1"]["address"] = "nowhere"
    _fails(g, r"hosts\.h1\.address: 'nowhere' is not HOST:PORT")
    _fails(_group(p1={"host": "h1", "kernel": "/k", "accel": "xen"}), r"vms\.p1\.accel")
    _fails(_group(p1={"host": "h1"}), "needs a disk or a kernel")


def test_unsafe_vm_name() -> None:
    """Names reach paths and command lines: traversal and shell characters are refused."""
    _fails(_group(**{"../x": {"host": "h1", "kernel": "/k"}}), "VM name '../x' is not allowed")
    _fails(_group(**{"a;rm": {"host": "h1", "kernel": "/k"}}), "is not allowed")
    with pytest.raises(ValueError, match="not allowed"):
        validate_name("state", "a/b")


def test_missing_image_file(tmp_path: Path) -> None:
    """A disk, kernel or initrd that is not there is named with its path."""
    f = tmp_path / "g.toml"
    f.write_text('[hosts.h1]\naddress = "1.2.3.4:1"\n[vms.p1]\nhost = "h1"\nkernel = "vmlinuz"\n')
    with pytest.raises(ConfigError, match=rf"vms\.p1\.kernel: no such file {tmp_path}/vmlinuz"):
        load_group(f)
    (tmp_path / "vmlinuz").write_bytes(b"k")
    assert load_group(f).vms["p1"].kernel == tmp_path / "vmlinuz"


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    """No group file, and a file that is not TOML, each get one sentence."""
    with pytest.raises(ConfigError, match="no such group file"):
        load_group(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("hosts = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_group(bad)


def test_group_file_path_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """-g wins over $LOCKSTEP_GROUP, which wins over ./lockstep.toml."""
    monkeypatch.delenv("LOCKSTEP_GROUP", raising=False)
    assert group_file_path(None) == Path("lockstep.toml")
    monkeypatch.setenv("LOCKSTEP_GROUP", "/e.toml")
    assert group_file_path(None) == Path("/e.toml")
    assert group_file_path("/g.toml") == Path("/g.toml")


def test_disks_plain_paths_tables_and_the_one_disk_key() -> None:
    """``disks`` takes paths and tables; ``disk = PATH`` is one writable disk; not both.

    Read-only and shareable disks are the ones states leave alone, each with
    why; relative paths are taken from the group file's folder.
    """
    data = _group(
        p1={"host": "h1", "kernel": "/k", "disk": "/img/root.qcow2"},
        p2={
            "host": "h1",
            "kernel": "/k",
            "disks": [
                "/img/root.qcow2",
                {"path": "/img/iso", "readonly": True, "format": "raw"},
                {"path": "/srv/shared.img", "shareable": True},
            ],
        },
    )
    g = parse_group(data, "g.toml", check_files=False)
    assert [d.path for d in g.vms["p1"].disks] == [Path("/img/root.qcow2")]
    p2 = g.vms["p2"]
    assert [d.left_alone for d in p2.disks] == ["", "read-only", "shareable (shared storage)"]
    assert [d.path for d in p2.layered_disks] == [Path("/img/root.qcow2")]
    assert p2.disks[1].format == "raw"
    both = _group(p1={"host": "h1", "kernel": "/k", "disk": "/a", "disks": ["/b"]})
    _fails(both, "vms.p1: give disk or disks, not both")
    _fails(
        _group(p1={"host": "h1", "kernel": "/k", "disks": [{"path": "/a", "format": "vmdk"}]}),
        r"vms\.p1\.disks\.0\.format: .*'qcow2' or 'raw'",
    )


def test_relative_disk_paths_and_missing_disk_files(tmp_path: Path) -> None:
    """Disk paths are taken from the group file's folder; a missing one is named by its index."""
    (tmp_path / "k").write_bytes(b"")
    (tmp_path / "root.qcow2").write_bytes(b"")
    f = tmp_path / "g.toml"
    f.write_text(
        '[hosts.h1]\naddress = "10.0.0.1:7443"\n'
        '[vms.p1]\nhost = "h1"\nkernel = "k"\n'
        'disks = ["root.qcow2", { path = "data.qcow2" }]\n'
    )
    with pytest.raises(ConfigError, match=r"vms\.p1\.disks\.1: no such file .*data\.qcow2"):
        load_group(f)
    (tmp_path / "data.qcow2").write_bytes(b"")
    g = load_group(f)
    assert [d.path for d in g.vms["p1"].disks] == [tmp_path / "root.qcow2", tmp_path / "data.qcow2"]


def test_libvirt_domain_needs_only_its_host_and_takes_the_hosts_uri() -> None:
    """A libvirt VM names its domain (default: its own name) and gets its host's libvirt URI.

    Keys only lockstep's QEMU driver uses are refused for it (the domain has
    its own), and so are domain keys on a QEMU VM; two VMs cannot be one domain.
    """
    data = _group(
        db1={"host": "h1", "driver": "libvirt"},
        db2={"host": "h2", "driver": "libvirt", "domain": "db-two"},
    )
    data["hosts"]["h2"]["libvirt"] = "qemu+ssh://root@10.0.0.2/system"
    g = parse_group(data, "g.toml", check_files=False)
    assert (g.vms["db1"].domain_name, g.vms["db1"].libvirt) == ("db1", "qemu:///system")
    assert (g.vms["db2"].domain_name, g.vms["db2"].libvirt) == (
        "db-two",
        "qemu+ssh://root@10.0.0.2/system",
    )
    _fails(
        _group(db1={"host": "h1", "driver": "libvirt", "memory": "1G", "disk": "/a"}),
        "VM 'db1' is a libvirt domain: disk, memory is only for driver qemu",
    )
    _fails(
        _group(p1={"host": "h1", "kernel": "/k", "domain": "x"}),
        "vms.p1: domain and define are for driver libvirt",
    )
    _fails(
        _group(
            a={"host": "h1", "driver": "libvirt", "domain": "x"},
            b={"host": "h1", "driver": "libvirt", "domain": "x"},
        ),
        "VMs 'a' and 'b' are both domain 'x' on host 'h1'",
    )
    bad_uri = _group()
    bad_uri["hosts"]["h1"]["libvirt"] = "system"
    _fails(bad_uri, r"hosts\.h1\.libvirt: 'system' is not a libvirt URI")


def test_guest_time_is_the_groups_unless_a_vm_says() -> None:
    """Each VM's guest_time: "true" by default, else the group's, else its own."""
    vms = {
        "p1": {"host": "h1", "kernel": "/k"},
        "s1": {"host": "h2", "kernel": "/k", "guest_time": "true"},
    }
    plain = parse_group(_group(**vms), "g.toml", check_files=False)
    assert {n: v.guest_time for n, v in plain.vms.items()} == {"p1": "true", "s1": "true"}
    kept = parse_group({**_group(**vms), "guest_time": "saved"}, "g.toml", check_files=False)
    assert kept.guest_time == "saved"
    assert {n: v.guest_time for n, v in kept.vms.items()} == {"p1": "saved", "s1": "true"}


@pytest.mark.parametrize(
    ("where", "value", "shown"),
    [("group", True, "true"), ("group", "now", "'now'"), ("vm", "host", "'host'")],
)
def test_bad_guest_time_says_what_it_may_be(where: str, value: object, shown: str) -> None:
    """A guest_time that is neither "true" nor "saved" (a TOML boolean too) is one sentence."""
    if where == "group":
        data, key = {**_group(), "guest_time": value}, "guest_time"
    else:
        data, key = (
            _group(p1={"host": "h1", "kernel": "/k", "guest_time": value}),
            "vms.p1.guest_time",
        )
    _fails(data, rf'^g\.toml: {key}: is {shown}; it must be "true" .* or "saved" .*, in quotes$')
