"""lightning-meta: meta-learning (MAML, FOMAML, Reptile, ProtoNet) as PyTorch Lightning modules."""

from lightning_meta.language_models import CausalLMLearner, LoraSettings
from lightning_meta.learners import ClassificationLearner, Learner, RegressionLearner
from lightning_meta.models import MLP
from lightning_meta.module import MetaLearningModule
from lightning_meta.tasks import Episode, TaskBatch

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "CausalLMLearner",
    "ClassificationLearner",
    "Episode",
    "Learner",
    "LoraSettings",
    "MetaLearningModule",
    "RegressionLearner",
    "TaskBatch",
]

from lightning_meta.encoders import EncoderLearner  # noqa: E402
from lightning_meta.scaling import FSDP2Strategy  # noqa: E402

__all__ += ["EncoderLearner", "FSDP2Strategy"]
