"""Mutual TLS for the caller <-> execd channel: certificates and gRPC credentials.

An execd can pause and destroy VMs, so it must only obey callers holding a
certificate from the group's own CA, and the caller must only talk to execds
holding one. There is no plaintext mode and no "server-only" TLS mode here.

A group has one private CA (:func:`make_ca`); :func:`issue` makes a server
certificate per execd and a client certificate per caller. Keys are EC P-256,
written with mode 0600.

Target names: the caller connects to an execd by the address in the group file,
usually an IP. A server certificate therefore carries a subjectAltName for every
``hosts`` entry (IP entries for addresses, DNS entries for names) plus a DNS entry
for the certificate's own name (the host name, e.g. ``h1``). gRPC checks the
address the caller dialled against those entries, so by default nothing needs
configuring; a caller that dials an address not in the certificate can pass
``target_name`` (e.g. the host name) to :class:`lockstep.rpc.HostClient`, which sets
``grpc.ssl_target_name_override``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lockstep.errors import ConfigError
from lockstep.group import is_dns_name, validate_name

__all__ = [
    "CaFiles",
    "CertFiles",
    "CertKind",
    "channel_credentials",
    "issue",
    "load_ca",
    "make_ca",
    "server_credentials",
]

CertKind = Literal["server", "client"]
# Certificates start a little in the past so a host whose clock is slightly behind
# the issuer's still accepts them.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CaFiles:
    """A CA's certificate and private key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertFiles:
    """A leaf certificate and its private key (PEM files)."""

    cert: Path
    key: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` atomically (temp file + rename) with ``mode`` from the start."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # the umask may have narrowed or (for certs) that is fine
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _validity(days: int, not_after: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    end = not_after if not_after is not None else now + dt.timedelta(days=days)
    if end.tzinfo is None:
        raise ConfigError("not_after must be timezone-aware")
    start = min(now - _BACKDATE, end - dt.timedelta(days=1))
    return start, end


def _mkdir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot create folder: {exc.strerror or exc}") from exc


def make_ca(
    dir: Path,
    name: str = "lockstep CA",
    days: int = 3650,
    *,
    not_after: dt.datetime | None = None,
) -> CaFiles:
    """Make a new CA in ``dir``: ``ca.pem`` and ``ca.key`` (mode 0600).

    ``not_after`` (timezone-aware) overrides ``days``; a past instant (or a
    negative ``days``) makes a CA that is already expired, for tests.

    Raises:
        ConfigError: a CA already exists there (it is never overwritten: every
            certificate it signed would become useless), or the files cannot be
            written.
    """
    files = CaFiles(cert=dir / "ca.pem", key=dir / "ca.key")
    for path in (files.cert, files.key):
        if path.exists():
            raise ConfigError(
                f"{path} already exists; a CA is never overwritten (remove it first to"
                " start over, then issue every certificate again)"
            )
    _mkdir(dir)
    key = _new_key()
    start, end = _validity(days, not_after)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(files.cert, files.key, cert, key)
    return files


def load_ca(dir: Path) -> CaFiles:
    """The CA made by :func:`make_ca` in ``dir``.

    Raises:
        ConfigError: ``ca.pem`` or ``ca.key`` is missing there.
    """
    files = CaFiles(cert=dir / "ca.pem", key=dir / "ca.key")
    for path in (files.cert, files.key):
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (make a CA first: lockstep certs init {dir})")
    return files


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not is_dns_name(host):
        raise ConfigError(f"{host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def issue(
    ca: CaFiles,
    dir: Path,
    name: str,
    *,
    kind: CertKind,
    hosts: Sequence[str] = (),
    days: int = 825,
    not_after: dt.datetime | None = None,
) -> CertFiles:
    """Issue a certificate signed by ``ca``: ``dir/NAME.pem`` and ``dir/NAME.key`` (0600).

    A ``server`` certificate (an execd's) has the serverAuth usage and
    subjectAltNames for ``name`` and every entry of ``hosts`` (IP addresses or DNS
    names): list every address callers dial. A ``client`` certificate (a caller's)
    has the clientAuth usage and takes no hosts. ``not_after`` (timezone-aware)
    overrides ``days``; a past instant or negative ``days`` makes an expired
    certificate, for tests. Existing files of that name are replaced.

    Raises:
        ConfigError: bad name, kind or host; hosts given for a client certificate;
            the CA files are unreadable or not a CA; the files cannot be written.
    """
    validate_name("certificate", name)  # InvalidName is a ConfigError
    if kind not in ("server", "client"):
        raise ConfigError(f"certificate kind {kind!r} is not 'server' or 'client'")
    if kind == "client" and hosts:
        raise ConfigError("hosts are only for server certificates; a client certificate has none")
    _, ca_cert = _load_cert(ca.cert)
    _, ca_key = _load_key(ca.key)
    if ca_cert.public_key() != ca_key.public_key():
        raise ConfigError(f"{ca.key} is not the key of {ca.cert}")
    try:
        is_ca = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"{ca.cert} is not a CA certificate")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca.key} is not an EC key (make the CA with lockstep certs init)")

    key = _new_key()
    start, end = _validity(days, not_after)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if kind == "server":
        names: list[x509.GeneralName] = [x509.DNSName(name)]
        for host in hosts:
            entry = _san(host)
            if entry not in names:
                names.append(entry)
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _mkdir(dir)
    files = CertFiles(cert=dir / f"{name}.pem", key=dir / f"{name}.key")
    _write_pair(files.cert, files.key, cert, key)
    return files


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such {what} file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} file: {exc.strerror or exc}") from exc


def _load_cert(path: Path) -> tuple[bytes, x509.Certificate]:
    data = _read(path, "certificate")
    try:
        return data, x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM certificate") from exc


def _load_key(path: Path) -> tuple[bytes, PrivateKeyTypes]:
    data = _read(path, "private key")
    try:
        return data, serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise ConfigError(f"{path}: the private key is encrypted; lockstep needs it plain") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not a PEM private key") from exc


def _load_bundle(path: Path) -> bytes:
    data = _read(path, "CA certificate")
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM CA certificate") from exc
    return data


def _load_identity(cert_path: Path, key_path: Path) -> tuple[bytes, bytes]:
    """Read a certificate and its key, checking they belong together and are current."""
    cert_pem, cert = _load_cert(cert_path)
    key_pem, key = _load_key(key_path)
    if cert.public_key() != key.public_key():
        raise ConfigError(f"{key_path} is not the private key of {cert_path}")
    expired = cert.not_valid_after_utc
    if expired <= dt.datetime.now(dt.UTC):
        raise ConfigError(
            f"{cert_path}: the certificate expired on {expired:%Y-%m-%d %H:%M} UTC;"
            " issue a new one (lockstep certs issue)"
        )
    return cert_pem, key_pem


def server_credentials(ca: Path, cert: Path, key: Path) -> grpc.ServerCredentials:
    """An execd's TLS identity that requires every client to present a cert from ``ca``.

    Raises:
        ConfigError: a file is missing, unreadable or not PEM; the key does not
            match the certificate; the certificate has expired. The message names
            the file.
    """
    root = _load_bundle(ca)
    cert_pem, key_pem = _load_identity(cert, key)
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=root, require_client_auth=True
    )


def channel_credentials(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    """A caller's TLS identity that trusts only execds with a cert from ``ca``.

    Raises:
        ConfigError: a file is missing, unreadable or not PEM; the key does not
            match the certificate; the certificate has expired. The message names
            the file.
    """
    root = _load_bundle(ca)
    cert_pem, key_pem = _load_identity(cert, key)
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key_pem, certificate_chain=cert_pem
    )
