"""Checkpoints of earlier versions read today: renamed options and moved modules (one notice each).

Used where checkpoints are loaded (:meth:`MetaLearningModule.load_from_checkpoint`, the CLI's ``--ckpt_path``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

#: Hyper-parameters of earlier versions, by their name today: ``task_by_task: bool`` became ``meta_batch``.
_RENAMED = {"task_by_task": ("meta_batch", {True: "task_by_task", False: "all_at_once"})}

#: Modules moved when the core was grouped into sub-packages (0.1.0 → today): old checkpoints name
#: their classes (``class_path``) by the old module.
MOVED_MODULES = {
    "lightning_meta.tasks": "lightning_meta.data.tasks",
    "lightning_meta.tables": "lightning_meta.data.tables",
    "lightning_meta.corpus": "lightning_meta.data.corpus",
    "lightning_meta.tokenization": "lightning_meta.data.tokenization",
    "lightning_meta.local_files": "lightning_meta.data.local_files",
    "lightning_meta.datamodules.base": "lightning_meta.data.episodic",
    "lightning_meta.stream": "lightning_meta.data.stream",
    "lightning_meta.language_models": "lightning_meta.learners.language_models",
    "lightning_meta.encoders": "lightning_meta.learners.encoders",
    "lightning_meta.models": "lightning_meta.learners.models",
    "lightning_meta.algorithms.base": "lightning_meta.training.algorithm",
    "lightning_meta.module": "lightning_meta.training.module",
    "lightning_meta.scaling": "lightning_meta.training.scaling",
    "lightning_meta.checkpoints": "lightning_meta.training.checkpoints",
    "lightning_meta.metrics": "lightning_meta.training.metrics",
    "lightning_meta.plots": "lightning_meta.training.plots",
    "lightning_meta.progress": "lightning_meta.training.progress",
    "lightning_meta.config": "lightning_meta.training.config",
    "lightning_meta.export": "lightning_meta.handoff.export",
    "lightning_meta.pretraining": "lightning_meta.handoff.pretraining",
    "lightning_meta.task_gym": "lightning_meta.datamodules.task_gym",
    "lightning_meta.task_collections": "lightning_meta.datamodules.task_collections",
}


def current_class_path(class_path: str) -> str:
    """``class_path`` under today's module layout (unchanged unless its module moved)."""
    module, _, name = class_path.rpartition(".")
    return f"{MOVED_MODULES.get(module, module)}.{name}" if module else class_path


def _current_class_paths(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            key: current_class_path(item)
            if key in ("class_path", "_class_path") and isinstance(item, str)
            else _current_class_paths(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_current_class_paths(item) for item in value]
    return value


def upgrade_hyperparameters(hparams: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``hparams`` saved by an earlier version, with renamed options under today's names (a one-line notice each)."""
    upgraded = _current_class_paths(dict(hparams))
    for old, (new, values) in _RENAMED.items():
        if old in upgraded:
            value = upgraded.pop(old)
            upgraded.setdefault(new, values.get(value, value))
            rank_zero_info(
                f"{source}: {old}={value!r} (an earlier version's option) is read as {new}={upgraded[new]!r}."
            )
    return upgraded


def needs_upgrade(hparams: Mapping[str, Any]) -> bool:
    """Whether ``hparams`` use an earlier version's option names or module paths (:func:`upgrade_hyperparameters`)."""
    return bool(_RENAMED.keys() & set(hparams)) or _current_class_paths(dict(hparams)) != dict(hparams)
