"""``lockstep certs``: make the group's CA and the certificates of execds and callers.

Every execd and every caller needs a certificate from the group's CA: the channel
is mutual TLS only (see :mod:`lockstep.rpc.tls`). Typical use::

    lockstep certs init certs/
    lockstep certs issue certs/ h1 --server --host 10.123.0.11
    lockstep certs issue certs/ caller --client
"""

from __future__ import annotations

from pathlib import Path

import click

from lockstep.errors import ConfigError
from lockstep.rpc import issue, load_ca, make_ca

__all__ = ["certs"]


@click.group("certs")
def certs() -> None:
    """Make the group's CA and the certificates of execds and callers."""


@certs.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="lockstep CA", show_default=True, help="The CA's common name.")
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=3650,
    show_default=True,
    help="How long the CA is valid.",
)
def init(directory: Path, name: str, days: int) -> None:
    """Make a new CA in DIRECTORY (ca.pem, ca.key); an existing CA is never replaced."""
    try:
        ca = make_ca(directory, name, days)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {ca.cert} (CA certificate, valid {days} days; copy it to every host)")
    click.echo(f"wrote {ca.key} (CA private key, mode 0600; keep it off the hosts)")


@certs.command("issue")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@click.option("--server", "kind", flag_value="server", help="An execd's certificate.")
@click.option("--client", "kind", flag_value="client", help="A caller's certificate.")
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="ADDRESS",
    help="(--server) An IP address or DNS name callers dial; repeat for each.",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=825,
    show_default=True,
    help="How long the certificate is valid.",
)
def issue_cmd(
    directory: Path, name: str, kind: str | None, hosts: tuple[str, ...], days: int
) -> None:
    """Issue NAME.pem and NAME.key in DIRECTORY, signed by the CA there."""
    if kind not in ("server", "client"):
        raise click.UsageError("say which kind of certificate: --server or --client")
    try:
        ca = load_ca(directory)
        files = issue(
            ca,
            directory,
            name,
            kind="server" if kind == "server" else "client",
            hosts=hosts,
            days=days,
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if kind == "server":
        names = ", ".join((name, *hosts))
        click.echo(f"wrote {files.cert} (server certificate for {names}; valid {days} days)")
    else:
        click.echo(f"wrote {files.cert} (client certificate {name}; valid {days} days)")
    click.echo(f"wrote {files.key} (private key, mode 0600)")
