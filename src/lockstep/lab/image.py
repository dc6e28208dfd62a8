"""The lab's guest image: a Debian kernel, a busybox initramfs and an ext4 root.

Why built this way: the image must come from Debian packages on any Debian host,
with no mounts, loop devices or device-mapper (the kernel here has none of the
latter) and nothing installed on the host. So the kernel and its modules are
extracted from the kernel .deb, the initramfs is a cpio archive written in
Python around the host's static busybox, and the root filesystem is made by
debootstrap into a directory and turned into ext4 by ``mke2fs -d``.

A build takes a minute or more, so images are cached under a digest of every
input that changes them (:func:`image_digest`). A build happens in a staging
directory beside the cache and is renamed into place only once complete, so a
crash never leaves a half image; a lock file keeps two builds of one image from
racing. VMs never write the image's files: lockstep puts overlays on top.

The Debian mirror is the machine's own (from its apt sources): no host name is
written here.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import gzip
import hashlib
import ipaddress
import json
import lzma
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lockstep.errors import CommandError, ImageBuildError
from lockstep.proc import run

__all__ = [
    "BASE_PACKAGES",
    "INITRAMFS_MODULES",
    "GuestImage",
    "ImageInputs",
    "build_image",
    "debian_mirror",
    "default_cache_dir",
    "image_digest",
    "image_inputs",
    "kernel_cmdline",
]

IMAGE_FORMAT = 1
"""Bump when the recipe changes in a way the other inputs do not show (sizes, mke2fs options)."""

KERNEL_META_PACKAGE = "linux-image-amd64"
# qemu-guest-agent: lockstep sets the wall clock through it after a restore
# (its /sbin/hwclock is guest/hwclock); iputils-arping announces a moved address.
BASE_PACKAGES = ("python3", "iproute2", "iputils-ping", "iputils-arping", "qemu-guest-agent")
INITRAMFS_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "crc16",
    "crc32c_generic",
    "jbd2",
    "mbcache",
    "ext4",
)
"""Modules the initramfs loads, in this order (each after what it depends on)."""

BUSYBOX = Path("/bin/busybox")
GUEST_FILES = ("initramfs-init", "lockstep-init", "lsctl.py", "lsagent.py", "hwclock")
"""Files of ``lockstep/lab/guest`` that go into the image."""

BASE_CMDLINE = "console=ttyS0 root=/dev/vda rw quiet panic=-1"
CMDLINE_MAX = 2047  # x86 COMMAND_LINE_SIZE is 2048 with the final NUL
ROOTFS_HEADROOM = 1 << 30  # free bytes in the ext4 root for what guests write
APT_SOURCES = Path("/etc/apt")
OS_RELEASE = Path("/etc/os-release")

_KERNEL_NAME = "vmlinuz"
_INITRD_NAME = "initrd.gz"
_ROOTFS_NAME = "rootfs.qcow2"
_MANIFEST_NAME = "image.json"
_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")  # always fullmatch
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # always fullmatch


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: boot it with ``-kernel``, ``-initrd`` and an overlay on ``rootfs``."""

    kernel: Path
    initrd: Path
    rootfs: Path
    digest: str

    def cmdline(
        self, *, hostname: str, ip: str | None = None, start: str | None = None, extra: str = ""
    ) -> str:
        """The kernel command line for a guest of this image (see :func:`kernel_cmdline`).

        Raises:
            ValueError: a value cannot be passed on a kernel command line.
        """
        return kernel_cmdline(hostname=hostname, ip=ip, start=start, extra=extra)


@dataclass(frozen=True)
class ImageInputs:
    """Everything that decides what an image contains; its digest is the cache key."""

    suite: str
    mirror: str
    kernel_package: str
    kernel_version: str
    packages: tuple[str, ...]
    modules: tuple[str, ...]
    busybox_sha256: str
    guest_files: tuple[tuple[str, bytes], ...]
    format: int = IMAGE_FORMAT

    def guest_file(self, name: str) -> bytes:
        """Contents of the guest file ``name`` (one of GUEST_FILES)."""
        return dict(self.guest_files)[name]


# --- pure parts ----------------------------------------------------------------------------


def kernel_cmdline(
    *, hostname: str, ip: str | None = None, start: str | None = None, extra: str = ""
) -> str:
    """The kernel command line that ``/sbin/lockstep-init`` reads.

    ``ip`` is ``ADDR/LEN`` for eth0; ``start`` is a shell command run in the
    background at boot, passed base64-encoded so it can hold spaces and quotes;
    ``extra`` is appended as is.

    Raises:
        ValueError: the host name is not a valid one, ``ip`` is not ADDR/LEN, or
            the line would be longer than the kernel accepts.
    """
    if not _HOSTNAME.fullmatch(hostname):
        raise ValueError(f"{hostname!r} is not a valid host name (letters, digits, '-')")
    parts = [BASE_CMDLINE, f"ls.hostname={hostname}"]
    if ip is not None:
        if "/" not in ip:
            raise ValueError(f"{ip!r} needs a prefix length (for example 10.124.0.11/24)")
        try:
            ipaddress.ip_interface(ip)
        except ValueError as exc:
            raise ValueError(f"{ip!r} is not an address with prefix length") from exc
        parts.append(f"ls.ip={ip}")
    if start:
        parts.append("ls.start=" + base64.b64encode(start.encode()).decode("ascii"))
    if extra.strip():
        parts.append(" ".join(extra.split()))
    line = " ".join(parts)
    if len(line) > CMDLINE_MAX:
        raise ValueError(
            f"the kernel command line for {hostname} is {len(line)} bytes, over the "
            f"kernel's {CMDLINE_MAX}; shorten the start command (put a script in the image)"
        )
    return line


def debian_mirror(sources_texts: Mapping[str, str], suite: str) -> str:
    """The first Debian archive URI that serves ``suite`` with component ``main``.

    ``sources_texts`` maps each apt sources file name to its text, in apt's order;
    names ending in ``.sources`` are deb822, the others one-line format. Only
    ``deb`` entries count whose suites include ``suite`` itself (so not
    ``bookworm-security`` or ``bookworm-updates``), that list ``main`` and are
    not disabled. The URI is returned without a trailing slash.

    Raises:
        ImageBuildError: no such entry.
    """
    for name, text in sources_texts.items():
        entries: Iterable[_Entry]
        if name.endswith(".sources"):
            entries = map(_deb822_entry, deb822_stanzas(text))
        else:
            entries = _one_line_entries(text)
        for uris, suites, components in entries:
            if suite in suites and "main" in components:
                for uri in uris:
                    if uri.split(":", 1)[0] in ("http", "https", "file", "ftp"):
                        return uri.rstrip("/")
    searched = ", ".join(sources_texts) or "no files"
    raise ImageBuildError(
        f"no Debian mirror for {suite}/main in the apt sources ({searched}); "
        f"add a 'deb URI {suite} main' entry"
    )


_Entry = tuple[list[str], list[str], list[str]]  # URIs, suites, components


def _one_line_entries(text: str) -> Iterator[_Entry]:
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split(None, 1)
        if len(words) != 2 or words[0] != "deb":
            continue
        rest = words[1].strip()
        if rest.startswith("["):  # options: [arch=amd64 signed-by=...]
            rest = rest.partition("]")[2]
        fields = rest.split()
        if len(fields) >= 3:
            yield [fields[0]], [fields[1]], fields[2:]


def deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    """The stanzas of a deb822 text (apt .sources, ``apt-cache show``), keys lower-cased.

    Comment lines are skipped; continuation lines are joined with a newline.
    """
    stanza: dict[str, str] = {}
    key = ""
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if stanza:
                yield stanza
            stanza, key = {}, ""
        elif raw[0] in " \t" and key:
            stanza[key] += "\n" + raw.strip()
        elif ":" in raw:
            key, value = raw.split(":", 1)
            key = key.strip().lower()
            stanza[key] = value.strip()


def _deb822_entry(stanza: Mapping[str, str]) -> _Entry:
    if stanza.get("enabled", "yes").lower() == "no" or "deb" not in stanza.get("types", "").split():
        return [], [], []
    return (
        stanza.get("uris", "").split(),
        stanza.get("suites", "").split(),
        stanza.get("components", "").split(),
    )


def os_codename(os_release: str) -> str:
    """The release code name (``bookworm``) from the text of /etc/os-release.

    Raises:
        ImageBuildError: the text names no code name.
    """
    for line in os_release.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "VERSION_CODENAME" and value.strip().strip("\"'"):
            return value.strip().strip("\"'")
    raise ImageBuildError("/etc/os-release has no VERSION_CODENAME: is this a Debian release?")


def kernel_dependency(control: str) -> tuple[str, str | None]:
    """The kernel package (and exact version, if pinned) a kernel meta-package depends on.

    ``control`` is the package's stanza as ``apt-cache show`` prints it.

    Raises:
        ImageBuildError: the stanza names no linux-image dependency.
    """
    depends = next(deb822_stanzas(control), {}).get("depends", "")
    for alternatives in depends.split(","):
        first = alternatives.split("|")[0].strip()
        match = re.match(r"^(linux-image-[^\s(]+)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?", first)
        if match:
            return match.group(1), match.group(2)
    raise ImageBuildError(f"{KERNEL_META_PACKAGE} depends on no linux-image package ({depends!r})")


def image_digest(inputs: ImageInputs) -> str:
    """SHA-256 (hex) over every input of the image, in a canonical form."""
    canonical = {
        "format": inputs.format,
        "suite": inputs.suite,
        "mirror": inputs.mirror,
        "kernel": [inputs.kernel_package, inputs.kernel_version],
        "packages": sorted(inputs.packages),
        "modules": list(inputs.modules),
        "busybox": inputs.busybox_sha256,
        "guest_files": {
            name: hashlib.sha256(content).hexdigest() for name, content in inputs.guest_files
        },
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def package_list(extra_packages: Iterable[str]) -> tuple[str, ...]:
    """The sorted, de-duplicated packages for debootstrap's --include.

    Raises:
        ImageBuildError: a name is not a Debian package name.
    """
    extras = [p.strip() for p in extra_packages]
    bad = [p for p in extras if not _PACKAGE_NAME.fullmatch(p)]
    if bad:
        raise ImageBuildError(f"not Debian package names: {', '.join(map(repr, bad))}")
    return tuple(sorted({*BASE_PACKAGES, *extras}))


@dataclass(frozen=True)
class _CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: Sequence[_CpioEntry]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks, owned by root, time 0."""
    out = bytearray()

    def add(ino: int, entry: _CpioEntry) -> None:
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, *entry.rdev, len(name))
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + b"00000000")
        out.extend(name)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(entry.data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate(entries, start=1):
        add(ino, entry)
    add(0, _CpioEntry("TRAILER!!!", 0))
    return bytes(out)


def initramfs_entries(
    init: bytes, busybox: bytes, modules: Sequence[tuple[str, bytes]]
) -> list[_CpioEntry]:
    """The initramfs tree: busybox, /init, the modules and their load order."""
    directory, executable, regular = (
        stat.S_IFDIR | 0o755,
        stat.S_IFREG | 0o755,
        stat.S_IFREG | 0o644,
    )
    entries = [_CpioEntry(d, directory) for d in ("bin", "dev", "proc", "sys", "newroot", "lib")]
    entries += [
        _CpioEntry("lib/modules", directory),
        _CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _CpioEntry("bin/busybox", executable, busybox),
        _CpioEntry("init", executable, init),
        _CpioEntry("lib/modules/order", regular, "".join(f"{n}\n" for n, _ in modules).encode()),
    ]
    entries += [_CpioEntry(f"lib/modules/{n}.ko", regular, data) for n, data in modules]
    return entries


def module_depends(module: bytes) -> list[str]:
    """Names in a kernel module's ``depends=`` modinfo entry."""
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", module)
    if not match or not match.group(1):
        return []
    return [name.decode().replace("-", "_") for name in match.group(1).split(b",")]


# --- I/O edges -----------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where images are cached: ``$LOCKSTEP_CACHE/images``, else /var/cache/lockstep/images."""
    return Path(os.environ.get("LOCKSTEP_CACHE") or "/var/cache/lockstep") / "images"


def read_apt_sources(etc_apt: Path = APT_SOURCES) -> dict[str, str]:
    """The machine's apt sources files (name -> text), in the order apt reads them.

    Raises:
        ImageBuildError: a sources file exists but cannot be read.
    """
    paths = [etc_apt / "sources.list"]
    parts = etc_apt / "sources.list.d"
    texts: dict[str, str] = {}
    try:
        if parts.is_dir():
            paths += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                texts[str(path)] = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ImageBuildError(f"cannot read the apt sources in {etc_apt}: {exc}") from exc
    return texts


def _apt_show(package: str) -> str:
    try:
        return run(["apt-cache", "show", "--no-all-versions", package], timeout=60).text
    except CommandError as exc:
        raise ImageBuildError(
            f"apt knows no package {package}: run `apt-get update` ({exc})"
        ) from exc


def resolve_kernel() -> tuple[str, str]:
    """The kernel package the kernel meta-package resolves to, and its version.

    Raises:
        ImageBuildError: apt cannot tell.
    """
    package, version = kernel_dependency(_apt_show(KERNEL_META_PACKAGE))
    if version is None:
        version = next(deb822_stanzas(_apt_show(package)), {}).get("version")
        if not version:
            raise ImageBuildError(f"apt shows no version of {package}")
    return package, version


def _read_busybox() -> bytes:
    try:
        return BUSYBOX.read_bytes()
    except OSError as exc:
        raise ImageBuildError(
            f"cannot read {BUSYBOX}: {exc.strerror} (install busybox-static)"
        ) from exc


def _read_guest_file(name: str) -> bytes:
    try:
        return resources.files("lockstep.lab").joinpath("guest", name).read_bytes()
    except OSError as exc:
        raise ImageBuildError(
            f"lockstep's guest file {name} cannot be read ({exc.strerror}): reinstall lockstep"
        ) from exc


def image_inputs(extra_packages: Sequence[str] = ()) -> ImageInputs:
    """Gather the inputs of the image for this machine (reads apt's view and local files).

    Raises:
        ImageBuildError: a package name is invalid, the release or mirror cannot
            be found, apt does not know the kernel, or busybox is missing.
    """
    packages = package_list(extra_packages)
    try:
        suite = os_codename(OS_RELEASE.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ImageBuildError(f"cannot read {OS_RELEASE}: {exc.strerror}") from exc
    busybox = _read_busybox()
    mirror = debian_mirror(read_apt_sources(), suite)
    kernel_package, kernel_version = resolve_kernel()
    return ImageInputs(
        suite=suite,
        mirror=mirror,
        kernel_package=kernel_package,
        kernel_version=kernel_version,
        packages=packages,
        modules=INITRAMFS_MODULES,
        busybox_sha256=hashlib.sha256(busybox).hexdigest(),
        guest_files=tuple((name, _read_guest_file(name)) for name in GUEST_FILES),
    )


def _image_at(directory: Path, digest: str) -> GuestImage | None:
    """The complete image in ``directory``, or None."""
    image = GuestImage(
        kernel=directory / _KERNEL_NAME,
        initrd=directory / _INITRD_NAME,
        rootfs=directory / _ROOTFS_NAME,
        digest=digest,
    )
    try:
        manifest = json.loads((directory / _MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = (image.kernel, image.initrd, image.rootfs)
    if manifest.get("digest") != digest or not all(f.is_file() for f in files):
        return None
    return image


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_image(
    extra_packages: Sequence[str] = (),
    *,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> GuestImage:
    """The guest image with ``extra_packages``, from the cache or built now.

    Images live in ``cache_dir/<digest[:16]>/`` (default :func:`default_cache_dir`).
    ``progress`` gets one line per build step.

    Raises:
        ImageBuildError: an input cannot be found, or a build step failed (the
            message names the step; nothing is left in the cache).
    """
    say = progress or (lambda _line: None)
    inputs = image_inputs(extra_packages)
    digest = image_digest(inputs)
    cache = (cache_dir or default_cache_dir()).absolute()
    final = cache / digest[:16]
    image = _image_at(final, digest)
    if image is not None:
        return image
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(cache / f".{digest[:16]}.lock"):
            image = _image_at(final, digest)  # another process may have built it meanwhile
            if image is not None:
                return image
            _remove_stale(cache, digest[:16])
            say(f"building guest image {digest[:16]} in {cache}")
            staging = Path(tempfile.mkdtemp(prefix=f".build-{digest[:16]}-", dir=cache))
            try:
                _build_into(staging, inputs, digest, cache, say)
                staging.chmod(0o755)  # mkdtemp made it private
                if final.exists():  # an incomplete image of an older lockstep
                    shutil.rmtree(final)
                os.rename(staging, final)
                _fsync_dir(cache)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise ImageBuildError(f"cannot build the guest image in {cache}: {exc}") from exc
    say(f"guest image ready: {final}")
    image = _image_at(final, digest)
    if image is None:
        raise ImageBuildError(f"the guest image in {final} is incomplete right after its build")
    return image


def _remove_stale(cache: Path, digest16: str) -> None:
    """Remove what crashed builds of this image left (we hold its lock, so none is running)."""
    for leftover in cache.glob(f".*-{digest16}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step(what: str) -> Callable[[CommandError], ImageBuildError]:
    def wrap(exc: CommandError) -> ImageBuildError:
        return ImageBuildError(f"building the guest image: {what} failed: {exc}")

    return wrap


def _build_into(
    staging: Path, inputs: ImageInputs, digest: str, cache: Path, say: Callable[[str], None]
) -> None:
    """Build every file of the image into ``staging`` (work files go to a sibling dir)."""
    work = Path(tempfile.mkdtemp(prefix=f".work-{digest[:16]}-", dir=cache))
    try:
        kernel_tree = work / "kernel"
        _fetch_kernel(inputs, work, kernel_tree, say)
        vmlinuz = _find_vmlinuz(kernel_tree)
        shutil.copyfile(vmlinuz, staging / _KERNEL_NAME)
        release = vmlinuz.name.removeprefix("vmlinuz-")

        modules = _collect_modules(kernel_tree, release, inputs.modules)
        say(f"writing the initramfs (busybox, {len(modules)} modules)")
        busybox = _read_busybox()
        if hashlib.sha256(busybox).hexdigest() != inputs.busybox_sha256:
            raise ImageBuildError(f"{BUSYBOX} changed while the guest image was being built")
        init = inputs.guest_file("initramfs-init")
        archive = cpio_newc(initramfs_entries(init, busybox, modules))
        (staging / _INITRD_NAME).write_bytes(gzip.compress(archive, mtime=0))
        shutil.rmtree(kernel_tree)

        root = work / "root"
        _debootstrap(inputs, root, cache / ".debs", say)
        _install_guest_files(inputs, root)
        raw = work / "rootfs.raw"
        size = _rootfs_size(root)
        say(f"making the ext4 root ({size >> 20} MiB, sparse)")
        try:
            # Inode tables and journal zeroed now (cheap: the file is sparse), so
            # guests do not spend their first minutes zeroing them in the background.
            options = "lazy_itable_init=0,lazy_journal_init=0"
            argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-d", str(root)]
            run([*argv, "-E", options, str(raw), f"{size >> 10}k"], timeout=1800)
        except CommandError as exc:
            raise _step("mke2fs -d")(exc) from exc
        shutil.rmtree(root)
        say("converting the root to qcow2")
        try:
            argv = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]
            run([*argv, str(raw), str(staging / _ROOTFS_NAME)], timeout=1800)
        except CommandError as exc:
            raise _step("qemu-img convert")(exc) from exc
        (staging / _ROOTFS_NAME).chmod(0o444)
        _write_manifest(staging, inputs, digest, release)
        for name in (_KERNEL_NAME, _INITRD_NAME, _ROOTFS_NAME, _MANIFEST_NAME):
            with (staging / name).open("rb") as f:
                os.fsync(f.fileno())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fetch_kernel(inputs: ImageInputs, work: Path, tree: Path, say: Callable[[str], None]) -> None:
    package = f"{inputs.kernel_package}={inputs.kernel_version}"
    say(f"downloading {inputs.kernel_package} {inputs.kernel_version}")
    download = work / "deb"
    download.mkdir()
    try:
        # Root's apt would drop to the _apt user, who cannot write our work dir.
        argv = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", package]
        run(argv, cwd=str(download), timeout=1800)
    except CommandError as exc:
        raise ImageBuildError(
            f"building the guest image: cannot download {package} "
            f"(run `apt-get update` if apt's lists are old): {exc}"
        ) from exc
    debs = list(download.glob("*.deb"))
    if len(debs) != 1:
        raise ImageBuildError(f"apt-get download {package} left {len(debs)} .deb files")
    try:
        run(["dpkg-deb", "-x", str(debs[0]), str(tree)], timeout=600)
    except CommandError as exc:
        raise _step(f"unpacking {debs[0].name}")(exc) from exc


def _find_vmlinuz(tree: Path) -> Path:
    found = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise ImageBuildError(f"the kernel package has {len(found)} /boot/vmlinuz-* files, not 1")
    return found[0]


def _collect_modules(tree: Path, release: str, names: Sequence[str]) -> list[tuple[str, bytes]]:
    """Each wanted module's (name, uncompressed .ko), skipping those built into the kernel.

    Raises:
        ImageBuildError: a module is missing, compressed in an unknown way, or
            listed before a module it depends on.
    """
    candidates = (tree / "lib/modules" / release, tree / "usr/lib/modules" / release)
    base = next((d for d in candidates if d.is_dir()), None)
    if base is None:
        raise ImageBuildError(f"the kernel package has no modules directory for {release}")
    files: dict[str, Path] = {}
    for path in (base / "kernel").rglob("*.ko*"):
        stem = path.name.split(".ko", 1)[0].replace("-", "_")
        files.setdefault(stem, path)
    builtin: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        for line in (base / "modules.builtin").read_text().splitlines():
            builtin.add(Path(line).name.split(".ko", 1)[0].replace("-", "_"))
    loaded: set[str] = set(builtin)
    modules: list[tuple[str, bytes]] = []
    for name in names:
        if name in builtin:
            continue
        found = files.get(name)
        if found is None:
            raise ImageBuildError(f"kernel {release} has no module {name} (built in or not)")
        data = _uncompressed_module(found)
        missing = [d for d in module_depends(data) if d not in loaded]
        if missing:
            raise ImageBuildError(
                f"module {name} of kernel {release} needs {', '.join(missing)} loaded first; "
                "update INITRAMFS_MODULES"
            )
        loaded.add(name)
        modules.append((name, data))
    return modules


def _uncompressed_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(data)
        if path.name.endswith(".ko.gz"):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise ImageBuildError(f"cannot decompress kernel module {path.name}: {exc}") from exc
    raise ImageBuildError(f"kernel module {path.name} is compressed in a way lockstep cannot read")


def _debootstrap(inputs: ImageInputs, root: Path, debs: Path, say: Callable[[str], None]) -> None:
    include = ",".join(inputs.packages)
    say(f"debootstrap {inputs.suite} (minbase + {include}) from {inputs.mirror}: a minute or more")
    debs.mkdir(parents=True, exist_ok=True)
    options = ["--variant=minbase", f"--include={include}", f"--cache-dir={debs}"]
    argv = ["debootstrap", *options, inputs.suite, str(root), inputs.mirror]
    try:
        run(argv, timeout=3600)
    except CommandError as exc:
        log = root / "debootstrap" / "debootstrap.log"
        tail = ""
        with contextlib.suppress(OSError):
            tail = " | log: " + " / ".join(log.read_text(errors="replace").splitlines()[-5:])
        raise ImageBuildError(f"building the guest image: debootstrap failed: {exc}{tail}") from exc
    # Package lists and downloaded .debs are dead weight in a guest without a network.
    for leftover in (root / "var/lib/apt/lists", root / "var/cache/apt/archives"):
        for path in leftover.glob("*"):
            if path.is_file():
                path.unlink()


def _install_guest_files(inputs: ImageInputs, root: Path) -> None:
    for name in ("lockstep-init", "hwclock"):  # PID 1; qemu-ga's hwclock (see guest/hwclock)
        command = root / "sbin" / name
        command.unlink(missing_ok=True)
        command.write_bytes(inputs.guest_file(name))
        command.chmod(0o755)
    for name in ("lsctl.py", "lsagent.py"):  # the control agent, the cluster agent
        agent = root / "usr/lib/lockstep" / name
        agent.parent.mkdir(parents=True, exist_ok=True)
        agent.write_bytes(inputs.guest_file(name))
        agent.chmod(0o644)


def _rootfs_size(root: Path) -> int:
    """Bytes for the ext4 root: the tree, ext4's overhead, and headroom; a multiple of 64 MiB."""
    used = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            used += (st.st_size + 4095) // 4096 * 4096 + 256  # data blocks + inode
    size = used * 5 // 4 + ROOTFS_HEADROOM
    step = 64 << 20
    return (size + step - 1) // step * step


def _write_manifest(staging: Path, inputs: ImageInputs, digest: str, release: str) -> None:
    manifest = {
        "digest": digest,
        "format": inputs.format,
        "suite": inputs.suite,
        "mirror": inputs.mirror,
        "kernel_package": inputs.kernel_package,
        "kernel_version": inputs.kernel_version,
        "kernel_release": release,
        "packages": list(inputs.packages),
        "modules": list(inputs.modules),
    }
    (staging / _MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
