"""Multi-task (joint) training: the "pretrained" baseline of the MAML paper."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from lightning_meta.data.tasks import Episode, Split, channel_sequences, joined
from lightning_meta.learners.base import FastWeights, Learner
from lightning_meta.training.inner_loop import InnerLoopAlgorithm


class MultiTask(InnerLoopAlgorithm):
    """Ordinary training on every task: the "pretrained" baseline of Finn, Abbeel & Levine,
    "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017 (section 5.1).

    No inner loop while training. The surrogate of a task is the learner's plain mean loss on its
    support *and* query examples together, at the current weights: θ ← θ − β ∇θ mean_tasks
    L_{support ∪ query}(θ), so the meta-gradient is ordinary multi-task training's gradient.
    The two splits are joined into one along the example dimension, their token fields padded to
    the wider split's width first (:func:`~lightning_meta.data.tasks.joined`), and the learner's
    loss runs once on all the examples: the mean over examples (regression, classification) or
    over every output token of support and query together (a language model), whatever widths the
    splits were collated at. Fields only one split has are left out of the joint split.

    At evaluation it adapts like the MAML family, with SGD steps on the support from the trained
    weights, so it is scored on the same footing. ``train/query_*`` reports the query metrics at
    the current weights (on the steps the host logs: ``report_query``).

    Args:
        inner_lr: SGD step size of the adaptation at validation/test time (training has no inner loop).
        inner_steps: default number of adaptation steps; used only to adapt, never in training.
        eval_inner_steps: steps used to adapt at validation/test time (default: ``inner_steps``).
        eval_inner_lr: step size used to adapt at validation/test time (default: ``inner_lr``).
        direction: ``"channel"``: train (and adapt) on each example's channel sequence, its output then its
            input with the loss on the input (Channel Multi-task, Min et al. 2022;
            ``TextToTextTasksDataModule(channel=True)``); ``"direct"`` (default): on the example as written.
            Evaluation reports every scoring rule either way.

    Example::

        from lightning_meta.algorithms import MultiTask
        joint = MultiTask(inner_lr=0.01, eval_inner_steps=10)
        joint.meta_loss(learner, task_batch).loss.backward()   # the plain loss's gradient
        fast_weights = joint.adapt(learner, episode.support)
    """

    def __init__(
        self,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        eval_inner_lr: float | None = None,
        direction: Literal["direct", "channel"] = "direct",
    ) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps, eval_inner_lr)
        if direction not in ("direct", "channel"):
            raise ValueError(
                f"MultiTask direction={direction!r} is not a direction: use 'direct' or 'channel' "
                "(--model.algorithm.init_args.direction)."
            )
        self.direction = direction

    def _rows(self, split: Split) -> Split:
        """The sequences that carry the loss: ``split``'s own, or its channel sequences."""
        return split if self.direction == "direct" else channel_sequences(split, "MultiTask(direction='channel')")

    def adapt_steps(
        self, learner: Learner, support: Split, steps: int | None = None, *, parallel: bool = False
    ) -> Iterator[FastWeights]:
        return super().adapt_steps(learner, self._rows(support), steps, parallel=parallel)

    def task_loss(
        self, learner: Learner, episode: Episode, *, parallel: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss = joint_loss(learner, self._rows(episode.support), self._rows(episode.query))
        if not self.report_query:
            return loss, {}
        # A second, gradient-free forward on the query alone: the logged metrics stay comparable with
        # the other algorithms' query_* (the joint loss mixes in the support).
        with torch.no_grad():
            _, metrics = learner.loss(self._rows(episode.query))
        return loss, {f"query_{name}": value for name, value in metrics.items()}


def joint_loss(learner: Learner, support: Split, query: Split) -> Tensor:
    """The learner's loss on the examples of both splits as one split (see :class:`MultiTask`)."""
    # One rule whatever the widths: weighting each split's token mean by its example count would tie
    # the objective to how a batch was cut (by 13-25% of the meta-gradient on small LMs).
    loss, _ = learner.loss(joined(support, query))
    return loss
