"""lockstep's benchmark suite, one entry point (run by hand, as root; not part of `make test`).

    python -m bench                       # everything: the memory matrix, skew, streams
    python -m bench memory                # restore time and save downtime (bench/memory.py)
    python -m bench memory --vms 2,4 --memory 256M,1G --paths fast
    python -m bench skew --cycles 20      # pause/resume skew (bench/skew.py)
    python -m bench streams --cycles 20   # lost/duplicated packets (bench/streams.py)

Results go to ``--out`` (default ``build/bench``): ``memory.md`` (the table and
the goals), ``memory.json`` (every figure, per VM and per repeat, with the
machine's load), ``memory.png`` (the plot), ``skew.json`` and ``streams.json``. The memory
matrix runs on a reflink-capable xfs made on a loop device for the run
(``--fs xfs``, the default) or on the machine's own disk (``--fs ext4``: the
fast path then copies a running VM's RAM image).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench import skew, streams
from bench.common import say
from bench.memory import PATHS, environment, run_matrix
from bench.results import goals, markdown, plot, write_json
from bench.scratch import lab_state_dir, reflink_fs
from lockstep.units import parse_size


def _list(kind: type, text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    for item in items:
        if kind is int:
            int(item)
        else:
            parse_size(item)
    return items


def _paths(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [p for p in items if p not in PATHS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown path {bad[0]!r} (use {', '.join(PATHS)})")
    return items


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("what", nargs="?", choices=("all", "memory", "skew", "streams"), default="all")
    ap.add_argument("--vms", type=lambda t: _list(int, t), default=["2", "4", "8"])
    ap.add_argument("--memory", type=lambda t: _list(str, t), default=["256M", "1G", "4G"])
    ap.add_argument("--paths", type=_paths, default=list(PATHS))
    ap.add_argument("--repeat", type=int, default=3, help="restores per combination")
    ap.add_argument("--fs", choices=("xfs", "ext4"), default="xfs")
    ap.add_argument("--xfs-gib", type=int, default=72, help="size of the sparse xfs image")
    ap.add_argument(
        "--stream-rate", type=int, default=20, help="guest agents' packets/s to each peer"
    )
    ap.add_argument("--cycles", type=int, default=10, help="skew, streams: save/restore cycles")
    ap.add_argument("--offset", type=float, default=2.5, help="skew: h2's clock offset (s)")
    ap.add_argument("--out", type=Path, default=Path("build/bench"))
    return ap


@contextlib.contextmanager
def _filesystem(kind: str, gib: int) -> Iterator[None]:
    if kind == "ext4":
        yield
        return
    with reflink_fs(gib, Path("/var/tmp")) as mnt, lab_state_dir(mnt / "state"):
        yield


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so the labs and the scratch filesystem are taken down


def _default_sigterm() -> None:
    # pyroute2 opens sockets in other namespaces from a forked child. In this
    # process (gRPC threads) such a child can hang on a lock it inherited;
    # pyroute2 then ends it with SIGTERM, which the Python handler above,
    # inherited too, would never run.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run what was asked; print the tables; write the files."""
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    os.register_at_fork(after_in_child=_default_sigterm)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what in ("all", "memory"):
        with _filesystem(args.fs, args.xfs_gib):
            env = {**environment(), "fs": args.fs}
            rows = asyncio.run(
                run_matrix(
                    [int(v) for v in args.vms],
                    args.memory,
                    args.paths,
                    repeat=args.repeat,
                    stream_rate=args.stream_rate,
                )
            )
            env["load_avg_after"] = environment()["load_avg"]
        table = markdown(rows)
        verdicts = "\n".join(f"- {g}" for g in goals(rows))
        (args.out / "memory.md").write_text(f"`{command}`\n\n{table}\n{verdicts}\n")
        write_json(args.out / "memory.json", rows, env, command)
        plot(args.out / "memory.png", rows)
        print(table)
        print(verdicts)
        say(f"wrote {args.out}/memory.md, memory.json, memory.png")
    if args.what in ("all", "skew"):
        result = asyncio.run(skew.run(args.cycles, args.offset))
        (args.out / "skew.json").write_text(json.dumps(result, indent=1))
        print(skew.table(result))
    if args.what in ("all", "streams"):
        integrity = asyncio.run(streams.run(args.cycles, stop=False))
        (args.out / "streams.json").write_text(json.dumps(integrity, indent=1))
        print(streams.table(integrity))
    return 0


if __name__ == "__main__":
    sys.exit(main())
