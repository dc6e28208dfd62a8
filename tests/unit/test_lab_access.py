"""``lab exec`` and ``lab console`` without VMs: a fake lab folder, a stub agent, a growing log."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from lockstep.cli.main import main
from lockstep.errors import LabError
from lockstep.lab.access import command_line, find_guest, follow, tail_start
from lockstep.lab.ledger import STATE_ENV

LAB = "lsgt"


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short $LOCKSTEP_STATE (unix socket paths must stay under 108 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="lsg-", dir="/tmp"))
    monkeypatch.setenv(STATE_ENV, str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def fake_lab(state: Path) -> Path:
    """A lab folder as ``lab up`` leaves it, with VMs p1 (on h1) and s1 (on h2); its data dir."""
    data = state / "lab" / LAB / "data"
    for host, vm in (("h1", "p1"), ("h2", "s1")):
        (data / "hosts" / host / "root" / "run" / vm).mkdir(parents=True)
    vms = [
        {"name": "p1", "host": "h1", "role": "primary", "peer": "s1"},
        {"name": "s1", "host": "h2", "role": "standby", "peer": "p1"},
    ]
    (data / "lab.json").write_text(json.dumps({"options": {}, "vms": vms}))
    return data


@contextlib.contextmanager
def stub_agent(path: Path, rc: int, out: str) -> Iterator[list[str]]:
    """Serve a control agent on ``path`` that answers every command with ``rc``/``out``.

    Yields the list of commands it received.
    """
    received: list[str] = []
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, conn.makefile("rwb") as f:
                for line in f:
                    request = json.loads(line)
                    if request.get("ping"):
                        answer = {"id": request["id"], "pong": True}
                    else:
                        received.append(request["sh"])
                        answer = {"id": request["id"], "rc": rc, "out": out}
                    f.write(json.dumps(answer).encode() + b"\n")
                    f.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        done.set()
        thread.join(5)
        listener.close()


def test_one_word_is_a_command_line_and_several_are_quoted_words() -> None:
    """One argument reaches the shell as written; several are quoted so each stays one word."""
    assert command_line(["ip a | grep inet; echo $HOME"]) == "ip a | grep inet; echo $HOME"
    assert command_line(["echo", "a b", "$HOME"]) == "echo 'a b' '$HOME'"
    with pytest.raises(ValueError, match="no command"):
        command_line([])


@pytest.mark.parametrize(
    ("text", "lines", "expected"),
    [
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc", 2, b"b\nc"),  # a last line without newline counts
        (b"a\nb\n", 5, b"a\nb\n"),
        (b"a\nb\n", 0, b""),
        (b"", 3, b""),
        (b"x" * 100_000 + b"\n" + b"y" * 70_000 + b"\nz\n", 2, b"y" * 70_000 + b"\nz\n"),
    ],
)
def test_tail_start_finds_the_last_lines(
    tmp_path: Path, text: bytes, lines: int, expected: bytes
) -> None:
    """The offset of the last N lines is what `tail -n N` would print from, across read windows."""
    log = tmp_path / "console.log"
    log.write_bytes(text)
    assert text[tail_start(log, lines) :] == expected


def _scripted(actions: list[Callable[[], None]]) -> Callable[[float], None]:
    """A sleep that does the next action instead of waiting."""

    def sleep(_: float) -> None:
        if actions:
            actions.pop(0)()

    return sleep


def test_follow_reads_what_is_appended_after_a_missing_file_appears(tmp_path: Path) -> None:
    """A log not there yet is waited for; then everything appended is read, in order."""
    log = tmp_path / "console.log"

    def append(data: bytes) -> Callable[[], None]:
        def write() -> None:
            with log.open("ab") as f:
                f.write(data)

        return write

    actions = [lambda: None, append(b"boot\n"), append(b"ready\n"), lambda: None]
    polls = iter(range(10))
    got = b"".join(
        follow(log, stop=lambda: next(polls) >= 5 or not actions, sleep=_scripted(actions))
    )
    assert got == b"boot\nready\n"


def test_follow_starts_over_on_a_truncated_or_replaced_log(tmp_path: Path) -> None:
    """As tail -F: a truncated log is read from its start, and so is a new file at the path."""
    log = tmp_path / "console.log"
    log.write_bytes(b"old line one\nold line two\n")

    def truncate() -> None:
        log.write_bytes(b"short\n")

    def replace() -> None:
        new = tmp_path / "new.log"
        new.write_bytes(b"new file\n")
        os.replace(new, log)

    actions: list[Callable[[], None]] = [truncate, replace]
    got = b"".join(follow(log, start=4, stop=lambda: not actions, sleep=_scripted(actions)))
    assert got == b"line one\nold line two\nshort\nnew file\n"


def test_unknown_lab_and_unknown_vm_are_one_sentence_each(state: Path) -> None:
    """No lab of that name, or no VM of that name in it: the message names them (and the VMs)."""
    with pytest.raises(LabError, match=f"there is no lab named {LAB} "):
        find_guest(LAB, "p1")
    fake_lab(state)
    with pytest.raises(LabError, match=rf"lab {LAB} has no VM 'p9' \(its VMs: p1, s1\)"):
        find_guest(LAB, "p9")
    guest = find_guest(LAB, "s1")
    assert guest.console == state / "lab" / LAB / "data/hosts/h2/root/run/s1/console.log"


def test_exec_passes_the_guests_output_and_exit_status_through(state: Path) -> None:
    """`lab exec` prints the guest's output as it came and exits with the command's status."""
    data = fake_lab(state)
    channel = data / "hosts/h1/root/run/p1/channel.sock"
    with stub_agent(channel, rc=3, out="hello [bold]world[/]\n") as received:
        result = CliRunner().invoke(
            main, ["lab", "exec", "--name", LAB, "p1", "--", "echo", "a b", "-n"]
        )
        without_dashes = CliRunner().invoke(main, ["lab", "exec", "--name", LAB, "p1", "ls -l"])
    assert (result.exit_code, result.stdout) == (3, "hello [bold]world[/]\n")
    assert without_dashes.exit_code == 3
    assert received == ["echo 'a b' -n", "ls -l"]
    nothing = CliRunner().invoke(main, ["lab", "exec", "--name", LAB, "p1", "--"])
    assert nothing.exit_code == 2
    assert "no command given" in nothing.stderr


def test_exec_in_an_unknown_vm_exits_255_with_one_sentence(state: Path) -> None:
    """lockstep's own failure is told apart from the command's: status 255, one sentence."""
    fake_lab(state)
    result = CliRunner().invoke(main, ["lab", "exec", "--name", LAB, "x1", "--", "true"])
    assert result.exit_code == 255
    assert result.stdout == ""
    assert result.stderr.strip() == f"lockstep: lab {LAB} has no VM 'x1' (its VMs: p1, s1)"


def test_console_shows_the_last_lines_then_follows_until_the_lab_goes_down(state: Path) -> None:
    """`lab console` prints the last N lines, then each line as it is appended; it ends with the lab."""
    data = fake_lab(state)
    log = data / "hosts/h2/root/run/s1/console.log"
    log.write_bytes(b"one\ntwo\nthree\n")

    def guest_writes_then_lab_goes_down() -> None:
        time.sleep(0.3)
        with log.open("ab") as f:
            f.write(b"four\n")
        time.sleep(0.3)
        (data / "lab.json").unlink()

    writer = threading.Thread(target=guest_writes_then_lab_goes_down)
    writer.start()
    result = CliRunner().invoke(main, ["lab", "console", "--name", LAB, "-n", "2", "s1"])
    writer.join()
    assert result.exit_code == 0, result.output
    assert result.stdout == "two\nthree\nfour\n"
    assert f"lab {LAB} is down" in result.stderr
