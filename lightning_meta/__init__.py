"""lightning-meta: meta-learning for language models as PyTorch Lightning modules.

Algorithms (``lightning_meta.algorithms.available()``): MAML, FOMAML, Reptile, ProtoNet, ANIL,
MetaSGD, MAMLPlusPlus (MAML++), MetaICL and the MultiTask joint-training baseline; episodic
datamodules in ``lightning_meta.datamodules``; ``lightning-meta fit / export / pretrain`` on the
command line.
"""

from lightning_meta.language_models import CausalLMLearner, LoraSettings
from lightning_meta.learners import ClassificationLearner, Learner, RegressionLearner
from lightning_meta.models import MLP
from lightning_meta.module import MetaLearningModule
from lightning_meta.tasks import Episode, TaskBatch
from lightning_meta.version import VERSION

__version__ = VERSION

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
