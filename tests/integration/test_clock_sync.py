"""Clock sync on the lab's real network: the UDP probe path, and a firewall that blocks it.

``lockstep check --json`` is run as a user would. Timing goals (the bound the
path reaches) are measured by ``python -m bench.clock``, not asserted here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from lockstep.lab.lab import EXECD_PORT
from lockstep.proc import run
from tests.integration.conftest import Lab

TABLE = "lockstep_test_fw"


def _check(lab: Lab, *args: str) -> dict[str, Any]:
    proc = lab.cli("check", "--json", *args, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


@contextmanager
def udp_blocked(lab: Lab, host: str) -> Iterator[None]:
    """An nftables rule in ``host``'s namespace that drops every UDP datagram to the execd."""
    ns = f"{lab.name}-{host}"
    run(["nft", "add", "table", "inet", TABLE], netns=ns)
    try:
        run(["nft", "add", "chain", "inet", TABLE, "input",
             "{ type filter hook input priority 0 ; policy accept ; }"], netns=ns)  # fmt: skip
        run(["nft", "add", "rule", "inet", TABLE, "input",
             "udp", "dport", str(EXECD_PORT), "drop"], netns=ns)  # fmt: skip
        yield
    finally:
        run(["nft", "delete", "table", "inet", TABLE], netns=ns, check=False)


def test_check_probes_every_host_over_the_udp_path(lab: Lab) -> None:
    """Every host is probed over UDP, finds h2's 2.5 s offset, and reports how it sampled."""
    data = _check(lab)
    hosts = data["hosts"]
    assert sorted(hosts) == ["h1", "h2"]
    for name, h in hosts.items():
        assert h["path"] == "udp" and h["note"] == "", (name, h)
        assert h["samples"] >= 8, (name, h)
        assert h["error_bound_ms"] == pytest.approx(h["delay_ms"] / 2)
    assert hosts["h2"]["offset_ms"] == pytest.approx(2500, abs=1)
    assert data["predicted_skew_ms"] == pytest.approx(
        hosts["h1"]["error_bound_ms"] + hosts["h2"]["error_bound_ms"]
    )


def test_a_firewall_on_one_host_falls_back_to_grpc_and_says_so(lab: Lab) -> None:
    """With UDP to h2's execd dropped by nftables, h2 is probed over gRPC; check says why.

    h1 keeps its UDP path; the offset of h2 is still found. With the rule
    gone, h2 is back on UDP.
    """
    with udp_blocked(lab, "h2"):
        data = _check(lab, "--sync-limit", "0.5")
    h1, h2 = data["hosts"]["h1"], data["hosts"]["h2"]
    assert h1["path"] == "udp"
    assert h2["path"] == "grpc"
    assert "no answer from udp" in h2["note"] and "firewall" in h2["note"], h2
    assert h2["lost"] == 3
    assert h2["offset_ms"] == pytest.approx(2500, abs=5)
    assert _check(lab)["hosts"]["h2"]["path"] == "udp"
