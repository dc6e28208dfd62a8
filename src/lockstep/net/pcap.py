"""Reading and writing classic pcap files (Ethernet), so held frames open in tcpdump.

Pure byte encoding plus two small file helpers; no sockets here.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from lockstep.errors import NetError

__all__ = [
    "Frame",
    "append_records",
    "encode_header",
    "encode_record",
    "parse_pcap",
    "read_pcap",
    "read_records",
    "write_pcap",
]

MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
_HEADER = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")

Frame = tuple[float, bytes]
"""A frame and the instant it was captured (host wall clock, seconds)."""


def encode_header() -> bytes:
    """The 24-byte pcap global header (microsecond timestamps, Ethernet)."""
    return _HEADER.pack(MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)


def encode_record(ts: float, data: bytes) -> bytes:
    """One pcap record: header and frame bytes."""
    sec = int(ts)
    usec = min(999_999, round((ts - sec) * 1e6))
    return _RECORD.pack(sec, usec, len(data), len(data)) + data


def append_records(out: BinaryIO, frames: Iterable[Frame]) -> int:
    """Write records for ``frames`` to an open file; return how many."""
    n = 0
    for ts, data in frames:
        out.write(encode_record(ts, data))
        n += 1
    return n


def write_pcap(path: Path, frames: Iterable[Frame]) -> int:
    """Write ``frames`` to a new pcap file; return how many.

    Raises:
        NetError: the file cannot be written.
    """
    try:
        with open(path, "wb") as out:
            out.write(encode_header())
            return append_records(out, frames)
    except OSError as exc:
        raise NetError(f"cannot write frames to {path}: {exc.strerror}") from exc


def read_pcap(path: Path) -> Iterator[Frame]:
    """The frames of a pcap file written by :func:`write_pcap` (or tcpdump, LE, µs).

    Raises:
        NetError: the file is missing, not pcap, or truncated.
    """
    try:
        with open(path, "rb") as f:
            yield from read_records(f, str(path))
    except OSError as exc:
        raise NetError(f"cannot read frames from {path}: {exc.strerror}") from exc


def parse_pcap(data: bytes, what: str) -> list[Frame]:
    """The frames of pcap file contents ``data`` (``what`` names it in errors).

    Raises:
        NetError: ``data`` is not pcap of lockstep's format, or truncated.
    """
    return list(read_records(io.BytesIO(data), what))


def read_records(f: BinaryIO, what: str) -> Iterator[Frame]:
    """The frames of the pcap stream ``f``, from its global header on (``what`` names it).

    Raises:
        NetError: the stream is not pcap of lockstep's format, or truncated.
    """
    head = f.read(_HEADER.size)
    if len(head) != _HEADER.size or _HEADER.unpack(head)[0] != MAGIC:
        raise NetError(f"{what} is not a pcap file of lockstep's format")
    while rec := f.read(_RECORD.size):
        if len(rec) != _RECORD.size:
            raise NetError(f"{what} is truncated (partial record header)")
        sec, usec, incl, _orig = _RECORD.unpack(rec)
        data = f.read(incl)
        if len(data) != incl:
            raise NetError(f"{what} is truncated (partial frame)")
        yield sec + usec / 1e6, data
