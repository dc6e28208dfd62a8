"""Guest RAM: the fast and the standard memory path, and the life of a RAM image.

A VM's memory is saved and restored one of two ways (``VmSpec.memory_path``;
docs/memory.md has the measurements):

standard
    Guest RAM is anonymous memory (plain ``-m``). A save streams all of it
    through QMP ``migrate`` into the state's ``<vm>.mem``; a restore reads all
    of it back (``-incoming defer`` + ``migrate-incoming``). Both take as long
    as the disk needs for the guest's RAM.
fast
    Guest RAM is a file: ``memory-backend-file,share=on`` on the VM's own RAM
    file (``run/<vm>/guest.ram``, on the filesystem of the state store). A save
    sets the migration capability ``x-ignore-shared``, so ``<vm>.mem`` holds
    only device state (about 0.4 MB, written in about 10 ms), and the state
    keeps a RAM image, ``<vm>.ram``, made from the RAM file while the VM is
    paused. A restore maps that image instead of reading it: a page comes from
    disk (or the page cache) when the guest first touches it.
auto (the default)
    fast wherever it works, standard elsewhere; the per-VM report says why.

The RAM image of a save, made while the VM is paused (it counts as downtime):

- ``save --stop``: the VM never runs again, so its RAM file is hard-linked into
  the state; no byte is copied. This leans on the rule that already protects
  the state's disk layer, which such a VM also keeps writing to if resumed: a VM
  saved with ``--stop`` is never resumed once its state is committed (an abort
  before the commit drops the staging state, and the link with it).
- the VM runs on: the image must not change when the guest writes again, so it
  is a reflink (``FICLONE``) of the RAM file where the filesystem has them (xfs,
  btrfs). The kernel first writes back the RAM file's dirty pages (which it does
  within ~30 s of any write anyway), then every block is shared copy-on-write;
  the guest's later writes go to new blocks. Elsewhere (ext4) it is a copy of
  the file's data ranges (holes stay holes), at page-cache speed. The report
  says which, with the bytes and time.

A restore (the image is never written by anyone):

- the state's image is reflinked to the VM's own RAM file, mapped shared:
  nothing is read or copied, and the VM keeps the fast path for its next save;
- without reflink, ``auto`` maps the state's image privately (``share=off``):
  nothing is read or copied either, but the guest's writes land in anonymous
  copy-on-write pages of the QEMU process, in no file. QEMU cannot move a
  running VM's RAM to another backend, so that VM's next save takes the
  standard path (all RAM streamed; the report says why), and a VM restored
  from that standard state has a RAM file of its own again;
- without reflink, ``fast`` copies the image to the VM's own RAM file instead
  (restore pays the copy, stated in the report) so the VM stays fast;
- a state saved by the standard path is read in full; a VM that may use the
  fast path loads it into a fresh RAM file of its own, so its next save is fast.

Fallbacks: ``auto`` takes the standard path, and ``fast`` fails with the same
reason, when ``extra_args`` set up guest memory themselves, when QEMU lacks
``x-ignore-shared``, or when the VM's RAM is not a shared file of its own
(private mapping after a restore without reflink; a VM started by an older
execd).

Memory pressure: a shared RAM file lives in the page cache, so the kernel can
write it back and evict it; guests whose RAM adds up to more than the host's
still run (slowly, paging to disk). Anonymous RAM (standard) and the private
copy-on-write pages of a privately mapped image cannot leave RAM without swap.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lockstep.errors import ConfigError, VmError
from lockstep.group import VmSpec
from lockstep.vm.argv import RamFile

__all__ = [
    "ImageKept",
    "RestoreRam",
    "SavePlan",
    "boot_ram",
    "discard_ram_file",
    "keep_ram_image",
    "memory_conflict",
    "plan_save",
    "reflink",
    "restore_ram",
    "sparse_copy",
]

# ioctl(dest_fd, FICLONE, src_fd): _IOW(0x94, 9, int)
_FICLONE = 0x40049409
# What a filesystem (or a pair of them) answers when it cannot clone.
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}
_COPY_CHUNK = 1 << 30

# QEMU options that set up guest memory themselves; lockstep's RAM file would clash.
_MEMORY_OPTIONS = ("-m", "-mem-path", "-mem-prealloc", "-numa")
_MEMORY_WORDS = ("memory-backend",)


def _size(n: int) -> str:
    """Bytes for a person: MiB under a GiB, GiB with two decimals above."""
    if n < 1 << 30:
        return f"{n / (1 << 20):.0f} MiB"
    return f"{n / (1 << 30):.2f} GiB"


def memory_conflict(spec: VmSpec) -> str | None:
    """The first of ``spec.extra_args`` that sets up guest memory itself, if any."""
    for arg in spec.extra_args:
        if arg in _MEMORY_OPTIONS or any(w in arg for w in _MEMORY_WORDS):
            return f"its extra_args set up guest memory themselves ({arg!r})"
    return None


def discard_ram_file(path: Path) -> None:
    """Remove a VM's RAM file without waiting for it to go.

    Freeing GiBs of page cache and extents takes a while, and a restore
    replacing several VMs must not wait for it: the file is renamed out of the
    way at once and unlinked by a background thread (one left by a crash goes
    with the next).
    """
    try:
        os.rename(path, path.with_name(f".{path.name}.{secrets.token_hex(4)}.gone"))
    except FileNotFoundError:
        pass
    except OSError:
        path.unlink(missing_ok=True)
    doomed = list(path.parent.glob(f".{path.name}.*.gone"))
    if doomed:
        threading.Thread(
            target=_unlink_all, args=(doomed,), name="discard RAM", daemon=True
        ).start()


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):  # the folder went, or a permission changed
            path.unlink(missing_ok=True)


def boot_ram(spec: VmSpec, own: Path) -> tuple[RamFile | None, str]:
    """How a VM booted from scratch keeps its RAM, and why not in a file if it cannot.

    Returns the RAM file (None: anonymous memory) and the reason a later save
    will take the standard path ("" when it can be fast or standard was asked).
    A stale RAM file at ``own`` (left by a crash) is removed.

    Raises:
        ConfigError: ``memory_path`` is "fast" but the VM cannot have a RAM file.
    """
    if spec.memory_path == "standard":
        return None, ""
    conflict = memory_conflict(spec)
    if conflict is not None:
        if spec.memory_path == "fast":
            raise ConfigError(f'VM {spec.name}: memory_path is "fast" but {conflict}')
        return None, conflict
    discard_ram_file(own)
    return RamFile(own, shared=True), ""


@dataclass(frozen=True)
class SavePlan:
    """How one VM's memory is saved: fast or not, and why not when fast was wanted."""

    fast: bool
    reason: str = ""


def plan_save(
    spec: VmSpec, ram: RamFile | None, note: str, *, qemu_ignores_shared: bool
) -> SavePlan:
    """Choose the memory path of a save (pure).

    ``ram`` is how the VM's RAM is kept now, ``note`` why it has no RAM file of
    its own (from boot or restore), ``qemu_ignores_shared`` whether its QEMU
    offers ``x-ignore-shared``.

    Raises:
        VmError: ``memory_path`` is "fast" but the fast path cannot be used.
    """
    if spec.memory_path == "standard":
        return SavePlan(fast=False)
    why = None
    if ram is None:
        why = note or "it runs on anonymous memory (started without a RAM file; restart it)"
    elif not ram.shared:
        why = note or "its RAM is a private copy-on-write mapping of a state's RAM image"
    elif not qemu_ignores_shared:
        why = "its QEMU lacks the migration capability x-ignore-shared"
    if why is None:
        return SavePlan(fast=True)
    if spec.memory_path == "fast":
        raise VmError(f'VM {spec.name}: memory_path is "fast" but {why}')
    return SavePlan(fast=False, reason=why)


@dataclass(frozen=True)
class ImageKept:
    """How a save kept the RAM image: the method, the bytes it moved, its time."""

    method: Literal["link", "reflink", "copy"]
    copied: int
    seconds: float

    def describe(self) -> str:
        """One line for the per-VM report."""
        ms = self.seconds * 1000
        if self.method == "link":
            return f"RAM file linked into the state in {ms:.1f} ms (the VM stops)"
        if self.method == "reflink":
            return f"RAM image reflinked in {ms:.1f} ms"
        return (
            f"RAM image copied (no reflink on this filesystem): {_size(self.copied)} in {ms:.0f} ms"
        )


def reflink(src: Path, dst: Path) -> bool:
    """Make ``dst`` (new) a copy-on-write clone of ``src``; False if the filesystem cannot.

    Raises:
        OSError: ``dst`` exists, or another I/O error than "cannot clone here".
    """
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dfd, _FICLONE, sfd)
        except OSError as exc:
            os.close(dfd)
            dst.unlink(missing_ok=True)
            if exc.errno in _NO_REFLINK:
                return False
            raise
        os.close(dfd)
        return True
    finally:
        os.close(sfd)


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data in a file; all of it if holes cannot be found."""
    ranges = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to the end
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, end - start))
            pos = end
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, size)]
    return ranges


def sparse_copy(src: Path, dst: Path) -> int:
    """Copy ``src`` to ``dst`` (new), its data ranges only, so holes stay holes.

    Returns the bytes copied.

    Raises:
        OSError: ``dst`` exists, or the copy failed (``dst`` is then removed).
    """
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(sfd).st_size
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            copied = 0
            for start, length in _data_ranges(sfd, size):
                done = 0
                while done < length:
                    n = os.copy_file_range(
                        sfd, dfd, min(length - done, _COPY_CHUNK), start + done, start + done
                    )
                    if n == 0:  # the file shrank under us
                        break
                    done += n
                copied += done
            os.ftruncate(dfd, size)
        except BaseException:
            os.close(dfd)
            dst.unlink(missing_ok=True)
            raise
        os.close(dfd)
        return copied
    finally:
        os.close(sfd)


def keep_ram_image(ram: Path, image: Path, *, link: bool) -> ImageKept:
    """Make the state's RAM image ``image`` from a paused VM's RAM file ``ram`` (blocking).

    ``link`` (the VM is stopped after the save): a hard link. Otherwise, or
    when the two are on different filesystems, a reflink where the filesystem
    has them, else a sparse copy.

    Raises:
        VmError: the image could not be made (disk full, no such RAM file...).
    """
    started = time.monotonic()
    try:
        if link:
            try:
                os.link(ram, image)
                return ImageKept("link", 0, time.monotonic() - started)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
        if reflink(ram, image):
            return ImageKept("reflink", 0, time.monotonic() - started)
        copied = sparse_copy(ram, image)
        return ImageKept("copy", copied, time.monotonic() - started)
    except OSError as exc:
        raise VmError(
            f"cannot keep the RAM image of {ram} as {image}: {exc.strerror or exc}"
        ) from exc


@dataclass(frozen=True)
class RestoreRam:
    """How a restored VM gets its RAM back.

    ``ram``: the VM's RAM (None: anonymous memory); ``fast``: the state holds a RAM
    image and its migration stream only device state (load with
    ``x-ignore-shared``); ``note``: for the report, how the RAM came back or why
    it was read in full; ``later``: why the VM's next save will take the standard
    path ("" when it can be fast).
    """

    ram: RamFile | None
    fast: bool
    note: str
    later: str = ""


def restore_ram(spec: VmSpec, image: Path | None, own: Path, *, state: str) -> RestoreRam:
    """Prepare the RAM of a VM restored from ``state`` (blocking: may reflink or copy).

    ``image`` is the state's RAM image (None: a standard state), ``own`` the
    path of the VM's own RAM file (any stale one is removed first).

    Raises:
        VmError: the RAM image could not be reflinked or copied.
    """
    discard_ram_file(own)
    if image is None:
        if spec.memory_path == "standard":
            return RestoreRam(None, fast=False, note="")
        conflict = memory_conflict(spec)
        if conflict is not None:
            return RestoreRam(None, fast=False, note=conflict, later=conflict)
        return RestoreRam(
            RamFile(own, shared=True),
            fast=False,
            note=f"state {state!r} was saved by the standard path; its memory was read in full",
        )
    started = time.monotonic()
    try:
        if reflink(image, own):
            ms = (time.monotonic() - started) * 1000
            return RestoreRam(
                RamFile(own, shared=True), fast=True, note=f"RAM image reflinked in {ms:.1f} ms"
            )
        if spec.memory_path == "fast":
            copied = sparse_copy(image, own)
            return RestoreRam(
                RamFile(own, shared=True),
                fast=True,
                note=(
                    f"RAM image copied (no reflink on this filesystem): {_size(copied)}"
                    f" in {(time.monotonic() - started) * 1000:.0f} ms"
                ),
            )
    except OSError as exc:
        raise VmError(
            f"VM {spec.name}: cannot make its RAM file {own} from state {state!r}:"
            f" {exc.strerror or exc}"
        ) from exc
    return RestoreRam(
        RamFile(image, shared=False),
        fast=True,
        note="RAM image mapped privately (no reflink on this filesystem)",
        later=(
            f"its RAM is a private copy-on-write mapping of the RAM image of state {state!r}"
            " (no reflink on this filesystem, and QEMU cannot move a running VM's RAM to a file)"
        ),
    )
