"""The nftables text of a group's network faults (lockstep.net.nft.ruleset), pure."""

from __future__ import annotations

import pytest

from lockstep.net.links import tap_name
from lockstep.net.nft import Drop, ruleset, table_name

P1 = tap_name("lab", "p1", 0)
P1_SPARE = tap_name("lab", "p1", 0, spare=True)
S1 = tap_name("lab", "s1", 0)
HEAD = "table bridge lockstep-lab\ndelete table bridge lockstep-lab\n"


def test_no_drop_only_removes_the_table() -> None:
    """With nothing to drop the text declares and deletes the table: it goes, present or not."""
    assert ruleset("lab", []) == HEAD
    assert table_name("db.cluster-1") == "lockstep-db.cluster-1"


def test_a_partition_and_a_loss_as_nft_text() -> None:
    """Each drop is one rule of the forward chain, in order: ports, then MACs, then the share."""
    text = ruleset(
        "lab",
        [
            Drop("partition-1 partition", out_ports=(P1,), macs=("52:54:00:00:00:03",)),
            Drop("partition-1 partition", out_ports=(P1,), in_ports=(S1,)),
            Drop("loss-2 loss", in_ports=(S1,), percent=30),
            Drop("loss-2 loss", out_ports=(S1,), percent=30),
        ],
    )
    assert text == HEAD + (
        "table bridge lockstep-lab {\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        f'\t\toifname {{ "{P1}" }} ether saddr {{ 52:54:00:00:00:03 }} counter drop'
        ' comment "partition-1 partition"\n'
        f'\t\tiifname {{ "{S1}" }} oifname {{ "{P1}" }} counter drop'
        ' comment "partition-1 partition"\n'
        f'\t\tiifname {{ "{S1}" }} numgen random mod 100 < 30 counter drop comment "loss-2 loss"\n'
        f'\t\toifname {{ "{S1}" }} numgen random mod 100 < 30 counter drop comment "loss-2 loss"\n'
        "\t}\n"
        "}\n"
    )


def test_sets_are_sorted_deduplicated_and_macs_canonical() -> None:
    """Ports and MACs come out sorted and once each, MACs in lower case: the text is stable."""
    text = ruleset(
        "lab",
        [
            Drop(
                "p partition",
                out_ports=(S1, P1, S1),
                macs=("52:54:00:00:00:0A", "52:54:00:00:00:01", "52:54:00:00:00:0a"),
            )
        ],
    )
    ports = ", ".join(f'"{p}"' for p in sorted({P1, S1}))
    assert f"oifname {{ {ports} }} ether saddr {{ 52:54:00:00:00:01, 52:54:00:00:00:0a }}" in text


def test_a_drop_that_can_match_nothing_is_left_out() -> None:
    """An empty set (the other side has no MAC, no tap here) matches no frame: no rule, no table."""
    assert ruleset("lab", [Drop("p partition", out_ports=(P1,), macs=())]) == HEAD
    assert ruleset("lab", [Drop("l loss", out_ports=(), percent=5)]) == HEAD
    kept = ruleset(
        "lab", [Drop("p partition", out_ports=(P1,), macs=()), Drop("x", in_ports=(P1,))]
    )
    assert kept.count("drop comment") == 1


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        (Drop("x"), "names no port"),
        (Drop("x", macs=("52:54:00:00:00:01",)), "names no port"),
        (Drop("x", out_ports=("eth0",)), "'eth0' is not one of lockstep's taps"),
        (Drop("x", out_ports=('ls0000000"t0',)), "is not one of lockstep's taps"),
        (Drop("x", in_ports=("ls00000000f0",)), "is not one of lockstep's taps"),
        (Drop("x", out_ports=(P1,), macs=("52:54:00:00:00",)), "is not a MAC address"),
        (Drop("x", out_ports=(P1,), macs=("52:54:00:00:00:0g",)), "is not a MAC address"),
        (Drop("x", out_ports=(P1,), macs=("52:54:00:00:00:01 } drop",)), "is not a MAC address"),
        (Drop("x", out_ports=(P1,), percent=0), "0 % is not within 1..100"),
        (Drop("x", out_ports=(P1,), percent=101), "101 % is not within 1..100"),
        (Drop('x" drop', out_ports=(P1,)), "cannot be an nft comment"),
    ],
)
def test_what_nft_must_never_read_is_refused(drop: Drop, message: str) -> None:
    """A drop with no port (it would cut every VM), a foreign port, a bad MAC or share is refused.

    Nothing of a request reaches nft's input but tap names, canonical MACs and
    names checked here.
    """
    with pytest.raises(ValueError, match=message):
        ruleset("lab", [drop])


def test_both_tap_sets_of_a_vm_are_lockstep_taps() -> None:
    """A VM's usual and spare taps (a restore's) are both accepted as lockstep's own."""
    assert P1_SPARE in ruleset("lab", [Drop("x", out_ports=(P1, P1_SPARE))])


def test_a_hosts_vm_taps_given_are_the_only_ports_a_drop_may_name() -> None:
    """With the host's VM taps given (libvirt's ``vnet3`` among them), only those are accepted.

    A libvirt domain's taps are libvirt's names; the execd passes the taps
    of its VMs, and a drop naming any other port (the host's uplink) or a
    name nft would misread is still refused.
    """
    text = ruleset("lab", [Drop("x", out_ports=("vnet3", P1))], ports={"vnet3", P1})
    first, second = sorted([P1, "vnet3"])
    assert f'oifname {{ "{first}", "{second}" }} counter drop' in text
    with pytest.raises(ValueError, match="'eth0' is not a tap of this host's VMs"):
        ruleset("lab", [Drop("x", out_ports=("eth0",))], ports={"vnet3"})
    with pytest.raises(ValueError, match="is not a tap of this host's VMs"):
        ruleset("lab", [Drop("x", in_ports=('vnet3" }',))], ports={'vnet3" }'})
