"""Meta-SGD: MAML with a learned learning rate for every fast weight."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_meta.algorithms.maml import MAML
from lightning_meta.learners.base import Learner
from lightning_meta.training.inner_loop import InnerUpdate, LearnedRates


class MetaSGD(MAML):
    """Meta-SGD: Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017.

    Inner loop, per task: θ' = θ − α ⊙ ∇θ L_support(θ), where α has the shape of θ (one learning
    rate per weight element; ``per_tensor=True``: one per weight tensor) and is meta-learned with
    θ: the outer loss L_query(θ') is differentiated with respect to both. α is kept positive by
    learning log α (α = exp(log α)), initialised at ``inner_lr``. Evaluation adapts with the
    learned α. With ``first_order=True`` the inner gradients are constants, but α still gets its
    gradient −Σ g ⊙ ∇L_query(θ') (first-order Meta-SGD).

    Args:
        inner_lr: the initial value of every learned learning rate.
        inner_steps: inner steps during meta-training (the paper uses one).
        eval_inner_steps: adaptation steps at evaluation (default: ``inner_steps``).
        first_order: drop second derivatives through the inner gradients.
        per_tensor: one learned rate per fast-weight tensor instead of per element.

    Example::

        from lightning_meta import MetaLearningModule
        from lightning_meta.algorithms import MetaSGD
        module = MetaLearningModule(learner, MetaSGD(inner_lr=0.01))   # binds α to the fast weights
        # lightning-meta fit --config configs/sinusoid.yaml --model.algorithm=MetaSGD
    """

    def __init__(
        self,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        per_tensor: bool = False,
    ) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps, first_order)
        self.per_tensor = per_tensor
        #: log α per fast weight, keyed by :func:`rate_key` of the weight's name.
        self.log_lrs = nn.ParameterDict()

    def bind(self, learner: Learner) -> None:
        if len(self.log_lrs):
            return
        for name, weight in self.fast_weights(learner).items():
            shape = () if self.per_tensor else weight.shape
            value = torch.full(shape, math.log(self.inner_lr), dtype=weight.dtype, device=weight.device)
            self.log_lrs[rate_key(name)] = nn.Parameter(value)

    def learning_rates(self) -> dict[str, Tensor]:
        """The current learned α of every fast weight, by weight name."""
        return {weight_name(key): log_lr.exp() for key, log_lr in self.log_lrs.items()}

    def inner_update(self, training: bool = True) -> InnerUpdate:
        if not len(self.log_lrs):
            raise RuntimeError("MetaSGD has no learning rates yet: call algorithm.bind(learner) first.")
        return LearnedRates({weight_name(key): log_lr for key, log_lr in self.log_lrs.items()})


def rate_key(name: str) -> str:
    """The key of a fast weight's learned rates in an ``nn.ParameterDict``, which refuses "." in keys."""
    return name.replace(".", "__")


def weight_name(key: str) -> str:
    """The fast weight a :func:`rate_key` names."""
    return key.replace("__", ".")
