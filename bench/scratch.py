"""Where a benchmark lab keeps its data: the machine's own disk, or a reflink-capable xfs.

The fast memory path keeps a running VM's RAM image by reflink where the
filesystem has them (xfs, btrfs) and by a copy elsewhere (ext4). This machine's
``/`` is ext4, so ``reflink_fs`` makes an xfs filesystem on a loop device (with
direct I/O, so the page cache holds each byte once) and points the lab's state
directory (``$LOCKSTEP_STATE``) at it for the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lockstep.lab.ledger import STATE_ENV
from lockstep.proc import run, which

__all__ = ["drop_caches", "lab_state_dir", "reflink_fs"]


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache (root only), so reads hit the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@contextlib.contextmanager
def reflink_fs(size_gib: int, parent: Path) -> Iterator[Path]:
    """An xfs filesystem with reflink, on a sparse loop image under ``parent``; gone after.

    Raises:
        RuntimeError: mkfs.xfs is not installed (``apt-get install xfsprogs``).
    """
    if which("mkfs.xfs") is None:
        raise RuntimeError("mkfs.xfs is not installed: apt-get install xfsprogs, or use --fs ext4")
    work = Path(tempfile.mkdtemp(prefix="lockstep-bench-xfs-", dir=parent))
    image, mnt = work / "xfs.img", work / "mnt"
    mnt.mkdir()
    with image.open("wb") as f:
        f.truncate(size_gib << 30)
    device = ""
    try:
        run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)])
        device = run(["losetup", "--direct-io=on", "--find", "--show", str(image)]).text.strip()
        run(["mount", "-o", "discard", device, str(mnt)])
        yield mnt
    finally:
        if os.path.ismount(mnt):
            run(["umount", str(mnt)])
        if device:
            run(["losetup", "-d", device])
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def lab_state_dir(path: Path) -> Iterator[None]:
    """Make labs started by this process keep ledger and data under ``path``."""
    before = os.environ.get(STATE_ENV)
    os.environ[STATE_ENV] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(STATE_ENV, None)
        else:
            os.environ[STATE_ENV] = before
