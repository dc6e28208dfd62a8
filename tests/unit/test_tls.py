"""Certificates made by lockstep.rpc.tls and ``lockstep certs``: fields, files and refusals."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from lockstep.cli.certs import certs
from lockstep.errors import ConfigError
from lockstep.rpc import CaFiles, channel_credentials, issue, load_ca, make_ca, server_credentials


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca(tmp_path: Path) -> CaFiles:
    """A fresh CA in tmp_path/pki."""
    return make_ca(tmp_path / "pki")


def test_ca_is_a_ca_with_a_private_key(ca: CaFiles) -> None:
    """make_ca writes a self-signed CA certificate and a key readable by its owner only."""
    cert = _cert(ca.cert)
    assert cert.subject == cert.issuer
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert _mode(ca.key) == 0o600
    assert (ca.cert.name, ca.key.name) == ("ca.pem", "ca.key")


def test_existing_ca_is_never_overwritten(ca: CaFiles) -> None:
    """A second make_ca in the same folder raises ConfigError naming the file, changing nothing."""
    before = ca.cert.read_bytes()
    with pytest.raises(ConfigError, match=r"ca\.pem already exists"):
        make_ca(ca.cert.parent)
    assert ca.cert.read_bytes() == before


def test_server_cert_has_san_and_server_auth(ca: CaFiles, tmp_path: Path) -> None:
    """A server cert names its host and every address (IP and DNS) in the SAN, for serverAuth."""
    files = issue(ca, tmp_path / "pki", "h1", kind="server", hosts=["10.123.0.11", "::1", "h1.lab"])
    cert = _cert(files.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["h1", "h1.lab"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.123.0.11"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.issuer == _cert(ca.cert).subject
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _mode(files.key) == 0o600


def test_client_cert_has_client_auth_and_no_san(ca: CaFiles, tmp_path: Path) -> None:
    """A client cert is for clientAuth only and carries no subjectAltName."""
    cert = _cert(issue(ca, tmp_path / "pki", "caller", kind="client").cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_validity_follows_days(ca: CaFiles, tmp_path: Path) -> None:
    """A cert is valid from a few minutes ago for ``days`` days."""
    now = dt.datetime.now(dt.UTC)
    cert = _cert(issue(ca, tmp_path, "caller", kind="client", days=30).cert)
    assert now - dt.timedelta(minutes=10) < cert.not_valid_before_utc < now
    expected_end = now + dt.timedelta(days=30)
    assert abs(cert.not_valid_after_utc - expected_end) < dt.timedelta(minutes=1)


def test_expired_certs_can_be_made(ca: CaFiles, tmp_path: Path) -> None:
    """days=-1 or a past not_after makes a cert whose validity lies entirely in the past."""
    now = dt.datetime.now(dt.UTC)
    by_days = _cert(issue(ca, tmp_path, "old", kind="client", days=-1).cert)
    past = now - dt.timedelta(hours=2)
    by_date = _cert(issue(ca, tmp_path, "older", kind="client", not_after=past).cert)
    for cert in (by_days, by_date):
        assert cert.not_valid_before_utc < cert.not_valid_after_utc < now
    assert abs(by_date.not_valid_after_utc - past) < dt.timedelta(seconds=1)


@pytest.mark.parametrize(
    ("name", "kind", "hosts", "match"),
    [
        ("../x", "server", (), "certificate name '../x' is not allowed"),
        ("caller", "client", ("10.0.0.1",), "hosts are only for server certificates"),
        ("h1", "server", ("not a host!",), "neither an IP address nor a DNS name"),
        ("h1", "peer", (), "is not 'server' or 'client'"),
    ],
)
def test_bad_issue_requests_are_refused(
    ca: CaFiles, tmp_path: Path, name: str, kind: str, hosts: tuple[str, ...], match: str
) -> None:
    """A bad name, kind or host raises ConfigError and writes nothing."""
    with pytest.raises(ConfigError, match=match):
        issue(ca, tmp_path / "out", name, kind=kind, hosts=hosts)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_issue_refuses_a_leaf_as_ca(ca: CaFiles, tmp_path: Path) -> None:
    """Signing with a leaf certificate instead of the CA is refused."""
    leaf = issue(ca, tmp_path, "caller", kind="client")
    with pytest.raises(ConfigError, match="is not a CA certificate"):
        issue(CaFiles(cert=leaf.cert, key=leaf.key), tmp_path, "x", kind="client")


def test_load_ca_names_the_missing_file(tmp_path: Path) -> None:
    """load_ca on a folder without a CA says which file is missing and how to make one."""
    with pytest.raises(ConfigError, match=r"ca\.pem: no such file \(make a CA first"):
        load_ca(tmp_path)


def test_credentials_are_built_from_good_files(ca: CaFiles, tmp_path: Path) -> None:
    """Matching CA, cert and key give server and channel credentials."""
    server = issue(ca, tmp_path, "h1", kind="server", hosts=["127.0.0.1"])
    client = issue(ca, tmp_path, "caller", kind="client")
    assert server_credentials(ca.cert, server.cert, server.key) is not None
    assert channel_credentials(ca.cert, client.cert, client.key) is not None


def test_credentials_errors_name_the_file(ca: CaFiles, tmp_path: Path) -> None:
    """Missing, non-PEM, mismatched or expired files raise ConfigError naming the file."""
    client = issue(ca, tmp_path, "caller", kind="client")
    other = issue(ca, tmp_path, "other", kind="client")
    expired = issue(ca, tmp_path, "expired", kind="client", days=-1)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    cases = [
        ((missing, client.cert, client.key), f"{missing}: no such CA certificate file"),
        ((junk, client.cert, client.key), f"{junk}: not a PEM CA certificate"),
        ((ca.cert, junk, client.key), f"{junk}: not a PEM certificate"),
        ((ca.cert, client.cert, junk), f"{junk}: not a PEM private key"),
        ((ca.cert, client.cert, other.key), f"{other.key} is not the private key of"),
        ((ca.cert, expired.cert, expired.key), f"{expired.cert}: the certificate expired on"),
    ]
    for make in (server_credentials, channel_credentials):
        for args, message in cases:
            with pytest.raises(ConfigError) as info:
                make(*args)
            assert str(info.value).startswith(message), (make.__name__, str(info.value))


def test_cli_init_and_issue(tmp_path: Path) -> None:
    """``lockstep certs init/issue`` write the CA and certs and say what they wrote."""
    pki = tmp_path / "pki"
    runner = CliRunner()
    result = runner.invoke(certs, ["init", str(pki)])
    assert result.exit_code == 0, result.output
    assert f"wrote {pki / 'ca.pem'}" in result.output
    result = runner.invoke(
        certs, ["issue", str(pki), "h1", "--server", "--host", "10.1.0.1", "--days", "10"]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {pki / 'h1.pem'} (server certificate for h1, 10.1.0.1" in result.output
    cert = _cert(pki / "h1.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.0.1")]
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC) + dt.timedelta(days=11)
    result = runner.invoke(certs, ["issue", str(pki), "caller", "--client"])
    assert result.exit_code == 0, result.output
    assert (pki / "caller.key").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["init", "{pki}"], "ca.pem already exists"),
        (["issue", "{tmp}", "h1", "--server"], "ca.pem: no such file"),
        (["issue", "{pki}", "h1"], "--server or --client"),
        (["issue", "{pki}", "caller", "--client", "--host", "1.2.3.4"], "only for server"),
    ],
)
def test_cli_errors_are_one_sentence(tmp_path: Path, args: list[str], message: str) -> None:
    """CLI mistakes exit non-zero with one line of error and no traceback."""
    pki = tmp_path / "pki"
    make_ca(pki)
    argv = [a.format(pki=pki, tmp=tmp_path / "empty") for a in args]
    result = CliRunner().invoke(certs, argv)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1
