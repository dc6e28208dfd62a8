"""pcap encoding of held frames, and size/duration parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from lockstep.errors import NetError
from lockstep.net.pcap import parse_pcap, read_pcap, write_pcap
from lockstep.units import format_size, parse_duration, parse_size


def test_pcap_round_trip(tmp_path: Path) -> None:
    """Frames written come back byte-identical, in order, with µs timestamps."""
    frames = [(1700000000.123456, b"\xff" * 60), (1700000000.5, bytes(range(256)) * 4)]
    path = tmp_path / "f.pcap"
    assert write_pcap(path, frames) == 2
    back = list(read_pcap(path))
    assert [d for _, d in back] == [d for _, d in frames]
    assert back[0][0] == pytest.approx(frames[0][0], abs=1e-6)


def test_pcap_header_is_standard(tmp_path: Path) -> None:
    """The global header is classic little-endian pcap, Ethernet link type (tcpdump reads it)."""
    path = tmp_path / "f.pcap"
    write_pcap(path, [])
    assert path.read_bytes()[:4] == bytes.fromhex("d4c3b2a1")
    assert path.read_bytes()[20:24] == (1).to_bytes(4, "little")


def test_pcap_truncated_and_foreign(tmp_path: Path) -> None:
    """A truncated file and a non-pcap file are errors naming the file."""
    path = tmp_path / "f.pcap"
    write_pcap(path, [(1.0, b"x" * 100)])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(NetError, match="truncated"):
        list(read_pcap(path))
    path.write_bytes(b"not a pcap at all, really not....")
    with pytest.raises(NetError, match="not a pcap"):
        list(read_pcap(path))


def test_pcap_contents_parse_like_the_file(tmp_path: Path) -> None:
    """parse_pcap reads a file's bytes as read_pcap reads the file; bad bytes name ``what``."""
    frames = [(1.5, b"a" * 60), (2.25, b"b" * 70)]
    path = tmp_path / "f.pcap"
    write_pcap(path, frames)
    assert parse_pcap(path.read_bytes(), "f") == list(read_pcap(path))
    with pytest.raises(NetError, match=r"s1\.nic0\.pcap of state 'x' is truncated"):
        parse_pcap(path.read_bytes()[:-1], "s1.nic0.pcap of state 'x'")


def test_sizes_and_durations() -> None:
    """Sizes are binary units; durations accept ms, s and m; garbage is refused."""
    assert parse_size("256M") == 256 << 20
    assert parse_size("4G") == 4 << 30
    assert parse_size("1.5GiB") == 3 << 29
    assert format_size(256 << 20) == "256M" and format_size(1536 << 10) == "1536K"
    assert parse_duration("30ms") == pytest.approx(0.03)
    assert parse_duration("1.5") == 1.5 and parse_duration("2m") == 120.0
    for bad in ("12X", "", "-1M"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        parse_duration("soon")
