"""The package's layers import downwards only (ARCHITECTURE.md): checked on every module's import-time imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
#: Each layer and the layers it may import at import time (its own included). The application
#: layer (the facade ``lightning_meta/__init__``, ``cli``, ``cli_messages``, ``cli_checkpoint``, ``__main__``) may
#: import anything.
ALLOWED = {
    "_compat": {"_compat"},
    "version": {"version"},
    "data": {"data", "_compat", "version"},
    "learners": {"learners", "data", "_compat"},
    "training": {"training", "learners", "data", "_compat", "version"},
    "handoff": {"handoff", "training", "learners", "data", "_compat", "version"},
    "algorithms": {"algorithms", "training", "learners", "data", "_compat"},
    "datamodules": {"datamodules", "training", "learners", "data", "_compat"},
}
FOLDERS = {"algorithms": ROOT / "algorithms", "datamodules": ROOT / "datamodules"}


def layer_of(module: str) -> str | None:
    """``lightning_meta.data.tasks`` -> ``data``; the application layer -> ``None``."""
    parts = module.split(".")
    application = ("cli", "cli_messages", "cli_checkpoint", "__main__", "configs")
    if parts[0] != "lightning_meta" or len(parts) == 1 or parts[1] in application:
        return None
    return parts[1]


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted((ROOT / "lightning_meta").rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        found.append((".".join(relative.parts).removesuffix(".__init__"), path))
    for name, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            found.append((".".join(("lightning_meta", name, *relative.parts)).removesuffix(".__init__"), path))
    return found


def import_time_imports(path: Path) -> list[str]:
    """Modules imported at module level (not inside functions, and not only for type checkers)."""
    imported = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(child, ast.Import):
                imported += [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                imported += [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
    return imported


@pytest.mark.parametrize(("module", "path"), modules(), ids=[name for name, _ in modules()])
def test_imports_go_downwards(module, path):
    layer = layer_of(module)
    if layer is None or module == "lightning_meta":
        return
    upward = sorted(
        name
        for name in import_time_imports(path)
        if (target := layer_of(name)) is not None and name != "lightning_meta" and target not in ALLOWED[layer]
    )
    assert not upward, f"{module} ({layer}) imports a layer above it at import time: {upward}"


def test_every_module_belongs_to_a_layer():
    layers = {layer_of(name) for name, _ in modules()} - {None}
    assert layers <= set(ALLOWED), layers - set(ALLOWED)
