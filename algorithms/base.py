"""The algorithm contract and the one shared inner loop.

Every algorithm turns a task batch into a *surrogate loss* whose gradient with respect to the
meta-parameters is the algorithm's meta-gradient. Lightning's automatic optimization, gradient
accumulation, clipping, AMP scaling and DDP gradient sync then work unchanged.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_meta.learners import FastWeights, Learner
from lightning_meta.tasks import Episode, Split, TaskBatch


@dataclass
class MetaLoss:
    """``loss``: the surrogate to call ``backward`` on; ``metrics``: detached means over the meta-batch."""

    loss: Tensor
    metrics: dict[str, Tensor]


InnerUpdate = Callable[[int, FastWeights, Mapping[str, "Tensor | None"]], FastWeights]
"""An inner update rule: ``(step, weights, gradients) -> new weights``, ``step`` counting from 0.

Gradients are ``None`` for weights the support loss does not reach. The rule may use tensors
that require grad (learned learning rates): the meta-gradient then reaches them.
"""


@dataclass(frozen=True)
class SGD:
    """θ ← θ − α g: the inner update of MAML, FOMAML and Reptile (the default rule)."""

    lr: float

    def __call__(self, step: int, weights: FastWeights, gradients: Mapping[str, Tensor | None]) -> FastWeights:
        return {name: w if gradients[name] is None else w - self.lr * gradients[name] for name, w in weights.items()}


def inner_step(
    learner: Learner,
    weights: Mapping[str, Tensor],
    support: Split,
    *,
    update: InnerUpdate,
    step: int,
    create_graph: bool,
) -> FastWeights:
    """One inner step: the support loss's gradient at ``weights``, then ``update``.

    With ``create_graph=False`` the gradient is a constant (first order) but the update itself
    stays differentiable: in θ − α·g the path to θ is the identity (FOMAML's gradient) and to a
    learned α it is −g (first-order Meta-SGD).
    """
    loss, _ = learner.loss(support, weights)
    gradients = torch.autograd.grad(loss, list(weights.values()), create_graph=create_graph, allow_unused=True)
    return update(step, dict(weights), dict(zip(weights, gradients, strict=True)))


def inner_steps(
    learner: Learner,
    fast_weights: Mapping[str, Tensor],
    support: Split,
    *,
    steps: int,
    create_graph: bool,
    update: InnerUpdate | None = None,
    inner_lr: float | None = None,
) -> Iterator[FastWeights]:
    """The adaptation trajectory: the fast weights after each of ``steps`` inner steps.

    The one shared inner loop, as a generator (``update``: the rule, plain SGD with ``inner_lr``
    by default). A pure function of its inputs. No step checks its loss: that would cost a host
    sync per step. The data are checked once per batch (:meth:`Learner.check_data`) and the host
    module checks the meta-loss once per batch.
    """
    update = _rule(update, inner_lr)
    weights = dict(fast_weights)
    for step in range(steps):
        weights = inner_step(learner, weights, support, update=update, step=step, create_graph=create_graph)
        yield weights


def inner_loop(
    learner: Learner,
    fast_weights: Mapping[str, Tensor],
    support: Split,
    *,
    steps: int,
    create_graph: bool,
    update: InnerUpdate | None = None,
    inner_lr: float | None = None,
) -> FastWeights:
    """``steps`` inner steps on the support loss (SGD: θ ← θ − α ∇θ L_support(θ) by default).

    A pure function from fast weights to adapted fast weights: the last point of
    :func:`inner_steps`. With ``create_graph=True`` the result stays differentiable with respect
    to ``fast_weights`` through the gradients too (second-order MAML); otherwise the gradients
    are constants (first order).
    """
    weights = dict(fast_weights)
    for weights in inner_steps(learner, fast_weights, support, steps=steps, create_graph=create_graph,  # noqa: B007
                               update=update, inner_lr=inner_lr):  # fmt: skip
        pass
    return weights


def _rule(update: InnerUpdate | None, inner_lr: float | None) -> InnerUpdate:
    if (update is None) == (inner_lr is None):
        raise ValueError("Give the inner loop exactly one of update (a rule) or inner_lr (plain SGD).")
    return update if update is not None else SGD(inner_lr)


def detached_start(weights: Learner | Mapping[str, Tensor]) -> FastWeights:
    """Fast weights cut from the meta-parameters' graph (a learner's, or the given ones)."""
    weights = weights.fast_parameters() if isinstance(weights, Learner) else weights
    return {name: weight.detach().requires_grad_() for name, weight in weights.items()}


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


class MetaAlgorithm(nn.Module, ABC):
    """Base of every meta-learning algorithm.

    Subclasses implement :meth:`task_loss` (the surrogate for one episode). Algorithms with an
    inner loop name its rule in :meth:`inner_update` (plain SGD with ``inner_lr`` by default) and
    get :meth:`adapt_steps`/:meth:`adapt` from here; the meta-batch is processed task by task
    and the surrogates averaged.

    An algorithm is an ``nn.Module``: parameters it owns (learned inner learning rates) are
    created in :meth:`bind`, optimized by the host module beside the learner's, saved in
    checkpoints and restored with them, and moved, synchronized and sharded like the learner's.
    Constructor arguments must be stored as attributes of the same name: configs and
    checkpoints rebuild an algorithm from them.
    """

    #: Whether the algorithm adapts fast weights (has an inner loop). Hosts keep fast weights
    #: replicated under FSDP and in float32 under low precision only when it does.
    adapts_weights: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        #: The meta-training step, set by the host before each meta-loss; schedules read it.
        self.outer_step = 0

    @abstractmethod
    def task_loss(self, learner: Learner, episode: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        """Surrogate loss of one episode and its detached figures (at least ``query_loss``)."""

    def set_inner_loop_options(
        self, inner_lr: float, inner_steps: int, eval_inner_steps: int | None = None, eval_inner_lr: float | None = None
    ) -> None:
        """Check and keep the SGD inner-loop options, the shared part of MAML, Reptile and MultiTask."""
        check_inner_loop_options(inner_lr, inner_steps, eval_inner_steps, eval_inner_lr)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.eval_inner_lr = eval_inner_lr

    def bind(self, learner: Learner) -> None:  # noqa: B027 (optional hook)
        """Create the meta-parameters that depend on the learner (one learning rate per fast weight).

        Called once by the host module before the optimizer is built; call it yourself when you
        drive the algorithm from your own loop. Must be idempotent.
        """

    def fast_weights(self, learner: Learner) -> FastWeights:
        """The weights the inner loop adapts: the learner's fast weights unless the algorithm chooses (ANIL)."""
        return learner.fast_parameters()

    def inner_update(self, training: bool = True) -> InnerUpdate:
        """The inner update rule: SGD with ``inner_lr`` (at evaluation ``eval_inner_lr`` if set)."""
        eval_lr = getattr(self, "eval_inner_lr", None)
        return SGD(self.inner_lr if training or eval_lr is None else eval_lr)

    def evaluation_steps(self) -> int:
        """Adaptation steps at evaluation: ``eval_inner_steps``, else ``inner_steps``."""
        return getattr(self, "eval_inner_steps", None) or self.inner_steps

    def adapt_steps(self, learner: Learner, support: Split, steps: int | None = None) -> Iterator[FastWeights]:
        """The public adaptation trajectory at evaluation: detached fast weights after each step.

        First order, from the current meta-parameters, with the evaluation rule
        (``inner_update(training=False)``); works under ``torch.no_grad()`` and
        ``torch.inference_mode()``. Adaptation curves and benchmarks read it, so every step count
        comes from one trajectory.
        """
        steps = self.evaluation_steps() if steps is None else steps
        update = self.inner_update(training=False)
        with torch.inference_mode(False):
            support = {name: tensor.clone() if tensor.is_inference() else tensor for name, tensor in support.items()}
            weights = detached_start(self.fast_weights(learner))
        for step in range(steps):
            # Grad mode is set around each step, not around the yield: the caller's own mode holds between steps.
            with torch.inference_mode(False), torch.enable_grad():
                adapted = inner_step(learner, weights, support, update=update, step=step, create_graph=False)
                weights = detached_start(adapted)
            yield {name: weight.detach() for name, weight in weights.items()}

    def adapt(self, learner: Learner, support: Split, steps: int | None = None) -> FastWeights:
        """Fast weights adapted to ``support``: the last point of :meth:`adapt_steps` (detached).

        ``steps=0`` gives the current fast weights.
        """
        adapted = {name: weight.detach() for name, weight in self.fast_weights(learner).items()}
        for adapted in self.adapt_steps(learner, support, steps):  # noqa: B007
            pass
        return adapted

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
        parameters = [p for module in (learner, self) for p in module.parameters() if p.requires_grad]
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
