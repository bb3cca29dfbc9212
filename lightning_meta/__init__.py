"""lightning-meta: meta-learning (MAML, FOMAML, Reptile, ProtoNet) as PyTorch Lightning modules."""

from lightning_meta.learners import ClassificationLearner, Learner, RegressionLearner
from lightning_meta.models import MLP
from lightning_meta.module import MetaLearningModule
from lightning_meta.tasks import Episode, TaskBatch

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "ClassificationLearner",
    "Episode",
    "Learner",
    "MetaLearningModule",
    "RegressionLearner",
    "TaskBatch",
]
