"""Fuzzing the group file parser: any input gives a GroupSpec or one line of ConfigError.

Documents are built by hypothesis in the shape of a group file, with every value
sometimes of the wrong type, missing, huge, unicode or a path traversal; some are
written as TOML and then cut or spliced, some are not TOML or not UTF-8 at all.
Whatever comes in, :func:`lockstep.group.load_group` must return a valid
GroupSpec or raise ConfigError whose message is one printable line starting with
the file's name: never another exception, never a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from lockstep.errors import ConfigError
from lockstep.group import GroupSpec, load_group
from tests.helpers.fuzz import BAD_NAMES, FUZZ, names

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

# Any TOML value: what a wrong type looks like.
_scalar = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(BAD_NAMES[:-1]),
    st.datetimes(),
    st.dates(),
)
junk = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``strategy``, sometimes a value of any other type."""
    return st.one_of(strategy, strategy, strategy, junk)


group_names = names(["g", "h1", "h2", "lan", "p1", "s1"])
address = st.one_of(
    st.sampled_from(["10.0.0.1:7443", "[::1]:7443", "h1.example:1", "localhost:65535"]),
    st.sampled_from(
        [
            "1.2.3.4:²",
            "1.2.3.4:١٢٣",
            "a b:80",
            "h\n:80",
            ":80",
            "h:",
            "h:0",
            "h:65536",
            "[zz]:80",
            "::1:80",
        ]
    ),
    st.builds("{}:{}".format, st.text(max_size=20), st.integers(-5, 70_000)),
    st.text(max_size=30),
)
mac = st.one_of(
    st.sampled_from(
        ["52:54:00:12:00:01", "52:54:00:12:00:02", "53:54:00:00:00:01", "52:54:00:12:00:01\n"]
    ),
    st.text(max_size=20),
)
size = st.one_of(
    st.integers(),
    st.sampled_from(["256M", "1G", "0", "9" * 400, "1.5GiB", "-1M", "1e9", "inf", "9" * 30 + "T"]),
    st.text(max_size=12),
)
path = st.one_of(
    st.sampled_from(
        ["/k", "k", "../../etc/passwd", "/etc/passwd", "", "/" + "a" * 300, "a\x00b", "~/x"]
    ),
    st.text(max_size=40),
)
nic = st.fixed_dictionaries(
    {"network": maybe(group_names), "mac": maybe(mac)},
    optional={
        "model": maybe(st.sampled_from(["virtio-net-pci", "e1000", "rtl8139"])),
        "bridge": maybe(group_names),
    },
)
vm = st.fixed_dictionaries(
    {"host": maybe(group_names)},
    optional={
        "name": maybe(group_names),
        "vcpus": maybe(st.integers()),
        "memory": maybe(size),
        "accel": maybe(st.sampled_from(["tcg", "kvm", "xen"])),
        "disk": maybe(path),
        "disks": maybe(
            st.lists(
                maybe(
                    st.one_of(
                        path,
                        st.fixed_dictionaries(
                            {"path": path},
                            optional={
                                "readonly": maybe(st.booleans()),
                                "shareable": maybe(st.booleans()),
                                "format": maybe(st.sampled_from(["qcow2", "raw", "vmdk"])),
                            },
                        ),
                    )
                ),
                max_size=3,
            )
        ),
        "driver": maybe(st.sampled_from(["qemu", "libvirt", "xen"])),
        "domain": maybe(group_names),
        "kernel": maybe(path),
        "initrd": maybe(path),
        "cmdline": maybe(st.text(max_size=40)),
        "nics": maybe(st.lists(maybe(nic), max_size=3)),
        "extra_args": maybe(st.lists(st.text(max_size=20), max_size=3)),
        "bogus": junk,
    },
)
group_docs = st.fixed_dictionaries(
    {},
    optional={
        "name": maybe(group_names),
        "tls": maybe(st.fixed_dictionaries({"ca": path, "cert": path, "key": path})),
        "hosts": maybe(
            st.dictionaries(
                group_names,
                maybe(
                    st.fixed_dictionaries(
                        {"address": maybe(address)},
                        optional={"libvirt": maybe(st.sampled_from(["qemu:///system", "x"]))},
                    )
                ),
                max_size=3,
            )
        ),
        "networks": maybe(
            st.dictionaries(
                group_names,
                maybe(st.fixed_dictionaries({"bridge": maybe(group_names)})),
                max_size=2,
            )
        ),
        "vms": maybe(st.dictionaries(group_names, maybe(vm), max_size=3)),
        "extra": junk,
    },
)


def _toml(doc: dict[str, Any]) -> bytes:
    try:
        return tomli_w.dumps(doc).encode()
    except (TypeError, ValueError):  # a value TOML cannot hold
        assume(False)
        raise AssertionError("unreachable") from None


@st.composite
def spliced(draw: st.DrawFn) -> bytes:
    """A group file written as TOML, then cut and spliced at random."""
    text = _toml(draw(group_docs))
    i = draw(st.integers(0, len(text)))
    j = draw(st.integers(i, len(text)))
    return text[:i] + draw(st.binary(max_size=12)) + text[j:]


documents = st.one_of(
    group_docs.map(_toml),
    group_docs.map(_toml),
    spliced(),
    st.text(max_size=200).map(str.encode),
    st.binary(max_size=200),
)

_GOOD = {
    "hosts": {"h1": {"address": "10.0.0.1:7443"}},
    "vms": {"p1": {"host": "h1", "kernel": "/k"}},
}


def _with(**changes: Any) -> bytes:
    """The good group with some keys replaced (for regression examples)."""
    doc: dict[str, Any] = {**_GOOD, **changes}
    return tomli_w.dumps(doc).encode()


def check_valid(group: GroupSpec) -> None:
    """What a GroupSpec promises: safe names, known references, argv text without NUL."""
    for kind in (group.hosts, group.networks, group.vms):
        for key in kind:
            assert _NAME.fullmatch(key) and ".." not in key, key
    assert _NAME.fullmatch(group.name)
    for host in group.hosts.values():
        assert host.address.isprintable() and " " not in host.address, host.address
        port = host.address.rpartition(":")[2]
        assert port.isascii() and port.isdigit() and 0 < int(port) < 65536
    for net in group.networks.values():
        assert _IFNAME.fullmatch(net.bridge), net.bridge
    for name, spec in group.vms.items():
        assert spec.name == name
        assert spec.host in group.hosts
        assert 1 <= spec.vcpus <= 64 and spec.memory > 0
        assert spec.kernel is not None or spec.disks or spec.driver == "libvirt"
        paths = [str(d.path) for d in spec.disks]
        for text in [spec.cmdline, *spec.extra_args, *paths, str(spec.kernel)]:
            assert "\x00" not in text
        for n in spec.nics:
            assert n.network in group.networks
            assert _MAC.fullmatch(n.mac)
            assert n.bridge is not None and _IFNAME.fullmatch(n.bridge)


@pytest.fixture(scope="module")
def group_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one file every example is written to."""
    return tmp_path_factory.mktemp("group-fuzz") / "lockstep.toml"


@settings(FUZZ)
@given(raw=documents, check_files=st.booleans())
# Regressions: each of these crashed or slipped through before it was fixed.
@example(
    raw=_with(vms={"p1": {"host": "h1", "kernel": "/k", "memory": "9" * 400}}), check_files=False
)
@example(raw=_with(vms={"p1": {"host": "h1", "kernel": "/" + "a" * 300}}), check_files=True)
@example(raw=_with(vms={"a\nb": {"host": 5, "kernel": "/k"}}), check_files=False)
@example(raw=_with(vms={"p1": {"host": "h1", "kernel": "/k\x00x"}}), check_files=True)
@example(raw=_with(hosts={"h1": {"address": "1.2.3.4:²"}}), check_files=False)
@example(raw=_with(hosts={"h1": {"address": "a b\n:١٢٣"}}), check_files=False)
@example(raw=_with(networks={"lan": {"bridge": "br\n"}}), check_files=False)
@example(raw=_with(vms={"p1\n": {"host": "h1", "kernel": "/k"}}), check_files=False)
@example(raw=_with(vms={"x" * 100_000: {"host": "h1", "kernel": "/k"}}), check_files=False)
@example(
    raw=_with(
        vms={
            "p1": {
                "host": "h1",
                "kernel": "/k",
                "nics": [{"network": "lan\n", "mac": "52:54:00:00:00:01", "bridge": "b"}],
            }
        }
    ),
    check_files=False,
)
def test_any_group_file_loads_or_fails_in_one_line(
    group_file: Path, raw: bytes, check_files: bool
) -> None:
    """Random and malformed group files give a GroupSpec or a one-line ConfigError naming the file."""
    group_file.write_bytes(raw)
    try:
        group = load_group(group_file, check_files=check_files)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{group_file}: "), message
        assert message.isprintable(), message
        assert len(message) < 2000
        return
    check_valid(group)
