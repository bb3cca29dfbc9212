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
from typing import ClassVar

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

    #: Whether the algorithm adapts fast weights (has an inner loop). Hosts keep fast weights
    #: replicated under FSDP and in float32 under low precision only when it does.
    adapts_weights: ClassVar[bool] = True

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

    def meta_loss(self, learner: Learner, batch: TaskBatch, *, task_by_task: bool = True) -> MetaLoss:
        """Average surrogate over the episodes of ``batch``; its gradient is the meta-gradient.

        With ``task_by_task`` (the default) each task's meta-gradient is taken with
        ``torch.autograd.grad`` and its graph freed before the next task starts, so memory stays
        flat in the meta-batch size; the returned loss is ``Σ_p ⟨p, stop_grad(G_p)⟩`` shifted to
        the mean surrogate's value, whose gradient is the accumulated ``G``. One ``backward`` on
        it (by Lightning, with AMP, accumulation, clipping and DDP unchanged) gives the same
        gradient as the all-at-once path (``task_by_task=False``, which keeps every task's graph
        until that backward: needed where ``autograd.grad`` cannot reach the parameters, such
        as FSDP-sharded ones). Without autograd (``torch.no_grad``) the all-at-once path runs.
        Task by task, a trainable parameter the surrogate does not reach (Reptile's backbone when
        only the head is a fast weight) gets a zero gradient instead of none, as DDP requires.

        Checks the batch's data first (:meth:`Learner.check_data`: one host sync for the batch).
        """
        self.check_learner(learner)
        learner.check_data(batch)
        parameters = [parameter for parameter in learner.parameters() if parameter.requires_grad]
        task_by_task = task_by_task and torch.is_grad_enabled() and bool(parameters)
        count = len(batch)
        losses: list[Tensor] = []
        sums: dict[str, Tensor] = {}
        gradients: list[Tensor | None] = [None] * len(parameters)
        for episode in batch.episodes():
            loss, metrics = self.task_loss(learner, episode)
            if task_by_task:
                task_gradients = torch.autograd.grad(loss / count, parameters, allow_unused=True)
                gradients = [_add(total, new) for total, new in zip(gradients, task_gradients, strict=True)]
                loss = loss.detach()
            losses.append(loss)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0) + value
        mean = torch.stack(losses).mean()
        if task_by_task:
            # A parameter the surrogate does not reach (Reptile's backbone with head-only fast weights) gets
            # a zero gradient rather than none, so that DDP sees every parameter used.
            product = torch.stack(
                [(p * g).sum() if g is not None else p.sum() * 0 for p, g in zip(parameters, gradients, strict=True)]
            ).sum()
            mean = product - product.detach() + mean  # value: the mean surrogate; gradient: Σ G
        return MetaLoss(mean, {name: value / count for name, value in sums.items()})

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


def _add(total: Tensor | None, new: Tensor | None) -> Tensor | None:
    if new is None:
        return total
    return new if total is None else total.add_(new)


def adapt_by_sgd(learner: Learner, support: Split, *, inner_lr: float, steps: int) -> FastWeights:
    """First-order inner loop from the current meta-parameters, with gradients on, detached result."""
    with torch.inference_mode(False), torch.enable_grad():
        support = {name: tensor.clone() if tensor.is_inference() else tensor for name, tensor in support.items()}
        adapted = inner_loop(
            learner, detached_start(learner), support, inner_lr=inner_lr, steps=steps, create_graph=False
        )
    return {name: weight.detach() for name, weight in adapted.items()}
