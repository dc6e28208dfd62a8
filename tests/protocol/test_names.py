"""Names are checked everywhere they enter: CLI arguments, group file, RPC fields, the store.

State, VM, host, network and operation names reach file paths and command
lines, so each entry point refuses path traversal, separators, shell
metacharacters and control characters with one sentence (RPC fields are covered
by ``test_rpc.BAD_INPUTS`` and the fuzz tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner

from lockstep.cli.main import main
from lockstep.errors import ConfigError, InvalidName, StoreError
from lockstep.group import VmSpec, load_group, validate_name
from lockstep.store import StateStore
from tests.helpers.rpc import LOOPBACK, Pki, free_port

BAD_NAMES = [
    "../x",
    "..",
    ".",
    "a/b",
    "/etc",
    "-rf",
    "a b",
    "a;reboot",
    "$(reboot)",
    "`id`",
    "a|b",
    "a&b",
    "a>b",
    "s1\n",
    "s1\r",
    "s1\x00",
    "",
    "x" * 64,
    "é",
    "s\u2028",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_validate_name_refuses(name: str) -> None:
    """Each bad name is refused with InvalidName (a ConfigError and a ValueError), in one line."""
    with pytest.raises(InvalidName) as info:
        validate_name("state", name)
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, ValueError)
    assert len(str(info.value).splitlines()) == 1


def test_trailing_newline_is_not_a_name() -> None:
    """A name followed by a newline is refused (regexes with ``$`` used to let it through)."""
    for kind, value in (("state", "s1\n"), ("VM", "p1\n"), ("host", "h1\n")):
        with pytest.raises(InvalidName, match=r"\\n"):
            validate_name(kind, value)


def _cli_group(tmp_path: Path, pki: Pki) -> Path:
    """A group file whose one host listens nowhere: any RPC would fail as unreachable."""
    group = {
        "name": "g",
        "tls": {"ca": str(pki.ca.cert), "cert": str(pki.client.cert), "key": str(pki.client.key)},
        "hosts": {"h1": {"address": f"{LOOPBACK}:{free_port()}"}},
        "vms": {"p1": {"host": "h1", "kernel": "/k"}},
    }
    path = tmp_path / "g.toml"
    path.write_text(tomli_w.dumps(group))
    return path


@pytest.mark.parametrize("command", [["save"], ["restore"], ["state", "show"], ["state", "delete"]])
@pytest.mark.parametrize("name", ["../x", "a/b", "$(reboot)", "s1;rm", "s1\n"])
def test_cli_refuses_bad_state_names(
    tmp_path: Path, pki: Pki, command: list[str], name: str
) -> None:
    """A bad state name on the command line exits 1 with one sentence, before any RPC."""
    group = _cli_group(tmp_path, pki)
    result = CliRunner().invoke(main, ["-g", str(group), *command, name])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    # One sentence (rich may wrap it at the console's width).
    assert result.output.count("lockstep:") == 1, result.output
    sentence = " ".join(result.output.split())
    assert sentence.startswith("lockstep: state name ")
    assert sentence.endswith(
        "is not allowed (use letters, digits, '_', '.', '-'; start with a"
        " letter or digit; at most 63 characters; no '..')"
    )


@pytest.mark.parametrize(
    ("command", "sentence"),
    [
        (["kill", "../x"], "lockstep: group g has no VM '../x' (its VMs: p1)"),
        (["loss", "p1;rm", "5"], "lockstep: group g has no VM 'p1;rm' (its VMs: p1)"),
        (["partition", "p1", "$(x)"], "lockstep: '$(x)' is no VM or host of group g (VMs: p1;"),
        (["heal", "../x"], "lockstep: fault name '../x' is not allowed"),
    ],
)
def test_cli_fault_commands_refuse_unknown_and_bad_names(
    tmp_path: Path, pki: Pki, command: list[str], sentence: str
) -> None:
    """`lockstep fault` refuses a name the group lacks, or a bad fault id, in one sentence, before any RPC.

    The group's one host listens nowhere: had a call been made, the sentence
    would say it is unreachable.
    """
    group = _cli_group(tmp_path, pki)
    result = CliRunner().invoke(main, ["-g", str(group), "fault", *command])
    assert result.exit_code == 1, result.output
    assert result.output.count("lockstep:") == 1, result.output
    assert " ".join(result.output.split()).startswith(sentence), result.output


@pytest.mark.parametrize(
    ("section", "key"),
    [("vms", "../p1"), ("vms", "p1;reboot"), ("hosts", "h1\n"), ("networks", "$(x)")],
)
def test_group_file_refuses_bad_names(tmp_path: Path, section: str, key: str) -> None:
    """A bad VM, host or network name in the group file is one sentence naming the file."""
    group: dict[str, object] = {
        "hosts": {"h1": {"address": "10.0.0.1:7443"}},
        "vms": {"p1": {"host": "h1", "kernel": "/k"}},
    }
    entry = {"vms": {"host": "h1", "kernel": "/k"}, "hosts": {"address": "10.0.0.2:7443"}}.get(
        section, {"bridge": "br0"}
    )
    group.setdefault(section, {})[key] = entry  # type: ignore[index]
    path = tmp_path / "g.toml"
    path.write_text(tomli_w.dumps(group))
    with pytest.raises(ConfigError) as info:
        load_group(path, check_files=False)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "is not allowed" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"host": "../h1"},
        {"nics": [{"network": "../lan", "mac": "52:54:00:00:00:01"}]},
        {"nics": [{"network": "lan", "mac": "52:54:00:00:00:01", "bridge": "br0;x"}]},
        {"nics": [{"network": "lan", "mac": "52:54:00:00:00:01\n"}]},
        {"cmdline": "console=ttyS0\x00-x"},
        {"extra_args": ["-name", "a\x00b"]},
    ],
)
def test_vm_spec_stands_alone(fields: dict[str, object]) -> None:
    """A VmSpec as sent over RPC checks its own host, networks, bridges and argv text."""
    data = {"name": "p1", "host": "h1", "kernel": "/k", **fields}
    with pytest.raises(ValueError, match=r"not allowed|not a link name|not a MAC|NUL"):
        VmSpec.model_validate(data)


@pytest.mark.parametrize("name", ["../x", "a/b", "s1\n", ".."])
def test_store_refuses_bad_state_names(tmp_path: Path, name: str) -> None:
    """The state store refuses a bad name before it makes any path of it."""
    store = StateStore(tmp_path / "root")
    for call in (store.begin, store.show, store.delete):
        with pytest.raises(StoreError, match="is not allowed"):
            call(name)
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == [
        "layers",
        "staging",
        "states",
    ]
    assert list((tmp_path / "root" / "staging").iterdir()) == []
