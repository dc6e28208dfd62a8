"""Regenerate (or check) the gRPC code in ``lockstep.rpc.generated`` from the proto.

The proto lives at ``proto/lockstep/v1/execd.proto`` and is compiled with
``-I proto`` so the descriptor keeps its canonical name ``lockstep/v1/execd.proto``
(what any other language or a reflection client sees). protoc then writes a
package ``lockstep/v1/``, whose ``_grpc`` module imports ``lockstep.v1.execd_pb2``;
that package does not exist here, so the files are moved into
``lockstep/rpc/generated/`` and exactly two strings are rewritten (the import and
the module name the messages register under). Each rewrite must match exactly once,
so a change in protoc's output fails loudly instead of producing broken code.

Usage::

    python -m lockstep.rpc.gen           # rewrite src/lockstep/rpc/generated/
    python -m lockstep.rpc.gen --check   # exit 1 if the committed files are stale
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from lockstep.errors import ConfigError

__all__ = ["GENERATED_DIR", "PROTO_FILE", "generate", "main"]

GENERATED_DIR = Path(__file__).resolve().parent / "generated"
# src/lockstep/rpc/gen.py -> the repository root holds proto/.
_REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_FILE = Path("lockstep/v1/execd.proto")  # relative to the proto root

_INIT = '''"""Code generated from proto/lockstep/v1/execd.proto; do not edit.

Regenerate with ``python -m lockstep.rpc.gen``; ``--check`` tells if it is stale.
"""
'''

# (file, text protoc writes, text that works inside lockstep.rpc.generated)
_FIXUPS: tuple[tuple[str, str, str], ...] = (
    (
        "execd_pb2_grpc.py",
        "from lockstep.v1 import execd_pb2 as",
        "from lockstep.rpc.generated import execd_pb2 as",
    ),
    (
        "execd_pb2_grpc.py",
        "lockstep/v1/execd_pb2_grpc.py",
        "lockstep/rpc/generated/execd_pb2_grpc.py",
    ),
    (
        "execd_pb2.py",
        "'lockstep.v1.execd_pb2'",
        "'lockstep.rpc.generated.execd_pb2'",
    ),
)
_OUTPUTS = ("execd_pb2.py", "execd_pb2.pyi", "execd_pb2_grpc.py")


def generate(proto_root: Path) -> dict[str, str]:
    """Compile the proto under ``proto_root`` and return {file name: contents}.

    Raises:
        ConfigError: the proto is missing, protoc failed, or its output no longer
            has the shape the fix-ups expect.
    """
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev dependency

    source = proto_root / PROTO_FILE
    if not source.is_file():
        raise ConfigError(f"{source}: no such proto file (run from a source checkout)")
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="lockstep-gen-") as tmp:
        argv = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(source),
        ]
        status = protoc.main(argv)
        if status != 0:
            raise ConfigError(f"protoc failed on {source} (exit status {status})")
        out_dir = Path(tmp) / PROTO_FILE.parent
        files = {name: (out_dir / name).read_text(encoding="utf-8") for name in _OUTPUTS}
    for name, old, new in _FIXUPS:
        count = files[name].count(old)
        if count != 1:
            raise ConfigError(
                f"generated {name} contains {old!r} {count} times, expected once;"
                " protoc's output changed, update lockstep.rpc.gen"
            )
        files[name] = files[name].replace(old, new)
    files["__init__.py"] = _INIT
    return files


def _stale(expected: dict[str, str], out_dir: Path) -> list[str]:
    """Unified diffs (or notes) for every file in ``out_dir`` that differs."""
    problems = []
    for name, text in sorted(expected.items()):
        path = out_dir / name
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                f"{path} (committed)",
                f"{path} (generated)",
                n=1,
            )
            problems.append("".join(list(diff)[:40]))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the code, or with ``--check`` report whether it is stale.

    Returns the exit status: 0 in sync / written, 1 stale, 2 could not generate.
    """
    parser = argparse.ArgumentParser(prog="python -m lockstep.rpc.gen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    parser.add_argument("--proto-root", type=Path, default=_REPO_ROOT / "proto")
    parser.add_argument("--out", type=Path, default=GENERATED_DIR)
    args = parser.parse_args(argv)
    try:
        files = generate(args.proto_root)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        problems = _stale(files, args.out)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print(
                f"{args.out} is out of date; run: python -m lockstep.rpc.gen",
                file=sys.stderr,
            )
            return 1
        print(f"{args.out} is in sync with {args.proto_root / PROTO_FILE}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(files.items()):
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
