"""Text that ships with Python itself: an embedded multi-domain corpus that needs no files.

Read from the standard library's source folder (``sysconfig.get_paths()["stdlib"]``) and
``pydoc_data.topics``; nothing is imported from the modules whose text is read. The domain lists
are fixed so that tasks do not shift between machines.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from pathlib import Path

#: Standard-library packages whose source code forms one domain each.
CODE_DOMAINS: tuple[str, ...] = (
    "asyncio", "collections", "concurrent", "ctypes", "distutils", "email", "html", "http", "idlelib",
    "importlib", "json", "lib2to3", "logging", "multiprocessing", "re", "tkinter", "tomllib", "turtledemo",
    "unittest", "urllib", "venv", "wsgiref", "xml", "xmlrpc", "zoneinfo",
)  # fmt: skip
#: Prose domains: the language reference topics, and docstrings of the top-level modules.
PROSE_DOMAINS: tuple[str, ...] = ("reference", "docstrings")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def domain_text(domain: str) -> str:
    """The full text of one embedded domain (see :data:`CODE_DOMAINS`, :data:`PROSE_DOMAINS`)."""
    if domain == "reference":
        from pydoc_data.topics import topics  # plain data: a dict of topic name -> text

        return "\n\n".join(topics[name] for name in sorted(topics))
    if domain == "docstrings":
        return "\n\n".join(
            docstring for _, docstrings in sorted(module_docstrings().items()) for docstring in docstrings
        )
    if domain not in CODE_DOMAINS:
        raise ValueError(f"Unknown embedded domain {domain!r}; known: {', '.join(CODE_DOMAINS + PROSE_DOMAINS)}")
    folder = stdlib_root() / domain
    files = sorted(path for path in folder.rglob("*.py") if "test" not in path.relative_to(folder).parts[:-1])
    if not files:
        raise FileNotFoundError(f"No Python source for embedded domain {domain!r} under {folder}.")
    return "\n\n".join(path.read_text(encoding="utf-8", errors="replace") for path in files)


def embedded_domains() -> dict[str, str]:
    """All embedded domains that exist on this Python, by name."""
    available = [d for d in CODE_DOMAINS if (stdlib_root() / d).is_dir()] + list(PROSE_DOMAINS)
    return {domain: domain_text(domain) for domain in available}


@functools.cache
def module_docstrings() -> dict[str, list[str]]:
    """Docstrings (module, class and function) of each top-level standard-library ``.py`` module."""
    result: dict[str, list[str]] = {}
    for path in sorted(stdlib_root().glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        nodes = [
            tree,
            *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)),
        ]
        docstrings = [doc.strip() for node in nodes if (doc := ast.get_docstring(node))]
        if docstrings:
            result[path.stem] = docstrings
    return result
