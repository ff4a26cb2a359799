"""A digest of the kvloom source code a computation depends on: the files of some kvloom modules and of
every kvloom module they import, transitively (import statements read with `tokenize`, nothing imported).

What is kept on disk between starts (compiled executables, converted weights) is keyed by it, so any
change to the code that made it is a miss, while edits elsewhere (the scheduler, the API) keep it.

Why `tokenize` and not `ast`: CPython 3.11's `ast.parse` keeps its recursion depth per interpreter, not
per thread, and fails with "AST constructor recursion depth mismatch" when another thread parses at the
same time; the digest is computed on the compute thread while the event loop runs, so it must not parse.
"""

from __future__ import annotations

import hashlib
import io
import os
import tokenize
from typing import Iterable, Iterator, Optional

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


def _statements(source: bytes) -> Iterator[list[str]]:
    """The names and operators of each simple statement in `source` (comments, strings and numbers left
    out); a statement ends at the end of its logical line or at a `;`."""
    statement: list[str] = []
    for token in tokenize.tokenize(io.BytesIO(source).readline):
        if token.type == tokenize.NEWLINE or (token.type == tokenize.OP and token.string == ";"):
            if statement:
                yield statement
            statement = []
        elif token.type in (tokenize.NAME, tokenize.OP):
            statement.append(token.string)
    if statement:
        yield statement


def _dotted_names(words: list[str]) -> list[str]:
    """["a", ".", "b", "as", "c", ",", "d"] -> ["a.b", "d"] (parentheses dropped, aliases ignored)."""
    names, current, alias = [], "", False
    for word in words + [","]:
        if word == ",":
            if current:
                names.append(current)
            current, alias = "", False
        elif word == "as":
            alias = True
        elif not alias and word not in "()":
            current += word
    return names


def _imported(path: str) -> set[str]:
    """The kvloom modules `path` imports anywhere in it (a `from package import name` counts the
    submodule `package.name` when there is one)."""
    with open(path, "rb") as f:
        source = f.read()
    names = set()
    for words in _statements(source):
        if words[0] == "import":
            names.update(_dotted_names(words[1:]))
        elif words[0] == "from" and "import" in words and words[1] != ".":
            split = words.index("import")
            module = "".join(words[1:split])
            names.add(module)
            names.update(f"{module}.{name}" for name in _dotted_names(words[split + 1:]))
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
