"""The QEMU argv builder: pure, so each VM's two processes are migration-compatible."""

from __future__ import annotations

from pathlib import Path

import pytest

from lockstep.group import NicSpec, VmSpec
from lockstep.vm.argv import RAM_BACKEND_ID, Drive, RamFile, VmPaths, qemu_argv


def _spec(**kw: object) -> VmSpec:
    base: dict[str, object] = {
        "name": "p1",
        "host": "h1",
        "memory": "256M",
        "kernel": "/img/vmlinuz",
        "initrd": "/img/initrd",
        "cmdline": "console=ttyS0 root=/dev/vda",
        "disk": "/img/rootfs.qcow2",
        "nics": [NicSpec(network="lan", mac="52:54:00:00:00:01", bridge="lsvm")],
    }
    base.update(kw)
    return VmSpec.model_validate(base)


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_runs_the_active_layer_never_the_base() -> None:
    """The disk QEMU opens is the layer given, not the spec's base image."""
    argv = qemu_argv(
        _spec(),
        VmPaths(Path("/run/p1")),
        drives=[Drive(Path("/l/p1-a.qcow2"), "qcow2")],
        taps=["tap0"],
    )
    drives = _opt(argv, "-drive")
    assert drives == ["file=/l/p1-a.qcow2,if=none,id=drive0,format=qcow2,cache=writeback"]
    assert "/img/rootfs.qcow2" not in " ".join(argv)


def test_argv_opens_every_disk_in_order_layers_and_left_alone_ones() -> None:
    """Each disk is one drive and one virtio-blk device, in the spec's order.

    The first keeps the ids a one-disk VM always had (drive0, vd0), so a state
    saved before VMs had several disks still loads; a read-only disk is opened
    read-only and a shareable one lets other VMs write it too. Every file of
    a layered disk's chain keeps its page cache when QEMU activates it.
    """
    spec = _spec(
        disk=None,
        disks=["/img/root.qcow2", "/img/data.qcow2", {"path": "/iso", "readonly": True},
               {"path": "/shared.img", "shareable": True}],
    )  # fmt: skip
    drives = [
        Drive(Path("/l/a.qcow2"), "qcow2", below=1),
        Drive(Path("/l/b.qcow2"), "qcow2", below=2),
        Drive(Path("/iso"), "raw", readonly=True),
        Drive(Path("/shared.img"), "raw", shareable=True),
    ]
    argv = qemu_argv(spec, VmPaths(Path("/r")), drives=drives, taps=["t"])
    assert _opt(argv, "-drive") == [
        "file=/l/a.qcow2,if=none,id=drive0,format=qcow2,cache=writeback,"
        "file.drop-cache=off,backing.file.drop-cache=off",
        "file=/l/b.qcow2,if=none,id=drive1,format=qcow2,cache=writeback,file.drop-cache=off,"
        "backing.file.drop-cache=off,backing.backing.file.drop-cache=off",
        "file=/iso,if=none,id=drive2,format=raw,cache=writeback,readonly=on",
        "file=/shared.img,if=none,id=drive3,format=raw,cache=writeback",
    ]
    assert [d for d in _opt(argv, "-device") if "drive=" in d] == [
        "virtio-blk-pci,drive=drive0,id=vd0",
        "virtio-blk-pci,drive=drive1,id=vd1",
        "virtio-blk-pci,drive=drive2,id=vd2",
        "virtio-blk-pci,drive=drive3,id=vd3,share-rw=on",
    ]
    with pytest.raises(ValueError, match="4 disks but 1 files given"):
        qemu_argv(spec, VmPaths(Path("/r")), drives=drives[:1], taps=["t"])


def test_argv_nics_use_our_taps_and_fixed_macs() -> None:
    """Each NIC is a tap we made (no scripts) with the spec's MAC, in order."""
    spec = _spec(
        nics=[
            NicSpec(network="a", mac="52:54:00:00:00:01"),
            NicSpec(network="b", mac="52:54:00:00:00:02"),
        ]
    )
    argv = qemu_argv(
        spec, VmPaths(Path("/r")), drives=[Drive(Path("/l.qcow2"), "qcow2")], taps=["t0", "t1"]
    )
    assert _opt(argv, "-netdev") == [
        "tap,id=net0,ifname=t0,script=no,downscript=no",
        "tap,id=net1,ifname=t1,script=no,downscript=no",
    ]
    assert [d for d in _opt(argv, "-device") if "netdev" in d] == [
        "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,id=nic0",
        "virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02,id=nic1",
    ]


def test_argv_incoming_waits_paused_for_memory() -> None:
    """A restore starts QEMU with -incoming defer and -S: nothing runs before cont."""
    argv = qemu_argv(
        _spec(), VmPaths(Path("/r")), drives=[Drive(Path("/l"), "qcow2")], taps=["t"], incoming=True
    )
    assert _opt(argv, "-incoming") == ["defer"]
    assert "-S" in argv
    plain = qemu_argv(_spec(), VmPaths(Path("/r")), drives=[Drive(Path("/l"), "qcow2")], taps=["t"])
    assert "-S" not in plain and "-incoming" not in plain


def test_argv_same_devices_for_save_and_restore() -> None:
    """Apart from -incoming/-S, a restored VM's argv equals the saved one's (migration needs it)."""
    paths = VmPaths(Path("/r"))
    a = qemu_argv(_spec(), paths, drives=[Drive(Path("/l"), "qcow2")], taps=["t"])
    b = qemu_argv(_spec(), paths, drives=[Drive(Path("/l"), "qcow2")], taps=["t"], incoming=True)
    assert [x for x in b if x not in ("-incoming", "defer", "-S")] == a


def test_argv_sockets_logs_and_accel() -> None:
    """QMP, console log (appended) and channel sockets live in the VM's run dir; accel as asked."""
    argv = qemu_argv(
        _spec(accel="kvm"),
        VmPaths(Path("/run/p1")),
        drives=[Drive(Path("/l"), "qcow2")],
        taps=["t"],
    )
    chardevs = _opt(argv, "-chardev")
    assert "socket,id=qmp,path=/run/p1/qmp.sock,server=on,wait=off" in chardevs
    assert "file,id=console,path=/run/p1/console.log,append=on" in chardevs
    assert "socket,id=channel,path=/run/p1/channel.sock,server=on,wait=off" in chardevs
    assert _opt(argv, "-machine") == ["pc,accel=kvm"]
    assert _opt(argv, "-cpu") == ["host"]
    assert (
        _opt(
            qemu_argv(
                _spec(), VmPaths(Path("/r")), drives=[Drive(Path("/l"), "qcow2")], taps=["t"]
            ),
            "-cpu",
        )
        == []
    )
    assert _opt(argv, "-m") == ["256M"]


def test_argv_gives_every_vm_a_guest_agent_port_after_its_other_devices() -> None:
    """A virtio-serial port named org.qemu.guest_agent.0 on a socket in the run dir, last.

    Coming after the disks and the NICs, it leaves their PCI slots where they
    always were.
    """
    argv = qemu_argv(
        _spec(), VmPaths(Path("/run/p1")), drives=[Drive(Path("/l"), "qcow2")], taps=["t"]
    )
    assert "socket,id=agent,path=/run/p1/agent.sock,server=on,wait=off" in _opt(argv, "-chardev")
    devices = _opt(argv, "-device")
    assert devices[-2:] == [
        "virtio-serial-pci,id=vser0",
        "virtserialport,bus=vser0.0,chardev=agent,name=org.qemu.guest_agent.0,id=agent0",
    ]
    assert devices[0].startswith("virtio-blk-pci") and devices[1].startswith("virtio-net-pci")


def test_argv_escapes_commas_in_paths() -> None:
    """A comma in a path is doubled so QEMU's option parser keeps it in the value."""
    argv = qemu_argv(
        _spec(), VmPaths(Path("/r,x")), drives=[Drive(Path("/a,b.qcow2"), "qcow2")], taps=["t"]
    )
    assert "file=/a,,b.qcow2,if=none" in _opt(argv, "-drive")[0]
    assert "path=/r,,x/qmp.sock" in _opt(argv, "-chardev")[0]


def test_argv_refuses_tap_count_mismatch() -> None:
    """One tap per NIC, or the builder refuses."""
    with pytest.raises(ValueError, match="1 NICs but 0 taps"):
        qemu_argv(_spec(), VmPaths(Path("/r")), drives=[Drive(Path("/l"), "qcow2")], taps=[])


def test_argv_extra_args_come_last() -> None:
    """User extra args are appended verbatim at the end."""
    argv = qemu_argv(
        _spec(extra_args=["-rtc", "base=utc"]),
        VmPaths(Path("/r")),
        drives=[Drive(Path("/l"), "qcow2")],
        taps=["t"],
    )
    assert argv[-2:] == ["-rtc", "base=utc"]


def test_argv_standard_memory_is_anonymous() -> None:
    """Without a RAM file guest RAM is plain ``-m``: no memory backend object at all."""
    argv = qemu_argv(
        _spec(), VmPaths(Path("/r")), drives=[Drive(Path("/l.qcow2"), "qcow2")], taps=["t0"]
    )
    assert _opt(argv, "-m") == ["256M"]
    assert _opt(argv, "-machine") == ["pc,accel=tcg"]
    assert not [o for o in _opt(argv, "-object") if "memory-backend" in o]


@pytest.mark.parametrize(("shared", "share"), [(True, "on"), (False, "off")])
def test_argv_fast_memory_is_a_file_backend(shared: bool, share: str) -> None:
    """The fast path's RAM is one memory-backend-file named like a plain pc's RAM.

    Same size as ``-m``, the machine's memory backend, ``share=on`` for the
    VM's own file and ``share=off`` (private copy-on-write) for a state's image.
    """
    ram = RamFile(Path("/run/p1,x/guest.ram"), shared=shared)
    argv = qemu_argv(
        _spec(memory="1G"),
        VmPaths(Path("/r")),
        drives=[Drive(Path("/l.qcow2"), "qcow2")],
        taps=["t0"],
        ram=ram,
    )
    assert RAM_BACKEND_ID == "pc.ram"
    assert _opt(argv, "-m") == ["1G"]
    assert _opt(argv, "-machine") == ["pc,accel=tcg,memory-backend=pc.ram"]
    assert _opt(argv, "-object") == [
        f"memory-backend-file,id=pc.ram,mem-path=/run/p1,,x/guest.ram,size=1G,share={share}"
    ]


def test_argv_fast_and_standard_differ_only_in_memory() -> None:
    """Both paths build the same devices in the same order: only the RAM options change."""
    spec = _spec()
    paths = VmPaths(Path("/r"))
    std = qemu_argv(
        spec, paths, drives=[Drive(Path("/l.qcow2"), "qcow2")], taps=["t0"], incoming=True
    )
    fast = qemu_argv(
        spec,
        paths,
        drives=[Drive(Path("/l.qcow2"), "qcow2")],
        taps=["t0"],
        incoming=True,
        ram=RamFile(paths.ram, shared=True),
    )
    i = fast.index("-object")
    assert fast[:i] + fast[i + 2 :] == [
        a.replace("pc,accel=tcg", "pc,accel=tcg,memory-backend=pc.ram") for a in std
    ]
