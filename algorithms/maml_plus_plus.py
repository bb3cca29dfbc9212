"""MAML++: MAML with learned per-step inner learning rates, a multi-step loss and derivative-order annealing."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_meta.algorithms.maml import MAML
from lightning_meta.algorithms.meta_sgd import rate_key, weight_name
from lightning_meta.data.tasks import Episode
from lightning_meta.learners.base import Learner
from lightning_meta.training.inner_loop import SGD, InnerUpdate, LearnedRates, inner_steps


class MAMLPlusPlus(MAML):
    """MAML++: Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019.

    MAML with the paper's fixes that apply to any learner:

    - **LSLR** (``learn_inner_lrs``): a learned learning rate per fast-weight tensor and per inner
      step, θ_{k+1} = θ_k − α_{t,k} ∇L_support(θ_k), kept positive as α = exp(log α) and
      initialised at ``inner_lr``. Evaluation steps past ``inner_steps`` reuse the last step's rates.
    - **MSL** (``multi_step_loss``): the outer loss is Σ_k v_k L_query(θ_k) over all inner steps.
      The weights start uniform (1/N) and, over ``msl_anneal_steps`` outer steps, every weight but
      the last falls linearly to 0.03/N while the last takes the rest (the paper's schedule, with
      outer steps in place of epochs).
    - **DA** (``first_order_steps``): first order for the first ``first_order_steps`` outer
      steps, second order after.
    - **CA** (cosine annealing of the outer learning rate) is the host's scheduler:
      ``--lr_scheduler=CosineAnnealingLR --lr_scheduler.T_max=<steps>``.

    Left out: per-step batch-norm statistics and weights (BNRS/BNWB), which concern batch norm
    (the learners here are functional; transformers use layer norm), and the paper's
    cross-validated model ensemble.

    With ``learn_inner_lrs=False, multi_step_loss=False, first_order_steps=0`` it is MAML.

    Args:
        inner_lr: the inner step size (the initial learned rates with ``learn_inner_lrs``).
        inner_steps: N, inner steps during meta-training (the paper: 5).
        eval_inner_steps: adaptation steps at evaluation (default: ``inner_steps``).
        learn_inner_lrs: LSLR, learned per-tensor per-step rates.
        multi_step_loss: MSL, the annealed multi-step query loss.
        msl_anneal_steps: outer steps over which the MSL weights anneal to the last step.
        first_order_steps: DA, outer steps trained first order before switching to second order.

    Example::

        from lightning_meta.algorithms import MAMLPlusPlus
        maml_pp = MAMLPlusPlus(inner_lr=0.01, inner_steps=5, msl_anneal_steps=1000, first_order_steps=500)
        # lightning-meta fit --config configs/sinusoid.yaml --model.algorithm=MAMLPlusPlus
    """

    def __init__(
        self,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        learn_inner_lrs: bool = True,
        multi_step_loss: bool = True,
        msl_anneal_steps: int = 1000,
        first_order_steps: int = 0,
    ) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps)  # checks the inner-loop options
        if msl_anneal_steps < 0 or first_order_steps < 0:
            raise ValueError(
                f"msl_anneal_steps and first_order_steps must be >= 0, got {msl_anneal_steps}, {first_order_steps}."
            )
        self.learn_inner_lrs = learn_inner_lrs
        self.multi_step_loss = multi_step_loss
        self.msl_anneal_steps = msl_anneal_steps
        self.first_order_steps = first_order_steps
        #: log α per fast weight (keyed by :func:`~lightning_meta.algorithms.meta_sgd.rate_key`): one entry per
        #: inner step.
        self.log_lrs = nn.ParameterDict()

    def bind(self, learner: Learner) -> None:
        if not self.learn_inner_lrs or len(self.log_lrs):
            return
        for name, weight in self.fast_weights(learner).items():
            value = torch.full((self.inner_steps,), math.log(self.inner_lr), dtype=weight.dtype, device=weight.device)
            self.log_lrs[rate_key(name)] = nn.Parameter(value)

    def second_order(self) -> bool:
        """DA: first order while ``outer_step < first_order_steps``."""
        return self.outer_step >= self.first_order_steps

    def inner_update(self, training: bool = True) -> InnerUpdate:
        if not self.learn_inner_lrs:
            return SGD(self.inner_lr)
        if not len(self.log_lrs):
            raise RuntimeError("MAMLPlusPlus has no learning rates yet: call algorithm.bind(learner) first.")
        return LearnedRates({weight_name(key): log_lrs for key, log_lrs in self.log_lrs.items()}, per_step=True)

    def msl_weights(self) -> Tensor:
        """The MSL importance of each inner step's query loss at the current outer step (sums to 1)."""
        steps = self.inner_steps
        if steps == 1:
            return torch.ones(1, dtype=torch.float64)
        progress = 1.0 if self.msl_anneal_steps == 0 else min(self.outer_step / self.msl_anneal_steps, 1.0)
        non_final = max(1.0 / steps - progress / steps, 0.03 / steps)
        weights = torch.full((steps,), non_final, dtype=torch.float64)
        weights[-1] = 1.0 - non_final * (steps - 1)
        return weights

    def check_learner(self, learner: Learner) -> None:
        learner.prepare_second_order()  # second order from step first_order_steps on

    def task_loss(
        self, learner: Learner, episode: Episode, *, parallel: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if not (self.multi_step_loss and torch.is_grad_enabled()):
            return super().task_loss(learner, episode, parallel=parallel)
        importance = self.msl_weights()
        total: Tensor | None = None
        for step, adapted in enumerate(
            inner_steps(
                learner,
                self.fast_weights(learner),
                episode.support,
                update=self.inner_update(),
                steps=self.inner_steps,
                create_graph=self.second_order(),
                parallel=parallel,
            )
        ):
            loss, metrics = learner.loss(episode.query, adapted)
            weighted = importance[step].to(loss.dtype) * loss
            total = weighted if total is None else total + weighted
        return total, {f"query_{name}": value for name, value in metrics.items()}  # the last step's metrics
