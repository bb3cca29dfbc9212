"""Model-Agnostic Meta-Learning."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_meta.algorithms.base import (
    MetaAlgorithm,
    adapt_by_sgd,
    check_inner_loop_options,
    detached_start,
    inner_loop,
)
from lightning_meta.learners import FastWeights, Learner
from lightning_meta.tasks import Episode, Split


class MAML(MetaAlgorithm):
    """MAML: Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks", ICML 2017.

    Inner loop, per task: θ' = θ − α ∇θ L_support(θ), repeated ``inner_steps`` times.
    Outer loop: minimise the mean over tasks of L_query(θ'(θ)). The surrogate is that query loss
    itself, differentiated *through* the inner loop (second order, ``create_graph=True``).

    With ``first_order=True`` the inner gradients are treated as constants and the surrogate is
    L_query(θ + stop_grad(θ' − θ)), whose gradient is ∇L_query(θ') (see :class:`FOMAML`).

    Args:
        inner_lr: α, the inner-loop SGD step size.
        inner_steps: inner SGD steps during meta-training.
        eval_inner_steps: steps used to adapt at validation/test time (default: ``inner_steps``);
            the paper trains with 5 and tests with 10.
        first_order: drop the second-order terms.
        eval_inner_lr: step size used to adapt at validation/test time (default: ``inner_lr``).

    Example::

        from lightning_meta.algorithms import MAML
        maml = MAML(inner_lr=0.01, inner_steps=1, eval_inner_steps=10)
        out = maml.meta_loss(learner, task_batch)   # learner: e.g. RegressionLearner(MLP())
        out.loss.backward()                          # meta-gradient on learner.parameters()
        fast_weights = maml.adapt(learner, episode.support)
    """

    def __init__(
        self,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        eval_inner_lr: float | None = None,
    ) -> None:
        check_inner_loop_options(inner_lr, inner_steps, eval_inner_steps, eval_inner_lr)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order
        self.eval_inner_lr = eval_inner_lr

    def check_learner(self, learner: Learner) -> None:
        if not self.first_order:
            learner.prepare_second_order()

    def task_loss(self, learner: Learner, episode: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        meta_weights = learner.fast_parameters()
        if self.first_order:
            adapted = inner_loop(
                learner,
                detached_start(learner),
                episode.support,
                inner_lr=self.inner_lr,
                steps=self.inner_steps,
                create_graph=False,
            )
            # θ + stop_grad(θ' − θ): the value of θ', the gradient of the identity.
            adapted = {name: weight + (adapted[name] - weight).detach() for name, weight in meta_weights.items()}
        else:
            adapted = inner_loop(
                learner,
                meta_weights,
                episode.support,
                inner_lr=self.inner_lr,
                steps=self.inner_steps,
                create_graph=torch.is_grad_enabled(),
            )
        loss, metrics = learner.loss(episode.query, adapted)
        return loss, {f"query_{name}": value for name, value in metrics.items()}

    def adapt(self, learner: Learner, support: Split, steps: int | None = None) -> FastWeights:
        steps = steps if steps is not None else (self.eval_inner_steps or self.inner_steps)
        return adapt_by_sgd(learner, support, inner_lr=self.eval_inner_lr or self.inner_lr, steps=steps)
