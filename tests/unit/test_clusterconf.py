"""The middleware configurations ``lab up --cluster`` writes: Corosync, Pacemaker, keepalived.

Pure generators, checked on their text; the shell commands that carry them into
a guest are run here with the machine's /bin/sh.
"""

from __future__ import annotations

import shlex
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from lockstep.cli.main import main
from lockstep.errors import LabError
from lockstep.lab.clusterconf import (
    ClusterSpec,
    Member,
    Totem,
    cib_commands,
    cib_seed,
    corosync_conf,
    keepalived_conf,
    keepalived_start,
    pacemaker_service,
    pacemaker_start,
    start_daemon,
    totem_timings,
    vrrp_advert_ms,
    vrrp_peers,
    write_file,
)

MEMBERS = [Member("p1", "10.124.0.11"), Member("s1", "10.124.0.12")]
FOUR = [*MEMBERS, Member("p2", "10.124.0.13"), Member("s2", "10.124.0.14")]


def _setting(conf: str, key: str) -> list[str]:
    """Every value of ``key:`` in a corosync.conf text."""
    return [
        line.split(":", 1)[1].strip()
        for line in conf.splitlines()
        if line.strip().startswith(f"{key}:")
    ]


# ── Corosync ─────────────────────────────────────────────────────────────────


def test_totem_defaults_follow_corosyncs_manual() -> None:
    """Token 3000 ms (Corosync's default); consensus 1.2 x token; knet pings every token/4, timeout token/2."""
    assert totem_timings(ClusterSpec("pacemaker"), 2) == Totem(3000, 3600, 750, 1500)
    assert totem_timings(ClusterSpec("pacemaker", token_ms=1000), 4) == Totem(1000, 1200, 250, 500)


def test_given_timings_are_kept() -> None:
    """Consensus and knet pings given explicitly are written as given."""
    spec = ClusterSpec(
        "pacemaker",
        token_ms=300,
        consensus_ms=400,
        knet_ping_interval_ms=50,
        knet_ping_timeout_ms=100,
    )
    assert totem_timings(spec, 2) == Totem(300, 400, 50, 100)


@pytest.mark.parametrize(
    ("spec", "nodes", "words"),
    [
        (ClusterSpec(token_ms=100), 2, "at least 127 ms"),
        (ClusterSpec(token_ms=1000, consensus_ms=1000), 4, "1.2 x the token"),
        (ClusterSpec(token_ms=1000, consensus_ms=50), 2, "join timeout"),
        (ClusterSpec(token_ms=1000, knet_ping_interval_ms=600), 2, "shorter than"),
    ],
)
def test_timings_corosync_would_refuse_are_refused(
    spec: ClusterSpec, nodes: int, words: str
) -> None:
    """A token under 127 ms, a short consensus, a ping interval not under its timeout: one sentence each."""
    with pytest.raises(LabError, match=words):
        totem_timings(spec, nodes)


def test_a_two_node_consensus_may_be_under_the_token() -> None:
    """Corosync's manual: for two nodes a consensus above join (50 ms) but under the token is safe."""
    assert totem_timings(ClusterSpec(token_ms=1000, consensus_ms=800), 2).consensus_ms == 800


def test_corosync_conf_for_two_nodes() -> None:
    """knet, no crypto, the timings, node ids 1..n in order, two_node with 2, stderr logging only."""
    conf = corosync_conf("lsc", MEMBERS, Totem(1000, 1200, 250, 500))
    assert _setting(conf, "transport") == ["knet"]
    assert _setting(conf, "token") == ["1000"]
    assert _setting(conf, "token_coefficient") == ["0"]
    assert _setting(conf, "consensus") == ["1200"]
    assert _setting(conf, "knet_ping_interval") == ["250"]
    assert _setting(conf, "knet_ping_timeout") == ["500"]
    assert _setting(conf, "name") == ["p1", "s1"]
    assert _setting(conf, "nodeid") == ["1", "2"]
    assert _setting(conf, "ring0_addr") == ["10.124.0.11", "10.124.0.12"]
    assert _setting(conf, "two_node") == ["1"]
    assert _setting(conf, "to_stderr") == ["yes"]
    assert _setting(conf, "to_syslog") == ["no"]
    assert conf.count("{") == conf.count("}")


def test_corosync_conf_for_four_nodes_is_not_two_node() -> None:
    """With more than two nodes, quorum is votequorum's plain majority."""
    conf = corosync_conf("lsc", FOUR, Totem(3000, 3600, 750, 1500))
    assert _setting(conf, "two_node") == []
    assert _setting(conf, "nodeid") == ["1", "2", "3", "4"]


# ── Pacemaker ────────────────────────────────────────────────────────────────


def _xml_of(command: str) -> ET.Element:
    words = shlex.split(command)
    assert words[0] == "cibadmin"
    return ET.fromstring(words[words.index("--xml-text") + 1])


def test_cib_commands_configure_no_fencing_and_the_group() -> None:
    """Three cibadmin calls: options (no fencing, no re-check, a DC soon), the group, its location."""
    service = pacemaker_service("10.124.0.0/24", MEMBERS)
    assert (service.vip, service.prefix, service.preferred) == ("10.124.0.100", 24, "p1")
    options, group, location = (_xml_of(c) for c in cib_commands(service))
    nv = {n.get("name"): n.get("value") for n in options.iter("nvpair")}
    assert nv == {
        "stonith-enabled": "false",
        "cluster-recheck-interval": "0",
        "dc-deadtime": "5s",
    }
    assert group.tag == "group" and group.get("id") == "service"
    prims = group.findall("primitive")
    assert [(p.get("id"), p.get("type")) for p in prims] == [
        ("vip", "IPaddr2"),
        ("web", "anything"),
    ]
    vip = {n.get("name"): n.get("value") for n in prims[0].iter("nvpair")}
    assert vip == {"ip": "10.124.0.100", "cidr_netmask": "24", "nic": "eth0"}
    web = {n.get("name"): n.get("value") for n in prims[1].iter("nvpair")}
    assert web["cmdline_options"] == "-m http.server --bind 10.124.0.100 80"
    stick = group.find("meta_attributes/nvpair")
    assert stick is not None and stick.get("value") == "100"
    assert (location.get("rsc"), location.get("node"), location.get("score")) == (
        "service",
        "p1",
        "50",
    )
    ids = [e.get("id") for root in (options, group, location) for e in root.iter() if e.get("id")]
    assert len(ids) == len(set(ids)), "ids in a CIB are unique"


def test_the_cib_is_built_offline_from_those_commands_and_given_to_pacemaker() -> None:
    """The seed: an empty CIB, each cibadmin call on it (CIB_file), then it is Pacemaker's own."""
    service = pacemaker_service("10.124.0.0/24", MEMBERS)
    steps = cib_seed(service).split(" && ")
    assert steps[0] == "cibadmin --empty > /run/lockstep-cib.xml"
    assert steps[1:4] == [f"CIB_file=/run/lockstep-cib.xml {c}" for c in cib_commands(service)]
    assert steps[4:] == [
        "install -o hacluster -g haclient -m 600 /run/lockstep-cib.xml"
        " /var/lib/pacemaker/cib/cib.xml",
        "rm -f /run/lockstep-cib.xml",
    ]


def test_a_subnet_without_room_for_the_address_is_refused() -> None:
    """A /26 has no .100: the lab says so instead of writing a wrong address."""
    with pytest.raises(LabError, match="no room for virtual address"):
        pacemaker_service("10.124.0.0/26", MEMBERS)


# ── keepalived ───────────────────────────────────────────────────────────────


def test_vrrp_pairs_have_an_address_and_router_id_each() -> None:
    """Pair k: VI_k, router id 50+k, address .(99+k); the primary is MASTER."""
    peers = vrrp_peers("10.124.0.0/24", [("p1", "s1"), ("p2", "s2")])
    assert [(p.vm, p.instance, p.router_id, p.master, p.vip) for p in peers] == [
        ("p1", "VI_1", 51, True, "10.124.0.100"),
        ("s1", "VI_1", 51, False, "10.124.0.100"),
        ("p2", "VI_2", 52, True, "10.124.0.101"),
        ("s2", "VI_2", 52, False, "10.124.0.101"),
    ]


def test_keepalived_conf_is_vrrpv3_with_the_advert_in_seconds() -> None:
    """VRRPv3, MASTER 150 / BACKUP 100, advert written in seconds with centisecond precision."""
    master, backup = vrrp_peers("10.124.0.0/24", [("p1", "s1")])
    conf = keepalived_conf(master, 100)
    assert "vrrp_version 3" in conf
    assert "state MASTER" in conf and "priority 150" in conf
    assert "advert_int 0.10" in conf
    assert "virtual_router_id 51" in conf
    assert "10.124.0.100/24 dev eth0" in conf
    other = keepalived_conf(backup, 1000)
    assert "state BACKUP" in other and "priority 100" in other and "advert_int 1.00" in other
    assert conf.count("{") == conf.count("}")


@pytest.mark.parametrize("ms", [5, 15, 1005, 40960, 0])
def test_adverts_vrrpv3_cannot_carry_are_refused(ms: int) -> None:
    """VRRPv3 counts centiseconds in 12 bits: 10 ms steps from 10 ms to 40.95 s."""
    with pytest.raises(LabError, match="multiple of 10 ms"):
        vrrp_advert_ms(ClusterSpec("keepalived", advert_ms=ms))


def test_adverts_vrrpv3_carries_are_kept() -> None:
    """10 ms, 100 ms and 40.95 s pass; keepalived's 1 s is the default."""
    assert [vrrp_advert_ms(ClusterSpec(advert_ms=ms)) for ms in (10, 100, 40950)] == [
        10,
        100,
        40950,
    ]
    assert vrrp_advert_ms(ClusterSpec("keepalived")) == 1000


# ── getting them into a guest ──────────────────────────────────────────────


def test_write_file_writes_exactly_the_content(tmp_path: Path) -> None:
    """Quotes, dollars, newlines and braces arrive unchanged, through a real /bin/sh."""
    content = "a 'quoted' \"thing\" $HOME `x` {\n\t}\n" + corosync_conf(
        "lsc", MEMBERS, Totem(1000, 1200, 250, 500)
    )
    path = tmp_path / "etc dir" / "conf"
    subprocess.run(["/bin/sh", "-c", write_file(str(path), content)], check=True)
    assert path.read_text() == content


def test_daemons_start_detached_with_their_output_on_the_console() -> None:
    """setsid -f, stdin from /dev/null; Pacemaker's stderr to /dev/null (its log goes to the console)."""
    assert start_daemon(["corosync", "-f"]) == (
        "setsid -f corosync -f </dev/null >/dev/console 2>&1"
    )
    pacemaker = pacemaker_start()
    assert pacemaker.startswith("env PCMK_logfile=/dev/console setsid -f pacemakerd -f")
    assert pacemaker.endswith(">/dev/null 2>&1")
    assert " -G " in keepalived_start("/etc/keepalived/keepalived.conf")


# ── lab up's options ─────────────────────────────────────────────────────────


def test_lab_up_refuses_timings_of_another_kind_and_too_little_memory(tmp_path: Path) -> None:
    """--token is Corosync's, --advert keepalived's; Pacemaker under 512 MiB: one sentence, nothing made."""
    runner = CliRunner()
    group = ["-g", str(tmp_path / "lab.toml")]
    wrong = runner.invoke(main, [*group, "lab", "up", "--cluster", "keepalived", "--token", "1000"])
    assert wrong.exit_code == 2 and "--token is for --cluster pacemaker" in wrong.output
    wrong = runner.invoke(main, [*group, "lab", "up", "--advert", "100"])
    assert wrong.exit_code == 2 and "--advert is for --cluster keepalived" in wrong.output
    small = runner.invoke(
        main, [*group, "lab", "up", "--name", "lscx", "--cluster", "pacemaker", "--memory", "256M"]
    )
    assert small.exit_code == 1, small.output
    assert "need at least 512M per VM, not 256M" in " ".join(small.output.split())
    assert "Traceback" not in small.output and not (tmp_path / "lab.toml").exists()
