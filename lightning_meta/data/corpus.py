"""Text that needs no download: Python's own standard library, and WordNet where it is installed.

Read from the standard library's source folder (``sysconfig.get_paths()["stdlib"]``) and
``pydoc_data.topics``; nothing is imported from the modules whose text is read. The domain lists
are fixed so that tasks do not shift between machines. WordNet 3.0 is read from the Debian
``wordnet-base`` files (``/usr/share/wordnet/data.*``) when they exist.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from dataclasses import dataclass
from pathlib import Path

#: Standard-library packages whose source code forms one domain each.
CODE_DOMAINS: tuple[str, ...] = (
    "asyncio",
    "collections",
    "concurrent",
    "ctypes",
    "distutils",
    "email",
    "html",
    "http",
    "idlelib",
    "importlib",
    "json",
    "lib2to3",
    "logging",
    "multiprocessing",
    "re",
    "tkinter",
    "tomllib",
    "turtledemo",
    "unittest",
    "urllib",
    "venv",
    "wsgiref",
    "xml",
    "xmlrpc",
    "zoneinfo",
)
#: Prose domains: the language reference topics, and docstrings of the top-level modules.
PROSE_DOMAINS: tuple[str, ...] = ("reference", "docstrings")
#: Where Debian's ``wordnet-base`` puts WordNet 3.0.
WORDNET = Path("/usr/share/wordnet")
#: WordNet's 45 lexicographer files ("supersenses"), by number (the second field of each ``data.*`` line).
SUPERSENSES: tuple[str, ...] = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
_WORDNET_PARTS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}


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


@dataclass(frozen=True)
class StdlibDefinition:
    """A function, method or class of the standard library, as read by :func:`stdlib_definitions`."""

    module: str  # dotted, e.g. "email.utils"
    qualname: str  # e.g. "Message.get_payload"
    is_class: bool
    docstring: str | None
    code: str  # functions: the source without its docstring, dedented; "" for classes and empty bodies


def stdlib_modules() -> list[tuple[str, Path]]:
    """``(dotted module name, file)`` of every standard-library module outside test folders, sorted.

    Top-level ``.py`` files and the modules of top-level packages; ``site-packages`` (installed,
    not standard) and folders named ``test*`` or ``idle_test`` are left out.
    """
    root = stdlib_root()
    modules = [(path.stem, path) for path in root.glob("*.py")]
    for package in root.iterdir():
        if package.name == "site-packages" or not (package / "__init__.py").is_file():
            continue
        for path in package.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if any(part.startswith("test") or part == "idle_test" for part in parts):
                continue
            modules.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return sorted(modules)


@functools.cache
def stdlib_definitions() -> tuple[StdlibDefinition, ...]:
    """Functions, methods and classes (module level, in classes, under ``if``/``try``) of :func:`stdlib_modules`.

    Nested functions are left out. Read with ``ast`` in file order, so the result is the same on
    every machine with the same Python.
    """
    definitions: list[StdlibDefinition] = []
    for module, path in stdlib_modules():
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        _collect_definitions(tree.body, module, "", source.splitlines(), definitions)
    return tuple(definitions)


def _collect_definitions(
    body: list[ast.stmt], module: str, prefix: str, lines: list[str], into: list[StdlibDefinition]
) -> None:
    for node in body:
        if isinstance(node, ast.If | ast.Try):
            _collect_definitions(node.body + node.orelse, module, prefix, lines, into)
        elif isinstance(node, ast.ClassDef):
            into.append(StdlibDefinition(module, prefix + node.name, True, ast.get_docstring(node), ""))
            _collect_definitions(node.body, module, f"{prefix}{node.name}.", lines, into)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node)
            into.append(StdlibDefinition(module, prefix + node.name, False, docstring, _code(node, docstring, lines)))


def _code(node: ast.FunctionDef | ast.AsyncFunctionDef, docstring: str | None, lines: list[str]) -> str:
    """The function's source (from ``def``, without decorators) with its docstring lines removed."""
    body = node.body[1:] if docstring is not None else node.body
    if not body or body[0].lineno == node.lineno:
        return ""  # a docstring only, or a one-line body on the ``def`` line
    source = lines[node.lineno - 1 : node.body[0].lineno - 1] + lines[body[0].lineno - 1 : node.end_lineno]
    # Dedent by the ``def`` line's indentation (textwrap.dedent would not, past a string literal at column 0).
    return "\n".join(line[node.col_offset :] if line[: node.col_offset].isspace() else line for line in source)


@dataclass(frozen=True)
class Synset:
    """One line of WordNet's ``data.*`` files (see ``wndb(5)``)."""

    offset: int
    part: str  # the data file: "noun", "verb", "adj" or "adv"
    supersense: str  # the lexicographer file, one of SUPERSENSES
    words: tuple[str, ...]  # underscores as spaces, adjective markers such as "(a)" dropped
    # (symbol, target offset, target part, source word, target word); words count from 1, 0 is the whole synset.
    pointers: tuple[tuple[str, int, str, int, int], ...]
    gloss: str  # definition, then any examples: 'having the skill to do something; "able to swim"'


def wordnet_synsets(folder: str | Path = WORDNET) -> tuple[Synset, ...]:
    """Every synset of WordNet 3.0 under ``folder``, in file order (noun, verb, adj, adv)."""
    folder = Path(folder)
    if not all((folder / f"data.{part}").is_file() for part in ("noun", "verb", "adj", "adv")):
        raise FileNotFoundError(
            f"WordNet's data.noun/verb/adj/adv are not in {folder}: install them with "
            "`apt-get install wordnet-base` (they go to /usr/share/wordnet) or give the folder that holds them."
        )
    return _read_wordnet(str(folder.resolve()))


@functools.cache
def _read_wordnet(folder: str) -> tuple[Synset, ...]:
    synsets = []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (Path(folder) / f"data.{part}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or " | " not in line:  # the license header
                continue
            fields, gloss = line.split(" | ", 1)
            field = fields.split()
            word_count = int(field[3], 16)
            words = tuple(word.split("(")[0].replace("_", " ") for word in field[4 : 4 + 2 * word_count : 2])
            pointer_count = int(field[4 + 2 * word_count])
            pointer_fields = field[5 + 2 * word_count : 5 + 2 * word_count + 4 * pointer_count]
            pointers = tuple(
                (symbol, int(offset), _WORDNET_PARTS[pos], int(source_target[:2], 16), int(source_target[2:], 16))
                for symbol, offset, pos, source_target in (
                    pointer_fields[i : i + 4] for i in range(0, len(pointer_fields), 4)
                )
            )
            synsets.append(Synset(int(field[0]), part, SUPERSENSES[int(field[1])], words, pointers, gloss.strip()))
    return tuple(synsets)
