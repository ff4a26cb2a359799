"""A digest of the kvloom source code a computation depends on: the files of some kvloom modules and of
every kvloom module they import, transitively (import statements read with `ast`, nothing imported).

What is kept on disk between starts (compiled executables, converted weights) is keyed by it, so any
change to the code that made it is a miss, while edits elsewhere (the scheduler, the API) keep it.
"""

from __future__ import annotations

import ast
import hashlib
import os
from typing import Iterable, Optional

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # engine/, kernels/ live here
_PACKAGE = "kvloom"


def module_file(name: str) -> Optional[str]:
    """The source file of kvloom module `name` ("kvloom.engine.runner"), or None if it is not one."""
    parts = name.split(".")
    if parts[0] != _PACKAGE or len(parts) < 2:
        return None
    base = os.path.join(_PACKAGE_ROOT, *parts[1:])
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _imported(path: str) -> set[str]:
    """The kvloom modules `path` imports anywhere in it (a `from package import name` counts the
    submodule `package.name` when there is one)."""
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] == _PACKAGE}


def source_files(modules: Iterable[str]) -> list[str]:
    """The files of `modules` and of every kvloom module they import, transitively; sorted."""
    seen: set[str] = set()
    todo = [path for path in map(module_file, modules) if path]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(p for p in map(module_file, _imported(path)) if p and p not in seen)
    return sorted(seen)


def source_digest(modules: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for path in source_files(modules):
        digest.update(os.path.relpath(path, _PACKAGE_ROOT).encode())
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()
