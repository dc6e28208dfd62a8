"""Mutual TLS cannot be configured away: no config, group file or code path runs without it.

The handshake refusals themselves (plaintext, no client certificate, another
CA's certificate, expired certificates, a certificate of the wrong kind) are in
``test_rpc.py``; here: neither an execd nor the caller starts without
certificates, and the source never opens a plaintext port or channel.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner

import lockstep
from lockstep.cli.main import main
from lockstep.errors import ConfigError
from lockstep.execd.config import load_execd_config
from tests.helpers.rpc import LOOPBACK, free_port

SRC = Path(lockstep.__file__).resolve().parent


def test_execd_config_without_tls_is_refused(tmp_path: Path) -> None:
    """An execd config with no [tls] section is a ConfigError naming the file and the key."""
    path = tmp_path / "execd.toml"
    path.write_text(
        tomli_w.dumps({"host": "h1", "root": str(tmp_path / "root"), "listen": "127.0.0.1:1"})
    )
    with pytest.raises(ConfigError) as info:
        load_execd_config(path)
    assert str(info.value).startswith(f"{path}: tls")


def test_caller_without_tls_is_refused(tmp_path: Path) -> None:
    """A group file with no [tls] section: the caller refuses to talk, in one sentence."""
    group = tmp_path / "g.toml"
    group.write_text(
        tomli_w.dumps(
            {
                "hosts": {"h1": {"address": f"{LOOPBACK}:{free_port()}"}},
                "vms": {"p1": {"host": "h1", "kernel": "/k"}},
            }
        )
    )
    result = CliRunner().invoke(main, ["-g", str(group), "status"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    sentence = " ".join(result.output.split())
    assert "has no [tls] section: mutual TLS is mandatory" in sentence


def test_source_opens_no_plaintext_port_or_channel() -> None:
    """No file under src/lockstep opens an insecure port or channel, or turns client auth off.

    A cheap guard: the only way to an execd is the mutual TLS of lockstep.rpc.tls.
    """
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if "generated" in path.parts:  # protoc's code names the API, never calls it
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in (
                "add_insecure_port",
                "insecure_channel",
                "local_server_credentials",
                "local_channel_credentials",
            ):
                found.append(f"{path}:{node.lineno}: {node.attr}")
            if (
                isinstance(node, ast.keyword)
                and node.arg == "require_client_auth"
                and not (isinstance(node.value, ast.Constant) and node.value.value is True)
            ):
                found.append(f"{path}:{node.value.lineno}: require_client_auth not True")
    assert found == []
