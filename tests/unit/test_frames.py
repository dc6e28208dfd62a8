"""Captured frames: completing deferred (CHECKSUM_PARTIAL) checksums, describing them."""

from __future__ import annotations

import struct

import pytest

from lockstep.net.frames import (
    VNET_HDR_LEN,
    complete_checksum,
    describe,
    finish_frame,
    mac_text,
    parse_vnet_hdr,
)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _udp_frame(payload: bytes) -> tuple[bytes, int]:
    """An Ethernet/IPv4/UDP frame with a correct UDP checksum; returns it and the pseudo sum."""
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    udp_len = 8 + len(payload)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack(">H", (~_csum(ip)) & 0xFFFF) + ip[12:]
    pseudo = src + dst + struct.pack(">BBH", 0, 17, udp_len)
    udp = struct.pack(">HHHH", 7102, 7102, udp_len, 0) + payload
    full = (~_csum(pseudo + udp)) & 0xFFFF or 0xFFFF
    udp = udp[:6] + struct.pack(">H", full) + udp[8:]
    eth = bytes(6) + bytes(6) + b"\x08\x00"
    return eth + ip + udp, _csum(pseudo)


@pytest.mark.parametrize("payload", [b"", b"x", b"hello lockstep", bytes(range(256)) * 3])
def test_partial_udp_checksum_is_completed_like_the_kernel(payload: bytes) -> None:
    """A UDP frame with only the pseudo-header sum in its checksum gets the full one.

    That is how a guest's virtio-net leaves it; the receiver expects the real sum.
    """
    good, pseudo = _udp_frame(payload)
    csum_start, csum_offset = 14 + 20, 6
    partial = bytearray(good)
    struct.pack_into(">H", partial, csum_start + csum_offset, pseudo)
    assert complete_checksum(bytes(partial), csum_start, csum_offset) == good


def test_finish_frame_reads_the_vnet_header() -> None:
    """NEEDS_CSUM frames are completed; plain ones pass untouched; GSO ones are flagged."""
    good, pseudo = _udp_frame(b"abc")
    partial = bytearray(good)
    struct.pack_into(">H", partial, 40, pseudo)
    needs = struct.pack("<BBHHHH", 1, 0, 0, 0, 34, 6)
    assert finish_frame(needs + bytes(partial)) == (good, False)
    plain = struct.pack("<BBHHHH", 0, 0, 0, 0, 0, 0)
    assert finish_frame(plain + good) == (good, False)
    gso = struct.pack("<BBHHHH", 1, 1, 54, 1448, 34, 16)
    assert finish_frame(gso + good)[1] is True


def test_malformed_input_is_refused() -> None:
    """Too short for a header, or offsets past the frame: ValueError, never garbage."""
    with pytest.raises(ValueError, match="shorter than a virtio-net header"):
        parse_vnet_hdr(b"\x01" * (VNET_HDR_LEN - 1))
    with pytest.raises(ValueError, match="outside"):
        complete_checksum(b"\x00" * 20, 18, 6)


def test_describe_says_what_a_frame_carries() -> None:
    """UDP, ARP, IPv6 and unknown frames get one tcpdump-like line each; junk never raises."""
    udp, _ = _udp_frame(b"hello")
    assert describe(udp) == "IPv4 UDP 10.0.0.1:7102 > 10.0.0.2:7102 (5 bytes)"
    arp = bytes(12) + b"\x08\x06" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1)
    arp += bytes.fromhex("020000000001") + bytes([10, 0, 0, 1]) + bytes(6) + bytes([10, 0, 0, 2])
    assert describe(arp) == "ARP who-has 10.0.0.2 tell 10.0.0.1"
    reply = arp[:20] + b"\x00\x02" + arp[22:]
    assert describe(reply) == "ARP reply 10.0.0.1 is-at 02:00:00:00:00:01"
    v6 = bytes(12) + b"\x86\xdd" + bytes(6) + bytes([58, 255]) + bytes(15) + b"\x01" + bytes(16)
    assert describe(v6) == "IPv6 ICMPv6 ::1 > ::"
    assert describe(bytes(12) + b"\x88\xb5" + bytes(50)) == "ethertype 0x88b5 (64 bytes)"
    assert describe(b"\x01\x02") == "runt frame (2 bytes)"
    assert describe(bytes(12) + b"\x08\x00" + b"\x45").startswith("ethertype 0x0800")
    assert mac_text(bytes.fromhex("0a1b2c3d4e5f")) == "0a:1b:2c:3d:4e:5f"
