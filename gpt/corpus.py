"""The embedded default corpus: English prose that ships with every CPython, so training
runs offline with nothing to download.

It is the concatenation of
1. the reference manual's topics that `help()` shows (`pydoc_data.topics`: the language
   reference on statements, operators, types, ...), in sorted topic order, and
2. the docstrings of a fixed list of pure-Python standard-library modules (module, class
   and function docstrings, read from the sources with `ast`, never imported), in sorted
   file order,
about 1.2 MB of text on Python 3.11. The same Python minor version gives the same bytes on
every machine; other versions ship different documentation, hence `CORPUS_ID` names the
version so caches prepared from one are not reused by another.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

# Pure-Python modules present in every CPython >= 3.10 whose docstrings are real prose.
_DOCUMENTED_MODULES = (
    "argparse", "ast", "asyncio", "calendar", "collections", "concurrent", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "difflib", "email", "enum", "fractions",
    "functools", "gettext", "heapq", "html", "http", "inspect", "ipaddress", "json", "logging",
    "mailbox", "multiprocessing", "optparse", "pathlib", "pickle", "pdb", "pydoc", "random",
    "re", "shutil", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "tokenize", "typing", "unittest", "urllib", "uuid", "xml", "zipfile",
)
_DOCUMENTED_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

# Bump when the recipe above changes: it is part of the data cache's key.
_RECIPE_VERSION = 1
CORPUS_ID = f"python-docs-v{_RECIPE_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}"


def default_corpus_text() -> str:
    """The embedded corpus (see the module docstring): deterministic for a Python version."""
    parts = [_pydoc_topics()] + [_docstrings(path) for path in _module_sources()]
    return "\n\n".join(part for part in parts if part)


def _pydoc_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def _module_sources() -> list[Path]:
    """The .py files of `_DOCUMENTED_MODULES` (packages: every file but their tests)."""
    files = []
    for name in _DOCUMENTED_MODULES:
        spec = importlib.util.find_spec(name)  # locates a top-level module without running it
        if spec is None or spec.origin is None:
            raise RuntimeError(f"standard-library module {name!r} not found: the embedded "
                               f"corpus needs a complete CPython installation")
        if spec.submodule_search_locations:
            package = Path(spec.origin).parent
            files += sorted(p for p in package.rglob("*.py")
                            if not {"test", "tests"} & set(p.relative_to(package).parts))
        else:
            files.append(Path(spec.origin))
    return files


def _docstrings(path: Path) -> str:
    tree = ast.parse(path.read_bytes(), filename=str(path))
    docs = (ast.get_docstring(node) for node in ast.walk(tree)
            if isinstance(node, _DOCUMENTED_NODES))
    return "\n\n".join(doc for doc in docs if doc)
