"""A cheap guard: no command line in lockstep is ever built through a shell.

Names of states, VMs and hosts come from group files, CLI arguments and RPC
fields. They are validated, but the second line of defence is that nothing is
ever handed to a shell: every command is an argv list (``lockstep.proc``), and
QEMU's memory goes to a file descriptor, never through an ``exec:`` migration
URI (which QEMU runs with ``/bin/sh -c``). This test reads the source tree and
fails on any call or string that would bring a shell back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lockstep

SRC = Path(lockstep.__file__).resolve().parent
# Calls that run their argument through /bin/sh.
_SHELL_CALLS = {
    "system",  # os.system
    "popen",  # os.popen
    "create_subprocess_shell",  # asyncio
    "subprocess_shell",  # loop.subprocess_shell
    "getoutput",  # subprocess.getoutput
    "getstatusoutput",  # subprocess.getstatusoutput
}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (they may mention what is banned)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def shell_uses(source: str, filename: str) -> list[str]:
    """Every place in ``source`` that runs a shell, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            if name in _SHELL_CALLS:
                found.append(f"{where}: calls {name}()")
            for kw in node.keywords:
                if kw.arg == "shell" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(f"{where}: passes shell={ast.unparse(kw.value)}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "subprocess", "asyncio"):
            for alias in node.names:
                if alias.name in _SHELL_CALLS:
                    found.append(f"{where}: imports {node.module}.{alias.name}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and node.value.lstrip().startswith("exec:")
        ):
            found.append(f"{where}: an exec: migration URI")
    return found


def test_source_tree_runs_no_shell() -> None:
    """No file under src/lockstep calls a shell, passes shell=True or builds an exec: URI."""
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, f"found only {len(files)} source files under {SRC}"
    found = [use for path in files for use in shell_uses(path.read_text(), str(path))]
    assert found == []


def test_guard_catches_each_pattern() -> None:
    """The guard flags every banned form (so an empty result above means something)."""
    source = '''
"""Docstrings may say exec: and shell=True freely."""
import os, subprocess, asyncio
from os import system
os.system("ls")
os.popen("ls")
subprocess.run("ls", shell=True)
subprocess.run(["ls"], shell=flag)
subprocess.getoutput("ls")
asyncio.create_subprocess_shell("ls")
qmp.execute("migrate", {"uri": "exec:cat > /tmp/x"})
qmp.execute("migrate", {"uri": f"exec:cat > {path}"})
subprocess.run(["ls"], shell=False)
'''
    found = shell_uses(source, "sample.py")
    assert [use.split(": ", 1)[1] for use in found] == [
        "imports os.system",
        "calls system()",
        "calls popen()",
        "passes shell=True",
        "passes shell=flag",
        "calls getoutput()",
        "calls create_subprocess_shell()",
        "an exec: migration URI",
        "an exec: migration URI",
    ]
