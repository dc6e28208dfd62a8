"""Unit tests of the guest image's pure parts: apt sources, digest, command line, initramfs."""

from __future__ import annotations

import base64
import dataclasses
import lzma
import os
from pathlib import Path

import pytest

from lockstep.errors import ImageBuildError
from lockstep.lab import image
from lockstep.lab.image import (
    GuestImage,
    ImageInputs,
    build_image,
    debian_mirror,
    image_digest,
    kernel_cmdline,
)
from lockstep.proc import run, which

ONE_LINE = """\
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb http://security.example/debian-security bookworm-security main
deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian/ bookworm main contrib
deb http://later.example/debian bookworm main
"""

DEB822 = """\
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
# a comment inside the stanza, as Debian's own file has
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def inputs(**changes: object) -> ImageInputs:
    """A plausible set of image inputs, with ``changes`` applied."""
    base = ImageInputs(
        suite="bookworm",
        mirror="http://mirror.example/debian",
        kernel_package="linux-image-6.1.0-56-amd64",
        kernel_version="6.1.192-2",
        packages=("iproute2", "python3"),
        modules=image.INITRAMFS_MODULES,
        busybox_sha256="ab" * 32,
        guest_files=(("initramfs-init", b"#!/bin/busybox sh\n"), ("lsctl.py", b"pass\n")),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_mirror_from_one_line_sources() -> None:
    """The one-line parser skips comments, deb-src and other suites, strips options and '/'."""
    assert debian_mirror({"/etc/apt/sources.list": ONE_LINE}, "bookworm") == (
        "http://mirror.example/debian"
    )


def test_mirror_from_deb822_sources() -> None:
    """The deb822 parser skips disabled and deb-src stanzas and comment lines within a stanza."""
    assert debian_mirror({"/etc/apt/sources.list.d/debian.sources": DEB822}, "bookworm") == (
        "http://mirror.example/debian"
    )


def test_mirror_from_deb822_continuation_lines() -> None:
    """Multi-line deb822 fields (URIs on the next lines) are read like one-line ones."""
    text = "Types: deb\nURIs:\n http://a.example/debian\n http://b.example/debian\n"
    text += "Suites:\n bookworm\nComponents: main\n"
    assert debian_mirror({"d.sources": text}, "bookworm") == "http://a.example/debian"


def test_read_apt_sources_in_apt_order(tmp_path: Path) -> None:
    """sources.list comes first, then sources.list.d's .list and .sources files by name only."""
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/b.sources").write_text(DEB822)
    (tmp_path / "sources.list.d/a.list").write_text("# nothing\n")
    (tmp_path / "sources.list.d/c.list.disabled").write_text("deb http://no.example/ x main\n")
    assert list(image.read_apt_sources(tmp_path)) == [
        str(tmp_path / "sources.list.d/a.list"),
        str(tmp_path / "sources.list.d/b.sources"),
    ]
    (tmp_path / "sources.list").write_text(ONE_LINE)
    sources = image.read_apt_sources(tmp_path)
    assert next(iter(sources)) == str(tmp_path / "sources.list")
    assert debian_mirror(sources, "bookworm") == "http://mirror.example/debian"


def test_mirror_format_follows_the_file_name() -> None:
    """A .list file is read as one-line format even if it looks like deb822, and vice versa."""
    with pytest.raises(ImageBuildError):
        debian_mirror({"x.list": DEB822}, "bookworm")
    with pytest.raises(ImageBuildError):
        debian_mirror({"x.sources": ONE_LINE}, "bookworm")


def test_mirror_first_file_wins() -> None:
    """Files are searched in the order given (apt's order): the first usable entry wins."""
    sources = {
        "sources.list": "deb http://first.example/debian bookworm main\n",
        "d.sources": DEB822,
    }
    assert debian_mirror(sources, "bookworm") == "http://first.example/debian"


@pytest.mark.parametrize(
    "text",
    [
        "# deb http://mirror.example/debian bookworm main\n",
        "deb http://mirror.example/debian bookworm contrib non-free\n",
        "deb http://mirror.example/debian bookworm-updates main\n",
        "deb http://mirror.example/debian bullseye main\n",
        "deb-src http://mirror.example/debian bookworm main\n",
        "deb cdrom:[Debian GNU/Linux 12]/ bookworm main\n",
        "",
    ],
)
def test_no_usable_mirror_is_an_error(text: str) -> None:
    """Commented, wrong-suite, main-less, source-only or cdrom entries give ImageBuildError."""
    with pytest.raises(ImageBuildError, match="no Debian mirror for bookworm/main"):
        debian_mirror({"sources.list": text}, "bookworm")


def test_os_codename() -> None:
    """The release code name is read from os-release, with or without quotes."""
    assert image.os_codename('NAME="Debian"\nVERSION_CODENAME=bookworm\n') == "bookworm"
    assert image.os_codename("VERSION_CODENAME='trixie'\n") == "trixie"
    with pytest.raises(ImageBuildError):
        image.os_codename("NAME=Other\n")


def test_kernel_dependency() -> None:
    """The kernel meta-package's stanza gives the real kernel package and its pinned version."""
    stanza = (
        "Package: linux-image-amd64\nVersion: 6.1.192-2\n"
        "Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)\nDescription: x\n"
    )
    assert image.kernel_dependency(stanza) == ("linux-image-6.1.0-56-amd64", "6.1.192-2")
    assert image.kernel_dependency("Depends: libc6, linux-image-6.1.0-9-amd64\n") == (
        "linux-image-6.1.0-9-amd64",
        None,
    )
    with pytest.raises(ImageBuildError):
        image.kernel_dependency("Depends: libc6\n")


def test_digest_is_stable() -> None:
    """Equal inputs give equal digests; the order of extra packages does not matter."""
    assert image_digest(inputs()) == image_digest(inputs())
    assert image_digest(inputs(packages=("python3", "iproute2"))) == image_digest(inputs())
    assert len(image_digest(inputs())) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"suite": "trixie"},
        {"mirror": "http://other.example/debian"},
        {"kernel_package": "linux-image-6.1.0-57-amd64"},
        {"kernel_version": "6.1.193-1"},
        {"packages": ("iproute2", "keepalived", "python3")},
        {"modules": image.INITRAMFS_MODULES[:-1]},
        {"busybox_sha256": "cd" * 32},
        {"guest_files": (("initramfs-init", b"#!/bin/busybox sh\n"), ("lsctl.py", b"pass  \n"))},
        {"format": image.IMAGE_FORMAT + 1},
    ],
)
def test_digest_changes_with_every_input(change: dict[str, object]) -> None:
    """Changing any single input (even one byte of a guest file) changes the digest."""
    assert image_digest(inputs(**change)) != image_digest(inputs())


def test_package_list() -> None:
    """Extra packages join the base ones, sorted and de-duplicated; bad names are refused."""
    assert image.package_list(["keepalived", "python3"]) == (
        "iproute2",
        "iputils-arping",
        "iputils-ping",
        "keepalived",
        "python3",
        "qemu-guest-agent",
    )
    with pytest.raises(ImageBuildError, match="not Debian package names"):
        image.package_list(["keepalived,evil"])
    with pytest.raises(ImageBuildError):
        image.package_list(["Bad Name"])


def test_cmdline_carries_the_start_command_as_base64() -> None:
    """The start command, spaces, quotes and newlines included, is one base64 word."""
    start = "while :; do echo 'hi there' \"$(hostname)\"; sleep 1; done\nexit 0"
    line = kernel_cmdline(hostname="p1", ip="10.124.0.11/24", start=start)
    words = line.split()
    assert words[:5] == ["console=ttyS0", "root=/dev/vda", "rw", "quiet", "panic=-1"]
    assert "ls.hostname=p1" in words
    assert "ls.ip=10.124.0.11/24" in words
    [encoded] = [w for w in words if w.startswith("ls.start=")]
    assert base64.b64decode(encoded.removeprefix("ls.start="), validate=True).decode() == start
    assert "hi there" not in line


def test_cmdline_optional_parts() -> None:
    """Without ip or start no ls.ip/ls.start appear; extra is appended with spaces squeezed."""
    image_ = GuestImage(Path("k"), Path("i"), Path("r"), "0" * 64)
    line = image_.cmdline(hostname="s1", extra="  loglevel=3   nokaslr ")
    assert line == "console=ttyS0 root=/dev/vda rw quiet panic=-1 ls.hostname=s1 loglevel=3 nokaslr"
    assert "ls.start" not in image_.cmdline(hostname="s1", start="")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"hostname": "p 1"}, "host name"),
        ({"hostname": "-p1"}, "host name"),
        ({"hostname": "p1\n"}, "host name"),
        ({"hostname": "p1", "ip": "10.124.0.11"}, "prefix length"),
        ({"hostname": "p1", "ip": "10.124.0.300/24"}, "address"),
        ({"hostname": "p1", "start": "x" * 2000}, "over the kernel's"),
    ],
)
def test_cmdline_refuses_what_the_kernel_or_init_cannot_take(
    args: dict[str, str], match: str
) -> None:
    """Bad host names, addresses without a prefix and over-long lines raise ValueError."""
    with pytest.raises(ValueError, match=match):
        kernel_cmdline(**args)


def test_cpio_is_readable_by_cpio(tmp_path: Path) -> None:
    """The Python-written newc archive lists, and unpacks, with GNU cpio as written."""
    if which("cpio") is None:
        pytest.skip("needs cpio")
    modules = [("virtio", b"\x7fELF virtio"), ("ext4", b"\x7fELF ext4 module")]
    archive = image.cpio_newc(image.initramfs_entries(b"#!/bin/busybox sh\n", b"BB", modules))
    assert len(archive) % 4 == 0
    listing = run(["cpio", "-t", "--quiet"], input=archive).text.split()
    assert listing[:6] == ["bin", "dev", "proc", "sys", "newroot", "lib"]
    assert {"init", "bin/busybox", "dev/console", "lib/modules/order"} <= set(listing)
    assert {"lib/modules/virtio.ko", "lib/modules/ext4.ko"} <= set(listing)
    verbose = run(["cpio", "-tv", "--quiet"], input=archive).text
    assert any(line.startswith("crw-------") for line in verbose.splitlines())
    files = [e for e in image.initramfs_entries(b"x", b"BB", modules) if e.name != "dev/console"]
    run(["cpio", "-i", "-d", "--quiet"], input=image.cpio_newc(files), cwd=str(tmp_path))
    assert (tmp_path / "lib/modules/order").read_text() == "virtio\next4\n"
    assert (tmp_path / "lib/modules/ext4.ko").read_bytes() == b"\x7fELF ext4 module"
    assert os.access(tmp_path / "init", os.X_OK)


def fake_kernel_tree(root: Path, release: str) -> Path:
    """A kernel package tree with a plain, an xz and a built-in module."""
    mods = root / "lib/modules" / release
    (mods / "kernel/a").mkdir(parents=True)
    (mods / "kernel/a/first.ko").write_bytes(b"\x7fELF\0license=GPL\0depends=\0")
    (mods / "kernel/a/second-mod.ko.xz").write_bytes(
        lzma.compress(b"\x7fELF\0depends=first,builtin_one\0", format=lzma.FORMAT_XZ)
    )
    (mods / "modules.builtin").write_text("kernel/lib/builtin_one.ko\n")
    return root


def test_collect_modules_uncompresses_and_checks_order(tmp_path: Path) -> None:
    """Modules come out uncompressed in the asked order, built-ins are skipped, deps are checked."""
    tree = fake_kernel_tree(tmp_path, "6.1.0-1-amd64")
    got = image._collect_modules(tree, "6.1.0-1-amd64", ["builtin_one", "first", "second_mod"])
    assert [name for name, _ in got] == ["first", "second_mod"]
    assert got[1][1] == b"\x7fELF\0depends=first,builtin_one\0"
    with pytest.raises(ImageBuildError, match="needs first loaded first"):
        image._collect_modules(tree, "6.1.0-1-amd64", ["second_mod", "first"])
    with pytest.raises(ImageBuildError, match="no module missing"):
        image._collect_modules(tree, "6.1.0-1-amd64", ["missing"])


def test_build_is_cached_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed build leaves nothing in the cache; a good one is renamed into place, then reused."""
    monkeypatch.setattr(image, "image_inputs", lambda extra=(): inputs())
    digest = image_digest(inputs())
    calls: list[Path] = []

    def failing_build(staging: Path, *_: object) -> None:
        (staging / "vmlinuz").write_bytes(b"half")
        raise ImageBuildError("debootstrap failed")

    monkeypatch.setattr(image, "_build_into", failing_build)
    with pytest.raises(ImageBuildError, match="debootstrap failed"):
        build_image(cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    def good_build(staging: Path, ins: ImageInputs, dig: str, *_: object) -> None:
        calls.append(staging)
        for name in ("vmlinuz", "initrd.gz", "rootfs.qcow2"):
            (staging / name).write_bytes(name.encode())
        image._write_manifest(staging, ins, dig, "6.1.0-56-amd64")

    monkeypatch.setattr(image, "_build_into", good_build)
    lines: list[str] = []
    built = build_image(cache_dir=tmp_path, progress=lines.append)
    assert built.digest == digest
    assert built.rootfs == tmp_path / digest[:16] / "rootfs.qcow2"
    assert built.kernel.read_bytes() == b"vmlinuz"
    assert lines and lines[-1].startswith("guest image ready")
    assert build_image(cache_dir=tmp_path) == built
    assert len(calls) == 1
    assert not calls[0].exists()
