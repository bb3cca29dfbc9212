"""ARCHITECTURE.md's owner table is true: every file it names exists, every name it gives a file is defined in that
file, and no name it lists as a rule's owner is defined twice in the package (one rule, one place)."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Where a path of the table lives: the package's layers under ``lightning_meta/``, the top-level packages and the
#: repository's own folders as they are.
TOP_LEVEL = ("algorithms/", "datamodules/", "benchmarks/", "tests/")
#: Every Python file of the package (the top-level ``algorithms`` and ``datamodules`` included).
PACKAGE_FILES = [
    *sorted((ROOT / "lightning_meta").rglob("*.py")),
    *sorted((ROOT / "algorithms").rglob("*.py")),
    *sorted((ROOT / "datamodules").rglob("*.py")),
]


def owner_rows() -> list[tuple[str, str]]:
    """(rule, owner) cells of the table under "Where each rule lives"."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text.split("## Where each rule lives", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith(("|---", "| rule"))]
    cells = [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]
    return [(cell[0], cell[1]) for cell in cells]


def resolve(path: str) -> Path:
    return ROOT / path if path.startswith(TOP_LEVEL) else ROOT / "lightning_meta" / path


def _assigned(node: ast.stmt) -> set[str]:
    """Names an assignment binds (``A = ...``, ``A: int = ...``, ``A, B = ...``)."""
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    found = set()
    for target in targets:
        elements = target.elts if isinstance(target, ast.Tuple) else [target]
        found |= {element.id for element in elements if isinstance(element, ast.Name)}
    return found


@cache
def top_level(path: Path) -> frozenset[str]:
    """The functions, classes and assignments ``path`` defines at module level."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        names |= _assigned(node)
    return frozenset(names)


@cache
def defined_names(path: Path) -> frozenset[str]:
    """:func:`top_level` and each class's members as ``Class.member`` and by their own name (the table writes
    ``loss`` for ``CausalLMLearner.loss``)."""
    names = set(top_level(path))
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                defines = isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                own = {member.name} if defines else set()
                for name in own | _assigned(member):
                    names |= {f"{node.name}.{name}", name}
    return frozenset(names)


def owners(cell: str) -> list[tuple[str, list[str]]]:
    """Each ``path.py`` of an owner cell with the code names given after it in parentheses (``(`name`, ...)``).

    A backticked token counts as a code name when it is an identifier or ``Class.member`` (a call's arguments cut
    off); quoted values and option values (``"\\n"``, ``last_blocks:N``) do not."""
    found = []
    for match in re.finditer(r"`([\w/.]+\.py)`(?:\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\))?", cell):
        tokens = re.findall(r"`([^`]+)`", match.group(2) or "")
        names = [token.split("(")[0] for token in tokens]
        found.append((match.group(1), [name for name in names if re.fullmatch(r"[A-Za-z_]\w*(\.\w+)?", name)]))
    return found


def dotted_module_names(cell: str) -> list[tuple[str, str]]:
    """``module.name`` tokens of a cell naming a package module directly (``_compat.claim_version_when_chosen``)."""
    found = []
    for token in re.findall(r"`([A-Za-z_]\w*)\.([A-Za-z_]\w*)`", cell):
        if token[1] != "py" and (ROOT / "lightning_meta" / f"{token[0]}.py").is_file():
            found.append(token)
    return found


ROWS = owner_rows()


def test_a_name_the_file_does_not_define_is_caught():
    ((path, names),) = owners("`training/meta_batch.py` (`MetaBatchRunner`, `no_such_runner`)")
    assert [name for name in names if name not in defined_names(resolve(path))] == ["no_such_runner"]


def test_the_table_is_read():
    assert len(ROWS) >= 25
    assert ("private framework access", "`_compat.py` (and `tests/test_compat.py`)") in ROWS
    assert owners("`training/meta_batch.py` (`MetaBatchRunner`, `TaskLossAlgorithm`, the verdicts)") == [
        ("training/meta_batch.py", ["MetaBatchRunner", "TaskLossAlgorithm"])
    ]
    assert owners("`algorithms/metaicl.py` (`with_demonstrations(lead_lengths=)`)") == [
        ("algorithms/metaicl.py", ["with_demonstrations"])
    ]


@pytest.mark.parametrize(("rule", "cell"), ROWS, ids=[rule[:60] for rule, _ in ROWS])
def test_every_owner_the_table_names_exists_where_it_says(rule, cell):
    named = owners(cell)
    assert named, f"no file named for {rule!r}"
    for path, names in named:
        file = resolve(path)
        assert file.is_file(), f"{rule!r}: {path} does not exist"
        missing = [name for name in names if name not in defined_names(file)]
        assert not missing, f"{rule!r}: {missing} not defined in {path}"
    for module, name in dotted_module_names(cell):
        assert name in defined_names(ROOT / "lightning_meta" / f"{module}.py"), f"{rule!r}: {module}.{name}"


def test_no_owner_the_table_names_is_defined_twice():
    listed = {name for _, cell in ROWS for _, names in owners(cell) for name in names if "." not in name}
    where: dict[str, list[str]] = {}
    for path in PACKAGE_FILES:
        for name in top_level(path) & listed:
            where.setdefault(name, []).append(str(path.relative_to(ROOT)))
    twice = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not twice, f"defined in more than one place: {twice}"


def test_meta_batch_execution_imports_no_algorithm():
    # No circle: algorithm.py imports the runner; the runner asks for a protocol, not the algorithm class.
    tree = ast.parse((ROOT / "lightning_meta" / "training" / "meta_batch.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and ("algorithm" in name or name.endswith("module"))}, imported
