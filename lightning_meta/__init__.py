"""lightning-meta: meta-learning for language models as PyTorch Lightning modules.

Algorithms (``lightning_meta.algorithms.available()``): MAML, FOMAML, Reptile, ProtoNet, ANIL,
MetaSGD, MAMLPlusPlus (MAML++), MetaICL and the MultiTask joint-training baseline; episodic
datamodules in ``lightning_meta.datamodules``; ``lightning-meta fit / export / pretrain`` on the
command line.
"""

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
from lightning_meta.version import VERSION

__version__ = VERSION

__all__ = [
    "MLP",
    "CausalLMLearner",
    "ClassificationLearner",
    "EncoderLearner",
    "Episode",
    "FSDP2Strategy",
    "Learner",
    "LoraSettings",
    "MetaLearningModule",
    "RegressionLearner",
    "TaskBatch",
]
