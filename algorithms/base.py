"""The algorithm contract and the one shared inner loop.

Every algorithm turns a task batch into a *surrogate loss* whose gradient with respect to the
meta-parameters is the algorithm's meta-gradient. Lightning's automatic optimization, gradient
accumulation, clipping, AMP scaling and DDP gradient sync then work unchanged.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_meta.learners import FastWeights, Learner
from lightning_meta.tasks import Episode, Split, TaskBatch


@dataclass
class MetaLoss:
    """``loss``: the surrogate to call ``backward`` on; ``metrics``: detached means over the meta-batch."""

    loss: Tensor
    metrics: dict[str, Tensor]


def inner_loop(
    learner: Learner,
    fast_weights: Mapping[str, Tensor],
    support: Split,
    *,
    inner_lr: float,
    steps: int,
    create_graph: bool,
) -> FastWeights:
    """``steps`` steps of SGD on the support loss: θ ← θ − α ∇θ L_support(θ).

    A pure function from fast weights to adapted fast weights. With ``create_graph=True`` the
    result stays differentiable with respect to ``fast_weights`` (second-order MAML); otherwise
    the gradients are treated as constants (first-order). No step checks its loss: that would
    cost a host sync per step. The data are checked once per batch (:meth:`Learner.check_data`)
    and the host module checks the meta-loss once per batch.
    """
    weights = dict(fast_weights)
    for _ in range(steps):
        loss, _ = learner.loss(support, weights)
        grads = torch.autograd.grad(loss, list(weights.values()), create_graph=create_graph, allow_unused=True)
        weights = {
            name: weight if grad is None else weight - inner_lr * grad
            for (name, weight), grad in zip(weights.items(), grads, strict=True)
        }
    return weights


def detached_start(learner: Learner) -> FastWeights:
    """Fast weights cut from the meta-parameters' graph, ready for a first-order inner loop."""
    return {name: weight.detach().requires_grad_() for name, weight in learner.fast_parameters().items()}


def check_inner_loop_options(
    inner_lr: float, inner_steps: int, eval_inner_steps: int | None, eval_inner_lr: float | None = None
) -> None:
    """Raise a clear error for inner-loop options no algorithm can run with."""
    if not (inner_lr > 0 and math.isfinite(inner_lr)):
        raise ValueError(
            f"inner_lr must be a finite number > 0, got {inner_lr}; the MAML paper uses 0.01 for sinusoids."
        )
    if eval_inner_lr is not None and not (eval_inner_lr > 0 and math.isfinite(eval_inner_lr)):
        raise ValueError(f"eval_inner_lr must be a finite number > 0 or None (= inner_lr), got {eval_inner_lr}.")
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}.")
    if eval_inner_steps is not None and (
        isinstance(eval_inner_steps, bool) or not isinstance(eval_inner_steps, int) or eval_inner_steps < 1
    ):
        raise ValueError(f"eval_inner_steps must be an integer >= 1 or None (= inner_steps), got {eval_inner_steps!r}.")


class MetaAlgorithm(ABC):
    """Base of every meta-learning algorithm.

    Subclasses implement :meth:`task_loss` (the surrogate for one episode) and :meth:`adapt`.
    The meta-batch is processed task by task and the surrogates averaged.

    Constructor arguments must be stored as attributes of the same name: configs and
    checkpoints rebuild an algorithm from them.
    """

    @abstractmethod
    def task_loss(self, learner: Learner, episode: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        """Surrogate loss of one episode and its detached figures (at least ``query_loss``)."""

    @abstractmethod
    def adapt(self, learner: Learner, support: Split, steps: int | None = None) -> FastWeights:
        """Fast weights adapted to ``support`` (evaluation adaptation by default).

        Works under ``torch.no_grad()`` and ``torch.inference_mode()``: it turns gradients back
        on for itself. The result is detached from the meta-parameters.
        """

    def check_learner(self, learner: Learner) -> None:  # noqa: B027 (optional hook)
        """Raise a clear error when this algorithm cannot run with ``learner``."""

    def meta_loss(self, learner: Learner, batch: TaskBatch) -> MetaLoss:
        """Average surrogate over the episodes of ``batch``; its gradient is the meta-gradient.

        Checks the batch's data first (:meth:`Learner.check_data`: one host sync for the batch).
        """
        self.check_learner(learner)
        learner.check_data(batch)
        losses: list[Tensor] = []
        sums: dict[str, Tensor] = {}
        for episode in batch.episodes():
            loss, metrics = self.task_loss(learner, episode)
            losses.append(loss)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0) + value
        count = len(losses)
        return MetaLoss(torch.stack(losses).mean(), {name: value / count for name, value in sums.items()})

    def evaluate(self, learner: Learner, episode: Episode, steps: int | None = None) -> dict[str, Tensor]:
        """Query figures before (``*_pre``) and after (``*_post``) adaptation to the support."""
        self.check_learner(learner)
        with torch.no_grad():
            _, before = learner.loss(episode.query)
        adapted = self.adapt(learner, episode.support, steps)
        with torch.no_grad():
            _, after = learner.loss(episode.query, adapted)
        return {f"{name}_pre": value for name, value in before.items()} | {
            f"{name}_post": value for name, value in after.items()
        }

    def predict(self, learner: Learner, episode: Episode, steps: int | None = None) -> Tensor:
        """Model outputs on the query after adapting to the support."""
        adapted = self.adapt(learner, episode.support, steps)
        with torch.no_grad():
            return learner.predict(episode.query, adapted)

    def __repr__(self) -> str:
        from lightning_meta.config import init_args

        args = ", ".join(f"{name}={value!r}" for name, value in init_args(self).items())
        return f"{type(self).__name__}({args})"


def adapt_by_sgd(learner: Learner, support: Split, *, inner_lr: float, steps: int) -> FastWeights:
    """First-order inner loop from the current meta-parameters, with gradients on, detached result."""
    with torch.inference_mode(False), torch.enable_grad():
        support = {name: tensor.clone() if tensor.is_inference() else tensor for name, tensor in support.items()}
        adapted = inner_loop(
            learner, detached_start(learner), support, inner_lr=inner_lr, steps=steps, create_graph=False
        )
    return {name: weight.detach() for name, weight in adapted.items()}
