"""Pure builder of QEMU command lines from a VM spec.

Everything that makes two QEMU processes of the same VM compatible for
migration (machine type, devices, their ids and order) is decided here and only
here, so a VM saved by one process can always be loaded by the next one.

Every VM gets a channel for a QEMU guest agent (a ``virtio-serial`` port named
``org.qemu.guest_agent.0`` on a socket in its run dir): a guest that runs
``qemu-ga`` lets lockstep set its wall clock after a restore. Its devices come
after the disks and the NICs, so theirs keep the PCI slots they always had.

Guest RAM is either anonymous memory (plain ``-m``) or a file
(:class:`RamFile`, ``memory-backend-file``; see :mod:`lockstep.vm.memory`). The
file backend takes the id QEMU gives the RAM of a plain ``-m`` pc machine,
``pc.ram``, so its RAM block has the same name either way and a migration
stream written by one kind of VM loads into the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lockstep.group import VmSpec
from lockstep.units import format_size

__all__ = [
    "AGENT_CHARDEV",
    "AGENT_PORT",
    "QEMU_BINARY",
    "RAM_BACKEND_ID",
    "Drive",
    "RamFile",
    "VmPaths",
    "drive_id",
    "keep_cache",
    "qemu_argv",
]

QEMU_BINARY = "qemu-system-x86_64"
# The id of a pc machine's default RAM backend: the RAM block keeps its name.
RAM_BACKEND_ID = "pc.ram"
# The guest agent's channel: QEMU's chardev id for it (query-chardev's label),
# and the port name qemu-ga looks for in the guest.
AGENT_CHARDEV = "agent"
AGENT_PORT = "org.qemu.guest_agent.0"


@dataclass(frozen=True)
class RamFile:
    """Guest RAM as a file (``memory-backend-file``) instead of anonymous memory.

    ``shared`` (``share=on``): the guest writes into the file itself; it is the
    VM's own RAM file, which a save with ``x-ignore-shared`` leaves out of the
    migration stream. Not shared (``share=off``): a private copy-on-write
    mapping of a state's RAM image; pages are read from it when first touched
    and the guest's writes stay in the QEMU process, never in the file.
    """

    path: Path
    shared: bool


@dataclass(frozen=True)
class Drive:
    """One disk as QEMU opens it: the file (a layered disk's active layer) and how.

    A ``readonly`` drive is opened read-only; a ``shareable`` one lets other
    VMs write the same image at once (``share-rw``).
    """

    path: Path
    format: str  # "qcow2" for every layer
    readonly: bool = False
    shareable: bool = False
    # A layered disk: how many files its chain has below ``path`` (its older
    # layers and its base); their host page cache is kept (:func:`keep_cache`).
    below: int | None = None


def keep_cache(below: int) -> str:
    """-drive options that keep the host page cache of a chain's files when QEMU activates them.

    A save's migration leaves every disk node inactive, and ``cont``
    activates them again before the vCPUs start. By default each file node is
    first synced and its page cache dropped (``drop-cache``, meant for storage
    shared with another host), so every qcow2 of the chain is read from disk
    again before the resume: ``python -m bench.activate`` measured ``cont`` to
    QEMU's RESUME at 32 ms p50 for two disks of 30 layers, 10 ms with the cache
    kept. The
    option is set on the file node of ``path`` and of each of the ``below``
    files under it.
    """
    return "".join(f",{'backing.' * level}file.drop-cache=off" for level in range(below + 1))


def drive_id(index: int) -> str:
    """The QEMU id of disk ``index`` (``drive0`` is the first, as it always was)."""
    return f"drive{index}"


@dataclass(frozen=True)
class VmPaths:
    """Where one VM's QEMU keeps its sockets and logs (execd's runtime dir for it).

    ``logdir`` holds the console log when it is not ``rundir``: a VM being
    restored runs from a folder of its own until the restore commits, while its
    console goes on in the VM's one log.
    """

    rundir: Path
    logdir: Path | None = None

    @property
    def qmp(self) -> Path:
        """QMP control socket (QEMU listens)."""
        return self.rundir / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        """QEMU writes its pid here; execd re-attaches through it after a restart."""
        return self.rundir / "qemu.pid"

    @property
    def console(self) -> Path:
        """Serial console (ttyS0), appended across QEMU restarts."""
        return (self.logdir or self.rundir) / "console.log"

    @property
    def channel(self) -> Path:
        """Second serial port (ttyS1) as a unix socket, for a guest agent."""
        return self.rundir / "channel.sock"

    @property
    def agent(self) -> Path:
        """The guest agent's virtio-serial port as a unix socket (QEMU listens)."""
        return self.rundir / "agent.sock"

    @property
    def stderr(self) -> Path:
        """QEMU's own stderr, quoted in errors when it fails."""
        return self.rundir / "qemu.stderr"

    @property
    def ram(self) -> Path:
        """The VM's own RAM file, when its RAM is a shared file (the fast memory path)."""
        return self.rundir / "guest.ram"


def _opt(path: Path) -> str:
    """A path as a QEMU option value (commas doubled)."""
    return str(path).replace(",", ",,")


def qemu_argv(
    spec: VmSpec,
    paths: VmPaths,
    *,
    drives: Sequence[Drive],
    taps: Sequence[str],
    incoming: bool = False,
    paused: bool = False,
    ram: RamFile | None = None,
    qemu_binary: str = QEMU_BINARY,
) -> list[str]:
    """The full argv of QEMU for ``spec``.

    ``drives`` are the files of ``spec.disks`` in order (a layered disk's
    active qcow2 layer, never its base image), ``taps`` the tap device for
    each NIC in order. ``incoming`` waits for memory through
    ``migrate-incoming``; ``paused`` (or ``incoming``) keeps the vCPUs stopped
    until ``cont``. ``ram`` puts guest RAM in a file; None keeps it anonymous.
    """
    if len(taps) != len(spec.nics):
        raise ValueError(f"VM {spec.name}: {len(spec.nics)} NICs but {len(taps)} taps given")
    if len(drives) != len(spec.disks):
        raise ValueError(f"VM {spec.name}: {len(spec.disks)} disks but {len(drives)} files given")
    machine = f"pc,accel={spec.accel}"
    if ram is not None:
        machine += f",memory-backend={RAM_BACKEND_ID}"
    argv = [
        qemu_binary,
        "-name", f"{spec.name},debug-threads=on",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-machine", machine,
        "-m", format_size(spec.memory),
        "-smp", str(spec.vcpus),
        "-pidfile", str(paths.pidfile),
        "-chardev", f"socket,id=qmp,path={_opt(paths.qmp)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"file,id=console,path={_opt(paths.console)},append=on",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=channel,path={_opt(paths.channel)},server=on,wait=off",
        "-serial", "chardev:channel",
    ]  # fmt: skip
    if ram is not None:
        argv += [
            "-object",
            f"memory-backend-file,id={RAM_BACKEND_ID},mem-path={_opt(ram.path)},"
            f"size={format_size(spec.memory)},share={'on' if ram.shared else 'off'}",
        ]
    if spec.accel == "kvm":
        argv += ["-cpu", "host"]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
        if spec.cmdline:
            argv += ["-append", spec.cmdline]
    for i, drive in enumerate(drives):
        ro = ",readonly=on" if drive.readonly else ""
        share = ",share-rw=on" if drive.shareable else ""
        kept = "" if drive.below is None else keep_cache(drive.below)
        argv += [
            "-drive",
            f"file={_opt(drive.path)},if=none,id={drive_id(i)},format={drive.format},"
            f"cache=writeback{ro}{kept}",
            "-device", f"virtio-blk-pci,drive={drive_id(i)},id=vd{i}{share}",
        ]  # fmt: skip
    for i, (nic, tap) in enumerate(zip(spec.nics, taps, strict=True)):
        argv += [
            "-netdev", f"tap,id=net{i},ifname={tap},script=no,downscript=no",
            "-device", f"{nic.model},netdev=net{i},mac={nic.mac},id=nic{i}",
        ]  # fmt: skip
    port = f"virtserialport,bus=vser0.0,chardev={AGENT_CHARDEV},name={AGENT_PORT},id=agent0"
    argv += [
        "-chardev", f"socket,id={AGENT_CHARDEV},path={_opt(paths.agent)},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", port,
    ]  # fmt: skip
    if incoming:
        argv += ["-incoming", "defer"]
    if paused or incoming:
        argv.append("-S")
    argv += spec.extra_args
    return argv
