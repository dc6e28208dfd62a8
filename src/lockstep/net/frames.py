"""Pure handling of captured frames: the virtio-net header and deferred checksums.

Frames a guest sends through virtio-net usually leave their TCP/UDP checksum
for "the device" to fill in (CHECKSUM_PARTIAL): the host carries them across
taps, bridges, VXLAN and veths with the checksum field holding only the
pseudo-header sum, and the receiving tap tells the receiving guest so through
its virtio-net header. A frame captured by the freeze and injected later as
plain bytes would reach the guest with a wrong checksum and be dropped. So the
capture asks for the virtio-net header (``PACKET_VNET_HDR``) and completes the
checksum itself, as the kernel's ``skb_checksum_help`` would.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "VNET_HDR_LEN",
    "VnetHdr",
    "complete_checksum",
    "describe",
    "finish_frame",
    "mac_text",
    "parse_vnet_hdr",
]

VNET_HDR_LEN = 10
NEEDS_CSUM = 1
GSO_NONE = 0
_HDR = struct.Struct("<BBHHHH")


@dataclass(frozen=True)
class VnetHdr:
    """The virtio-net header AF_PACKET gives with PACKET_VNET_HDR."""

    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int

    @property
    def needs_csum(self) -> bool:
        """The L4 checksum is partial: it must be completed before delivery."""
        return bool(self.flags & NEEDS_CSUM)

    @property
    def gso(self) -> bool:
        """A segmentation-offload super-frame (larger than the MTU)."""
        return self.gso_type != GSO_NONE


def parse_vnet_hdr(data: bytes) -> tuple[VnetHdr, bytes]:
    """Split what a PACKET_VNET_HDR socket read into header and frame.

    Raises:
        ValueError: shorter than the header.
    """
    if len(data) < VNET_HDR_LEN:
        raise ValueError(f"{len(data)} bytes is shorter than a virtio-net header")
    return VnetHdr(*_HDR.unpack_from(data)), data[VNET_HDR_LEN:]


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def complete_checksum(frame: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Fill in a partial L4 checksum: the one's complement sum from ``csum_start``.

    The field holds the pseudo-header sum already; summing the whole L4
    segment with it gives the full checksum (0 is sent as 0xffff).

    Raises:
        ValueError: the offsets point outside the frame.
    """
    at = csum_start + csum_offset
    if csum_start > len(frame) or at + 2 > len(frame):
        raise ValueError(f"checksum at {at} is outside a {len(frame)}-byte frame")
    csum = (~_sum16(frame[csum_start:])) & 0xFFFF
    out = bytearray(frame)
    struct.pack_into(">H", out, at, csum or 0xFFFF)
    return bytes(out)


def finish_frame(data: bytes) -> tuple[bytes, bool]:
    """A frame as read with its virtio-net header, made deliverable as plain bytes.

    Returns the frame (checksum completed when it was partial) and whether it
    is a GSO super-frame (which plain injection cannot segment).

    Raises:
        ValueError: malformed header or offsets.
    """
    hdr, frame = parse_vnet_hdr(data)
    if hdr.needs_csum and not hdr.gso:
        frame = complete_checksum(frame, hdr.csum_start, hdr.csum_offset)
    return frame, hdr.gso


_IP_PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 112: "VRRP"}


def mac_text(mac: bytes) -> str:
    """``aa:bb:cc:dd:ee:ff``."""
    return ":".join(f"{b:02x}" for b in mac)


def describe(frame: bytes) -> str:
    """One line saying what an Ethernet frame carries, tcpdump-like (never raises).

    ``IPv4 UDP 10.0.0.1:7102 > 10.0.0.2:7102 (13 bytes)``, ``ARP who-has
    10.0.0.2 tell 10.0.0.1``, ``IPv6 ICMPv6 fe80::1 > ff02::1``, or the
    ethertype of anything else.
    """
    if len(frame) < 14:
        return f"runt frame ({len(frame)} bytes)"
    ethertype = struct.unpack_from(">H", frame, 12)[0]
    body = frame[14:]
    try:
        if ethertype == 0x0800 and len(body) >= 20:
            return _ipv4(body)
        if ethertype == 0x0806 and len(body) >= 28:
            return _arp(body)
        if ethertype == 0x86DD and len(body) >= 40:
            proto = _IP_PROTOCOLS.get(body[6], f"protocol {body[6]}")
            src, dst = ipaddress.IPv6Address(body[8:24]), ipaddress.IPv6Address(body[24:40])
            return f"IPv6 {proto} {src} > {dst}"
    except (struct.error, ValueError):
        pass
    return f"ethertype 0x{ethertype:04x} ({len(frame)} bytes)"


def _ipv4(body: bytes) -> str:
    ihl = (body[0] & 0x0F) * 4
    proto = body[9]
    src, dst = ipaddress.IPv4Address(body[12:16]), ipaddress.IPv4Address(body[16:20])
    name = _IP_PROTOCOLS.get(proto, f"protocol {proto}")
    l4 = body[ihl:]
    header = 8 if proto == 17 else (l4[12] >> 4) * 4 if len(l4) > 12 else 0
    if proto in (6, 17) and len(l4) >= max(header, 4):
        sport, dport = struct.unpack_from(">HH", l4)
        return f"IPv4 {name} {src}:{sport} > {dst}:{dport} ({len(l4) - header} bytes)"
    return f"IPv4 {name} {src} > {dst}"


def _arp(body: bytes) -> str:
    op = struct.unpack_from(">H", body, 6)[0]
    sender, target = ipaddress.IPv4Address(body[14:18]), ipaddress.IPv4Address(body[24:28])
    if op == 1:
        return f"ARP who-has {target} tell {sender}"
    if op == 2:
        return f"ARP reply {sender} is-at {mac_text(body[8:14])}"
    return f"ARP op {op}"
