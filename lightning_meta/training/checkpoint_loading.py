"""A checkpoint's saved hyper-parameters as this version reads them: the one reader every loader uses
(:meth:`MetaLearningModule.load_from_checkpoint`, ``CausalLMPretraining.load_from_checkpoint``, the CLI's
``--ckpt_path``, ``export``).

What it does to them, in one place: earlier versions' renamed options and moved modules are read under today's
names (one notice each); a slim checkpoint's pretrained model is looked up where it was found at training
(:func:`~lightning_meta.training.checkpoints.rebuilt_base`); and no option saved in the file switches a model
folder's own code on (``trust_remote_code``): only the caller may.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_meta.training.checkpoints import (
    load_checkpoint_file,
    rebuilt_base,
    refuse_remote_code,
    take_out_remote_code,
)

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


def saved_hyperparameters(
    checkpoint: Mapping[str, Any],
    source: str,
    *,
    key: str = "hyper_parameters",
    given: Iterable[str] = (),
    pretrained: str | None = None,
    trust_remote_code: bool = False,
    allow: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The hyper-parameters ``checkpoint`` saved under ``key``, as today's version reads them, and the dotted keys
    that asked to run a model folder's own code.

    Earlier versions' options and module paths are upgraded (:func:`upgrade_hyperparameters`, a notice each,
    naming ``source``); the learner's ``pretrained`` becomes the folder a slim checkpoint's frozen weights are
    rebuilt from (``pretrained``: the caller's choice; see :func:`rebuilt_base`); ``given``: the options the
    caller passes itself, which the file's values do not decide. Unless ``trust_remote_code``, every saved
    ``trust_remote_code`` is switched off and listed; with ``allow`` (how the caller allows it), such a
    checkpoint is refused instead (:func:`refuse_remote_code`).
    """
    given = set(given)
    hparams = dict(checkpoint.get(key) or {})
    if needs_upgrade(hparams):
        hparams = upgrade_hyperparameters(hparams, source)
    base = rebuilt_base(checkpoint, pretrained) if key == "hyper_parameters" else None
    if base is not None and isinstance(hparams.get("learner"), Mapping) and "learner" not in given:
        init_args = dict(hparams["learner"].get("init_args") or {}) | {"pretrained": base}
        hparams["learner"] = dict(hparams["learner"]) | {"init_args": init_args}
    if trust_remote_code:
        return hparams, []
    cleaned, asked = take_out_remote_code({name: value for name, value in hparams.items() if name not in given})
    if allow is not None:
        refuse_remote_code(asked, source, allow)
    return hparams | cleaned, asked


def loadable_checkpoint(
    checkpoint_path: str | Path | IO,
    *,
    given: Iterable[str] = (),
    trust_remote_code: bool = False,
    allow: str | None = None,
) -> str | Path | IO:
    """``checkpoint_path`` as Lightning's ``load_from_checkpoint`` should read it, its saved hyper-parameters read
    by :func:`saved_hyperparameters` (``given``, ``trust_remote_code``, ``allow``: as there): the local file itself
    where they are unchanged, else an in-memory copy holding them. A local file is checked without reading its
    weights (:func:`~lightning_meta.training.checkpoints.load_checkpoint_file`: URLs, truncated files and files
    that are not checkpoints are refused, naming the file); a file object is read here, so that it is checked
    like a file."""
    if isinstance(checkpoint_path, str | Path):
        checkpoint = load_checkpoint_file(checkpoint_path)  # memory-mapped: checks without reading the weights
        source = f"The checkpoint {checkpoint_path}"
    else:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        source = "The checkpoint"
    saved = checkpoint.get("hyper_parameters") or {}
    hparams, _ = saved_hyperparameters(
        checkpoint, source, given=given, trust_remote_code=trust_remote_code, allow=allow
    )
    if hparams == saved and isinstance(checkpoint_path, str | Path):
        return checkpoint_path
    checkpoint["hyper_parameters"] = hparams
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer
