"""The embedded lab: hosts as namespaces, an execd in each, VMs in pairs, a group file.

``lockstep lab up`` builds (or reuses) the guest image, makes the network
(:mod:`lockstep.lab.topology`), a CA and certificates, starts one
``lockstep-execd`` inside each host namespace, writes the group file and starts
the VMs through the same caller as ``lockstep up``. Everything it makes is in
its ledger first, so ``lockstep lab down`` removes exactly that, even after a
crash halfway; processes are also found by the paths lockstep gave them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from lockstep.caller.connect import clients_for
from lockstep.errors import LabError, LockstepError
from lockstep.group import GroupSpec, load_group
from lockstep.lab.cluster import ClusterPlan, form_cluster, plan_cluster
from lockstep.lab.clusterconf import (
    MIDDLEWARE_PACKAGES,
    PACEMAKER_MIN_MEMORY,
    ClusterKind,
    ClusterSpec,
    Member,
)
from lockstep.lab.domains import (
    domain_xml,
    lab_tap,
    libvirt_uri,
    libvirtd_argv,
    socket_path,
    write_libvirt_root,
)
from lockstep.lab.guestctl import GuestControl
from lockstep.lab.image import GuestImage, build_image
from lockstep.lab.ledger import Ledger, PathEntry, ProcessEntry, lab_ledger_path
from lockstep.lab.topology import LabPlan, lab_down, lab_up, plan_lab, vm_ip
from lockstep.proc import arun
from lockstep.rpc import HostClient, issue, make_ca
from lockstep.units import format_size, parse_size
from lockstep.vm.argv import VmPaths
from lockstep.vm.domain import libvirt_module

__all__ = [
    "EXECD_PORT",
    "LabOptions",
    "LabVm",
    "channel_path",
    "console_log_path",
    "guest",
    "lab_cluster",
    "lab_data_dir",
    "plan_vms",
    "take_down",
    "bring_up",
    "vm_paths",
]

EXECD_PORT = 7443
AGENT_PATH = "/usr/lib/lockstep/lsagent.py"  # where image.py installs guest/lsagent.py
GUEST_CLOCK = "clocksource=hpet tsc=unstable"
"""Guests keep time with QEMU's HPET and never with their TSC.

Under TCG a guest calibrates its TSC at boot against emulated timers; on a busy
host that calibration can be far off, and a guest was seen keeping time 2.6
times too fast for its whole life (its peers' 1 s heartbeats arrived every
2.6 s of its own clock: a false failover). The HPET counts QEMU's virtual clock,
so it is right however busy the host is, and stops while the VM is paused, as
the TSC does. ``tsc=unstable`` keeps the kernel's scheduler clock off the TSC too.
"""
Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class LabVm:
    """One lab guest: where it runs, its role in its pair, its addresses."""

    name: str
    host: str
    role: str  # "primary" or "standby"
    peer: str  # the other VM of its pair
    ip: str
    mac: str


@dataclass(frozen=True)
class LabOptions:
    """What ``lockstep lab up`` was asked for."""

    name: str = "lslab"
    hosts: int = 2
    vms: int = 4
    memory: str = "256M"
    heartbeat: float = 1.0
    timeout: float = 3.0
    stream_rate: int = 20  # packets per second from every guest to every other guest
    disks: int = 1  # per VM: the root disk, then empty data disks (/dev/vdb...)
    # libvirt: the VMs are domains (lab.domains); mixed: the standbys are, the primaries are not
    driver: Literal["qemu", "libvirt", "mixed"] = "qemu"
    clock_offsets: Mapping[str, float] = field(default_factory=dict)
    extra_packages: Sequence[str] = ()
    start: Mapping[str, str] = field(default_factory=dict)  # VM name -> extra start command
    group_file: Path = Path("lockstep.toml")
    lan_subnet: str = "10.123.0.0/24"
    vm_subnet: str = "10.124.0.0/24"
    cluster: ClusterSpec = field(default_factory=ClusterSpec)  # the middleware beside the agent
    cluster_timeout: float = 300.0  # seconds for the middleware to form once the guests run


def lab_data_dir(name: str) -> Path:
    """Where a lab keeps its hosts' roots, certificates and logs."""
    return lab_ledger_path(name).parent / "data"


def plan_vms(plan: LabPlan, count: int) -> list[LabVm]:
    """Place ``count`` VMs as primary/standby pairs, as in the paper.

    Pair k is ``p<k>``/``s<k>``; primaries go on the even-numbered hosts'
    first one (h1 with two hosts), standbys on the next host.

    Raises:
        LabError: ``count`` is not a positive even number, or there are too few hosts.
    """
    if count < 2 or count % 2:
        raise LabError(f"the lab runs VMs in primary/standby pairs: --vms {count} is not even")
    if len(plan.hosts) < 2:
        raise LabError("the lab needs at least 2 hosts for primary/standby pairs")
    n = len(plan.hosts)
    out: list[LabVm] = []
    for k in range(count // 2):
        p_host = plan.hosts[(2 * k) % n if n > 2 else 0].name
        s_host = plan.hosts[((2 * k) % n + 1) % n if n > 2 else 1].name
        for role, name, peer, host in (
            ("primary", f"p{k + 1}", f"s{k + 1}", p_host),
            ("standby", f"s{k + 1}", f"p{k + 1}", s_host),
        ):
            i = len(out)
            out.append(
                LabVm(
                    name=name,
                    host=host,
                    role=role,
                    peer=peer,
                    ip=vm_ip(plan, i),
                    mac=f"52:54:00:4c:53:{i + 1:02x}",
                )
            )
    return out


def host_root(data: Path, host: str) -> Path:
    """The root directory of lab host ``host``'s execd (its run, states and staging dirs)."""
    return data / "hosts" / host / "root"


def vm_run_dir(data: Path, host: str, vm: str) -> Path:
    """Where lab host ``host``'s execd keeps VM ``vm``'s QEMU files (pid, sockets, console log)."""
    return host_root(data, host) / "run" / vm


def _write_execd_config(data: Path, host: str, listen: str) -> Path:
    hdir = data / "hosts" / host
    hdir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "host": host,
        "root": str(host_root(data, host)),
        "listen": listen,
        "tls": {
            "ca": str(data / "certs" / "ca.pem"),
            "cert": str(data / "certs" / f"{host}.pem"),
            "key": str(data / "certs" / f"{host}.key"),
        },
    }
    path = hdir / "execd.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def _start_execd(
    netns: str, config: Path, offset: float, log: Path, env: Mapping[str, str] | None = None
) -> int:
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "lockstep.cli.execd"]
    argv += ["--config", str(config)]
    if offset:
        argv += ["--clock-offset", repr(offset)]
    environ = {k: v for k, v in os.environ.items() if k != "LOCKSTEP_FAULT"} | dict(env or {})
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env=environ,
        )
    return proc.pid


DATA_DISK_SIZE = "64M"


def data_disks(data: Path, count: int) -> list[Path]:
    """The empty base images of the lab VMs' data disks (never written: each VM has a layer)."""
    return [data / "disks" / f"data{i}.qcow2" for i in range(1, count)]


async def _make_data_disks(data: Path, count: int) -> list[Path]:
    paths = data_disks(data, count)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        await arun(["qemu-img", "create", "-q", "-f", "qcow2", str(path), DATA_DISK_SIZE])
    return paths


def libvirt_root(data: Path, host: str) -> Path:
    """The folder of lab host ``host``'s libvirtd (libvirt mode)."""
    return data / "hosts" / host / "libvirt"


def _start_libvirtd(netns: str, root: Path) -> int:
    """Start the libvirtd of ``root`` in ``netns`` (:mod:`lockstep.lab.domains`); its pid."""
    write_libvirt_root(root)
    with open(root / "libvirtd.log", "ab") as out:
        proc = subprocess.Popen(
            libvirtd_argv(netns, root),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    return proc.pid


async def _wait_libvirtd(
    host: str, root: Path, daemon: ProcessEntry, timeout: float = 30.0
) -> None:
    """Wait until lab host ``host``'s libvirtd answers at its URI (its socket first).

    Raises:
        LabError: it exited, or did not answer in ``timeout`` seconds (its log is named).
    """
    deadline = time.monotonic() + timeout
    log = root / "libvirtd.log"
    lv = libvirt_module()
    why = ""
    while True:
        if not daemon.alive():  # a zombie too: nobody reaps the lab's daemons
            raise LabError(f"libvirtd of lab host {host} exited{why} (its log: {log})")
        if time.monotonic() > deadline:
            raise LabError(
                f"libvirtd of lab host {host} did not answer in {timeout:g} s{why} (its log: {log})"
            )
        if socket_path(root).exists():
            try:
                conn = await asyncio.to_thread(lv.open, libvirt_uri(root))
            except lv.libvirtError as exc:
                why = f": {str(exc).strip()}"
            else:
                conn.close()
                return
        await asyncio.sleep(0.2)


def domain_disks(data: Path, vm: str, count: int) -> list[Path]:
    """Lab domain ``vm``'s own disk files (libvirt mode): its root disk, then its data disks."""
    return [data / "domains" / vm / f"vd{chr(ord('a') + i)}.qcow2" for i in range(count)]


_DOMAINS = {"libvirt": "the VMs", "mixed": "the standbys (the primaries are QEMU VMs)"}


async def _define_domains(
    opts: LabOptions,
    plan: LabPlan,
    image: GuestImage,
    defined: Sequence[LabVm],
    vms: Sequence[LabVm],
    data: Path,
) -> dict[str, Path]:
    """The domain XML file and disks of each VM of ``defined``, by VM (``vms``: all of them)."""
    bridges = {h.name: h.vm_bridge for h in plan.hosts}
    bases = [image.rootfs, *data_disks(data, opts.disks)]
    out = {}
    for vm in defined:
        files = domain_disks(data, vm.name, opts.disks)
        files[0].parent.mkdir(parents=True, exist_ok=True)
        for base, file in zip(bases, files, strict=True):
            backed = ["-F", "qcow2", "-b", str(base)]
            await arun(["qemu-img", "create", "-q", "-f", "qcow2", *backed, str(file)])
        paths = vm_paths(data, vm.host, vm.name)
        paths.rundir.mkdir(parents=True, exist_ok=True)
        xml = domain_xml(
            name=vm.name,
            memory=parse_size(opts.memory),
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=_cmdline(opts, plan, image, vm, vms),
            disks=files,
            bridge=bridges[vm.host],
            mac=vm.mac,
            tap=lab_tap(vm.name, 0),
            console=paths.console,
            channel=paths.channel,
            agent=paths.agent,
        )
        out[vm.name] = data / "domains" / f"{vm.name}.xml"
        out[vm.name].write_text(xml)
    return out


def _cmdline(
    opts: LabOptions, plan: LabPlan, image: GuestImage, vm: LabVm, vms: Sequence[LabVm]
) -> str:
    return image.cmdline(
        hostname=vm.name,
        ip=f"{vm.ip}/{ipaddress.IPv4Network(plan.vm_subnet).prefixlen}",
        start=_start_command(opts, vm, vms),
        extra=GUEST_CLOCK,
    )


def _group_document(
    opts: LabOptions,
    plan: LabPlan,
    image: GuestImage,
    vms: Sequence[LabVm],
    data: Path,
    domains: Mapping[str, Path],
) -> dict[str, Any]:
    """The lab's group file; ``domains``: each VM's domain XML file in libvirt mode."""
    certs = data / "certs"
    hosts: dict[str, dict[str, str]] = {
        h.name: {"address": f"{h.lan_ip}:{EXECD_PORT}"} for h in plan.hosts
    }
    if domains:
        for h in plan.hosts:
            hosts[h.name]["libvirt"] = libvirt_uri(libvirt_root(data, h.name))
    return {
        "name": opts.name,
        "tls": {
            "ca": str(certs / "ca.pem"),
            "cert": str(certs / "caller.pem"),
            "key": str(certs / "caller.key"),
        },
        "hosts": hosts,
        "networks": {"lan": {"bridge": plan.hosts[0].vm_bridge}},
        "vms": {
            vm.name: (
                {"host": vm.host, "driver": "libvirt", "define": str(domains[vm.name])}
                if vm.name in domains
                else {
                    "host": vm.host,
                    "memory": opts.memory,
                    "kernel": str(image.kernel),
                    "initrd": str(image.initrd),
                    "disks": [str(image.rootfs), *map(str, data_disks(data, opts.disks))],
                    "cmdline": _cmdline(opts, plan, image, vm, vms),
                    "nics": [{"network": "lan", "mac": vm.mac}],
                }
            )
            for vm in vms
        },
    }


def _start_command(opts: LabOptions, vm: LabVm, vms: Sequence[LabVm]) -> str:
    """The guest's start command: the cluster agent (guest/lsagent.py), then the user's own.

    Short options keep the kernel command line, which carries it, well under its limit.
    """
    peer = next(v for v in vms if v.name == vm.peer)
    others = ",".join(v.ip for v in vms if v.name != vm.name)
    agent = (
        f"python3 {AGENT_PATH} -n {vm.name} -r {vm.role} -p {peer.name} -a {peer.ip}"
        f" -b {opts.heartbeat!r} -t {opts.timeout!r} -s {others} -R {opts.stream_rate}"
    )
    user = opts.start.get(vm.name)
    return f"{agent} & {user}" if user else agent


def _check_options(opts: LabOptions) -> None:
    """Refuse options the guests' agent would refuse, before anything is made.

    Raises:
        LabError: the heartbeat is not shorter than the timeout, or the rate is negative.
    """
    if not 0 < opts.heartbeat < opts.timeout:
        raise LabError(
            f"the heartbeat ({opts.heartbeat:g} s) must be positive and shorter than "
            f"the failure timeout ({opts.timeout:g} s)"
        )
    if not 1 <= opts.disks <= 8:
        raise LabError(
            f"a lab VM has 1 to 8 disks (the root disk and data disks), not {opts.disks}"
        )
    if opts.stream_rate < 0:
        raise LabError(
            f"the stream rate must be 0 or more packets per second, not {opts.stream_rate}"
        )


def _check_cluster(opts: LabOptions) -> None:
    """Refuse a middleware lab the guests could not run, before anything is made.

    Raises:
        LabError: Pacemaker asked for with less than PACEMAKER_MIN_MEMORY per VM.
    """
    try:
        memory = parse_size(opts.memory)
    except ValueError as exc:
        raise LabError(f"--memory {opts.memory}: {exc}") from exc
    if opts.cluster.kind == ClusterKind.PACEMAKER and memory < PACEMAKER_MIN_MEMORY:
        raise LabError(
            f"Corosync and Pacemaker need at least {format_size(PACEMAKER_MIN_MEMORY)} per VM,"
            f" not {opts.memory}: leave --memory out (it is then"
            f" {format_size(PACEMAKER_MIN_MEMORY)}) or give more"
        )


def _cluster_plan(opts: LabOptions, vms: Sequence[LabVm], vm_subnet: str) -> ClusterPlan:
    """The middleware plan of a lab: one Corosync cluster of all VMs, one VRRP pair per pair.

    Raises:
        LabError: the cluster kind or a timing cannot be used.
    """
    members = [Member(vm.name, vm.ip) for vm in vms]
    pairs = [(vm.name, vm.peer) for vm in vms if vm.role == "primary"]
    return plan_cluster(opts.cluster, opts.name, members, pairs, vm_subnet)


def lab_cluster(name: str) -> ClusterPlan:
    """The middleware plan lab ``name`` was brought up with (from its lab.json).

    Raises:
        LabError: there is no such lab, or its lab.json cannot be read.
    """
    path = lab_data_dir(name) / "lab.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        options = info["options"]
        spec = ClusterSpec(**options.get("cluster", {}))
        vms = [LabVm(**v) for v in info["vms"]]
        opts = LabOptions(name=name, cluster=spec)
        return _cluster_plan(opts, vms, options["vm_subnet"])
    except FileNotFoundError as exc:
        raise LabError(f"there is no lab named {name} ({path} is missing)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LabError(f"cannot read the cluster of lab {name} from {path}: {exc}") from exc


async def _form_middleware(
    plan: ClusterPlan, group: GroupSpec, data: Path, say: Say, timeout: float
) -> float:
    """Start the lab's middleware in its booted guests; the seconds it took to form."""
    shells = {m.name: guest(group, m.name, data) for m in plan.members}
    try:
        took = await form_cluster(plan, shells, say, timeout)
    finally:
        for shell in shells.values():
            await shell.close()
    say(f"cluster: {plan.kind.value} formed in {took:.1f} s")
    # What the middleware logged while forming is not news: lab verify counts from here.
    marks = {}
    for m in plan.members:
        path = console_log_path(data, group.vms[m.name].host, m.name)
        marks[m.name] = path.stat().st_size if path.exists() else 0
    info_path = data / "lab.json"
    info = json.loads(info_path.read_text())
    info.update(cluster_formed_s=round(took, 1), cluster_marks=marks)
    info_path.write_text(json.dumps(info, indent=1))
    return took


async def wait_execds(group: GroupSpec, timeout: float = 30.0) -> None:
    """Wait until every execd of ``group`` answers a probe.

    Raises:
        LabError: one did not answer within ``timeout`` seconds.
    """
    clients = clients_for(group)
    try:
        await _wait_execds(clients, timeout)
    finally:
        for c in clients.values():
            await c.close()


async def _wait_execds(clients: Mapping[str, HostClient], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for name, client in clients.items():
        while True:
            try:
                await client.probe(time.time())
                break
            except LockstepError as exc:
                if time.monotonic() > deadline:
                    raise LabError(f"execd of lab host {name} did not come up: {exc}") from exc
                await asyncio.sleep(0.2)


def guest(group: GroupSpec, vm: str, data: Path) -> GuestControl:
    """The control channel of lab guest ``vm`` (its execd's run dir holds the socket)."""
    return GuestControl(channel_path(data, group.vms[vm].host, vm))


def vm_paths(data: Path, host: str, vm: str) -> VmPaths:
    """Lab guest ``vm``'s QEMU files on lab host ``host``: console log, channel, pid file."""
    return VmPaths(vm_run_dir(data, host, vm))


def console_log_path(data: Path, host: str, vm: str) -> Path:
    """Where execd's QEMU appends guest ``vm``'s serial console."""
    return vm_paths(data, host, vm).console


def channel_path(data: Path, host: str, vm: str) -> Path:
    """The unix socket of lab guest ``vm``'s control channel, on lab host ``host``."""
    return vm_paths(data, host, vm).channel


async def bring_up(opts: LabOptions, say: Say = _quiet) -> GroupSpec:
    """Bring the whole lab up; return its group (also written to ``opts.group_file``).

    Raises:
        LabError: a lab of that name exists, or a step failed (what was made is
            taken down again before raising).
        LockstepError: from the image build, the network or the VMs.
    """
    from lockstep.caller.orchestrator import GroupCaller

    _check_options(opts)
    _check_cluster(opts)
    plan = plan_lab(
        opts.hosts, name=opts.name, lan_subnet=opts.lan_subnet, vm_subnet=opts.vm_subnet
    )
    vms = plan_vms(plan, opts.vms)
    cluster = _cluster_plan(opts, vms, plan.vm_subnet)
    packages = list(opts.extra_packages)
    if cluster.kind is not ClusterKind.AGENT:
        packages += MIDDLEWARE_PACKAGES
    strangers = sorted(set(opts.start) - {vm.name for vm in vms})
    if strangers:
        raise LabError(
            f"--start names VM {', '.join(strangers)}, not in this lab"
            f" (its VMs: {', '.join(vm.name for vm in vms)})"
        )
    unknown = sorted(set(opts.clock_offsets) - {h.name for h in plan.hosts})
    if unknown:
        raise LabError(f"--clock-offset names unknown lab host {', '.join(unknown)}")
    ledger = Ledger.for_lab(opts.name)
    if ledger.exists():
        raise LabError(f"lab {opts.name} is already up (run `lockstep lab down` first)")
    say("guest image: building or reusing the cached one")
    image = await asyncio.to_thread(build_image, packages, progress=say)
    data = lab_data_dir(opts.name)
    say(f"network: {len(plan.hosts)} hosts as namespaces, VXLAN between their VM bridges")
    await asyncio.to_thread(lab_up, plan, ledger)
    try:
        ledger.record(PathEntry(str(data)))
        data.mkdir(parents=True, exist_ok=True)
        group_file = opts.group_file.resolve()
        ledger.record(PathEntry(str(group_file)))
        (data / "lab.json").write_text(
            json.dumps({"options": _options_json(opts), "vms": [asdict(v) for v in vms]}, indent=1)
        )
        say("certificates: a CA for the lab, one for the caller and each execd")
        ca = make_ca(data / "certs", name=f"lockstep lab {opts.name} CA")
        issue(ca, data / "certs", "caller", kind="client")
        for h in plan.hosts:
            issue(ca, data / "certs", h.name, kind="server", hosts=[h.lan_ip])
        for h in plan.hosts:
            config = _write_execd_config(data, h.name, f"{h.lan_ip}:{EXECD_PORT}")
            offset = float(opts.clock_offsets.get(h.name, 0.0))
            pid = _start_execd(h.netns, config, offset, config.parent / "execd.log")
            ledger.record(ProcessEntry.of(pid, f"lockstep-execd {h.name}"))
            say(f"execd on {h.name} (pid {pid}{f', clock offset {offset:+g} s' if offset else ''})")
        await _make_data_disks(data, opts.disks)
        domains = {}
        if opts.driver != "qemu":
            say(f"libvirt: a libvirtd on each host; {_DOMAINS[opts.driver]} defined as domains")
            for h in plan.hosts:
                root = libvirt_root(data, h.name)
                daemon = ProcessEntry.of(_start_libvirtd(h.netns, root), f"libvirtd {h.name}")
                ledger.record(daemon)
                await _wait_libvirtd(h.name, root, daemon)
                say(f"libvirtd on {h.name} (pid {daemon.pid}): {libvirt_uri(root)}")
            defined = [vm for vm in vms if opts.driver == "libvirt" or vm.role == "standby"]
            domains = await _define_domains(opts, plan, image, defined, vms, data)
        document = _group_document(opts, plan, image, vms, data, domains)
        group_file.write_text(tomli_w.dumps(document))
        group = load_group(group_file)
        clients = clients_for(group)
        try:
            await _wait_execds(clients)
            say(f"VMs: starting {len(vms)} under {group.vms[vms[0].name].accel.upper()}")
            await GroupCaller(group, clients).up()
        finally:
            for c in clients.values():
                await c.close()
        say("guests: waiting for every guest to boot")
        await wait_guests(group, data)
        if cluster.kind is not ClusterKind.AGENT:
            await _form_middleware(cluster, group, data, say, opts.cluster_timeout)
    except BaseException:
        say("lab up failed: taking down what was made")
        await take_down(opts.name)
        raise
    return group


def execd_pid(name: str, host: str) -> int | None:
    """The pid of lab ``name``'s execd for ``host`` (from the ledger), if it runs."""
    ledger = Ledger.for_lab(name)
    found = None
    for entry in ledger.entries() if ledger.exists() else []:
        is_execd = isinstance(entry, ProcessEntry) and entry.what == f"lockstep-execd {host}"
        if is_execd and entry.alive():  # type: ignore[union-attr]
            found = entry.pid  # type: ignore[union-attr]
    return found


def restart_execd(
    name: str,
    host: str,
    *,
    offset: float | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """(Re)start lab ``name``'s execd for ``host``, as ``lab up`` did; return its pid.

    The VMs it ran keep running: the new execd re-attaches to them. ``env``
    adds environment variables (the fault tests arm ``LOCKSTEP_FAULT`` so).

    Raises:
        LabError: the lab or host is unknown, or an execd for it still runs.
    """
    data = lab_data_dir(name)
    config = data / "hosts" / host / "execd.toml"
    if not config.exists():
        raise LabError(f"lab {name} has no host {host}")
    if execd_pid(name, host) is not None:
        raise LabError(f"the execd of lab host {host} still runs")
    info = json.loads((data / "lab.json").read_text())
    if offset is None:
        offset = float(info["options"]["clock_offsets"].get(host, 0.0))
    pid = _start_execd(f"{name}-{host}", config, offset, config.parent / "execd.log", env)
    Ledger.for_lab(name).record(ProcessEntry.of(pid, f"lockstep-execd {host}"))
    return pid


async def wait_guests(group: GroupSpec, data: Path, timeout: float = 180.0) -> None:
    """Wait until every guest's control agent answers.

    Raises:
        LabError: a guest did not answer in time (its console log is named).
    """

    async def one(vm: str) -> None:
        async with guest(group, vm, data) as ctl:
            await ctl.wait_ready(timeout)

    await asyncio.gather(*(one(vm) for vm in group.vms))


def _options_json(opts: LabOptions) -> dict[str, Any]:
    d = asdict(opts)
    d["group_file"] = str(opts.group_file)
    d["clock_offsets"] = dict(opts.clock_offsets)
    d["start"] = dict(opts.start)
    d["extra_packages"] = list(opts.extra_packages)
    return d


def _sweep(data: Path) -> list[str]:
    """Kill processes whose command line names the lab's data dir (QEMU, execd).

    These are found by the paths lockstep gave them, so a crash between
    starting a process and recording it leaves nothing behind.
    """
    killed = []
    marker = str(data) + "/"
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        # Anywhere in an argument: libvirt passes paths inside JSON (-blockdev, -object).
        if any(marker in a for a in args):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(f"process {proc.name} ({Path(args[0]).name})")
            except ProcessLookupError:
                pass
    return killed


async def take_down(name: str, say: Say = _quiet) -> list[str]:
    """Remove everything lab ``name`` made; return what was removed.

    Raises:
        LabError: there is no such lab, or something could not be removed.
    """
    ledger = Ledger.for_lab(name)
    data = lab_data_dir(name)
    if not ledger.exists() and not data.exists():
        raise LabError(f"there is no lab named {name} (nothing to take down)")
    removed: list[str] = []
    # execds first (they would restart nothing, but they hold QMP connections)...
    for entry in ledger.entries() if ledger.exists() else []:
        if isinstance(entry, ProcessEntry) and entry.alive():
            os.kill(entry.pid, signal.SIGTERM)
    await asyncio.sleep(0.2)
    # ...then every QEMU and straggler that names the lab's paths.
    removed += _sweep(data)
    await asyncio.sleep(0.1)
    if ledger.exists():
        removed += await asyncio.to_thread(lab_down, ledger)
    for r in removed:
        say(f"removed {r}")
    return removed
