"""``lockstep-execd``: the per-host daemon (the execd service behind gRPC + mutual TLS)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

# libvirt's embedded driver (a group may name qemu:///embed?root=DIR) forks in
# this process (a QEMU probed or started):
# gRPC's fork handlers then abort the child ("epoll_wait error: Bad file
# descriptor", libvirt closes every descriptor before exec). The execd never
# uses gRPC in a child process, so it turns them off before gRPC starts.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import click

from lockstep.errors import ConfigError, LockstepError
from lockstep.execd.config import load_execd_config
from lockstep.execd.model import ExecdConfig
from lockstep.execd.service import HostService
from lockstep.rpc import serve, server_credentials

__all__ = ["main"]

log = logging.getLogger("lockstep.execd")


async def run(config: ExecdConfig) -> None:
    """Start the service (re-attaching to running VMs), serve until SIGTERM/SIGINT."""
    service = HostService(config)
    await service.start()
    if config.ca is None or config.cert is None or config.key is None:
        raise ConfigError(f"execd {config.host}: mutual TLS needs ca, cert and key")
    creds = server_credentials(config.ca, config.cert, config.key)
    server = await serve(service, config.listen, creds)
    log.info("execd %s listening on %s (mutual TLS)", config.host, config.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("execd %s stopping; its VMs keep running", config.host)
    await server.stop(2.0)
    await service.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The execd config file (TOML): host, root, listen, [tls].",
)
@click.option(
    "--clock-offset",
    type=float,
    default=0.0,
    metavar="SECONDS",
    help="For tests: make this execd's clock wrong by SECONDS; sync must compensate.",
)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning"]))
def main(config_path: Path, clock_offset: float, log_level: str) -> None:
    """Run one host's lockstep execd: it drives this host's VMs for the caller.

    It only accepts mutual-TLS connections from clients whose certificate is
    signed by the group's CA. QEMU processes it starts outlive it; after a
    restart it re-attaches to them.
    """
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_execd_config(config_path, clock_offset=clock_offset)
        asyncio.run(run(config))
    except LockstepError as exc:
        click.echo(f"lockstep-execd: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
