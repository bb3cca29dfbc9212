"""lightning-meta: meta-learning for language models as PyTorch Lightning modules.

Algorithms (``lightning_meta.algorithms.available()``): MAML, FOMAML, Reptile, ProtoNet, ANIL,
MetaSGD, MAMLPlusPlus (MAML++), MetaICL and the MultiTask joint-training baseline; episodic
datamodules in ``lightning_meta.datamodules``; ``lightning-meta fit / export / pretrain`` on the
command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_meta.version import VERSION

if TYPE_CHECKING:
    from lightning_meta.data.tasks import Episode, TaskBatch
    from lightning_meta.learners import (
        MLP,
        CausalLMLearner,
        ClassificationLearner,
        EncoderLearner,
        Learner,
        LoraSettings,
        RegressionLearner,
    )
    from lightning_meta.training.module import MetaLearningModule
    from lightning_meta.training.scaling import FSDP2Strategy
    from lightning_meta.training.trainer import Trainer

__version__ = VERSION

#: Each public name and the module that defines it. Imported on first use (PEP 562), so that
#: ``import lightning_meta`` (and ``lightning-meta --version``) does not import torch and Lightning.
_PUBLIC = {
    "Episode": "lightning_meta.data.tasks",
    "TaskBatch": "lightning_meta.data.tasks",
    "MLP": "lightning_meta.learners",
    "CausalLMLearner": "lightning_meta.learners",
    "ClassificationLearner": "lightning_meta.learners",
    "EncoderLearner": "lightning_meta.learners",
    "Learner": "lightning_meta.learners",
    "LoraSettings": "lightning_meta.learners",
    "RegressionLearner": "lightning_meta.learners",
    "MetaLearningModule": "lightning_meta.training.module",
    "FSDP2Strategy": "lightning_meta.training.scaling",
    "Trainer": "lightning_meta.training.trainer",
}

__all__ = [
    "CausalLMLearner",
    "ClassificationLearner",
    "EncoderLearner",
    "Episode",
    "FSDP2Strategy",
    "Learner",
    "LoraSettings",
    "MLP",
    "MetaLearningModule",
    "RegressionLearner",
    "TaskBatch",
    "Trainer",
]


def __getattr__(name: str) -> Any:
    """A public name (imported from its module on first use) or a subpackage (``lightning_meta.training``)."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
