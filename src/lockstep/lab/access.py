"""The way into a running lab's guests, by lab and VM name: run a command, follow the console.

``lockstep lab exec`` runs a command through the guest's control channel
(:class:`~lockstep.lab.guestctl.GuestControl`: its second serial port, never
its NICs, which belong to the experiment). ``lockstep lab console`` follows the
guest's serial console as ``tail -F`` does: the log QEMU appends to
(:attr:`lockstep.vm.argv.VmPaths.console`), which lives on across restores and
QEMU restarts. The console is output only; commands go through ``exec``.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lockstep.errors import LabError
from lockstep.lab.guestctl import GuestControl
from lockstep.lab.lab import lab_data_dir, vm_run_dir
from lockstep.lab.verify import VmInfo, console_log_path, lab_vms
from lockstep.vm.argv import VmPaths

__all__ = ["LabGuest", "command_line", "find_guest", "follow", "tail_start"]

_CHUNK = 1 << 16
_TAIL_WINDOW = 1 << 16  # bytes read at a time, backwards, to find the last lines


@dataclass(frozen=True)
class LabGuest:
    """One guest of a running lab: where its console log and control channel are."""

    lab: str
    vm: VmInfo
    data: Path

    @property
    def console(self) -> Path:
        """The serial console log QEMU appends to."""
        return console_log_path(self.data, self.vm.host, self.vm.name)

    def control(self) -> GuestControl:
        """A client of the guest's control agent (one at a time per guest)."""
        return GuestControl(VmPaths(vm_run_dir(self.data, self.vm.host, self.vm.name)).channel)

    def lab_is_up(self) -> bool:
        """Whether the lab is still there (``lab down`` removes its data)."""
        return (self.data / "lab.json").exists()

    async def run(self, command: str, timeout: float) -> tuple[int, str]:
        """Run ``command`` with /bin/sh in the guest; its exit status and output.

        Raises:
            LabError: the channel could not be reached or the guest did not answer.
        """
        async with self.control() as ctl:
            return await ctl.run(command, timeout=timeout)


def find_guest(lab: str, vm: str) -> LabGuest:
    """Guest ``vm`` of the running lab ``lab``.

    Raises:
        LabError: there is no such lab, or it has no such VM (its VMs are named).
    """
    data = lab_data_dir(lab)
    if not (data / "lab.json").exists():
        raise LabError(f"there is no lab named {lab} (bring one up with `lockstep lab up`)")
    vms = lab_vms(data)
    for info in vms:
        if info.name == vm:
            return LabGuest(lab, info, data)
    names = ", ".join(v.name for v in vms)
    raise LabError(f"lab {lab} has no VM {vm!r} (its VMs: {names})")


def command_line(words: Sequence[str]) -> str:
    """The shell command line for ``lab exec``'s words.

    One word is a command line as it is (pipes, ``;`` and ``$VAR`` work, as
    with ssh); several are one word each, quoted for the shell (as docker exec
    runs its argv).

    Raises:
        ValueError: no word at all.
    """
    if not words:
        raise ValueError("no command given")
    return words[0] if len(words) == 1 else shlex.join(words)


def tail_start(path: Path, lines: int) -> int:
    """The offset where the last ``lines`` lines of ``path`` begin (0 if it has fewer).

    A last line without its newline counts as a line, as ``tail -n`` counts it.

    Raises:
        OSError: the file cannot be read.
    """
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        if lines <= 0:
            return size
        end = size
        wanted = lines  # newlines to pass, from the end: the one before the first line kept
        if size and _byte_at(f, size - 1) == b"\n":
            wanted += 1  # the file's own last newline ends the last line, starts nothing
        while end > 0:
            start = max(0, end - _TAIL_WINDOW)
            f.seek(start)
            block = f.read(end - start)
            for i in range(len(block) - 1, -1, -1):
                if block[i] == 0x0A:
                    wanted -= 1
                    if wanted == 0:
                        return start + i + 1
            end = start
    return 0


def _byte_at(f: BinaryIO, offset: int) -> bytes:
    f.seek(offset)
    return f.read(1)


def follow(
    path: Path,
    *,
    start: int = 0,
    poll: float = 0.1,
    stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[bytes]:
    """Yield what ``path`` holds from offset ``start`` on, then what is appended, as ``tail -F``.

    A file that is not there yet is waited for; one replaced by a new file (a
    new inode) or truncated is read again from its start. ``stop`` is asked
    after each look that found nothing new; True ends the iteration. ``sleep``
    waits ``poll`` seconds between looks (a test passes its own).
    """
    f = None
    inode: tuple[int, int] | None = None
    pos = start
    try:
        while True:
            try:
                st = path.stat()
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) != inode:
                if f is not None:
                    f.close()
                    pos = 0  # a new file at the path: all of it is new
                f = path.open("rb")
                inode = (st.st_dev, st.st_ino)
            got = False
            if f is not None:
                if os.fstat(f.fileno()).st_size < pos:
                    pos = 0  # truncated: start over, as tail does
                f.seek(pos)
                while chunk := f.read(_CHUNK):
                    pos += len(chunk)
                    got = True
                    yield chunk
            if not got:
                if stop():
                    return
                sleep(poll)
    finally:
        if f is not None:
            f.close()
