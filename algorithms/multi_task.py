"""Multi-task (joint) training: the "pretrained" baseline of the MAML paper."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_meta.data.tasks import Episode, Split
from lightning_meta.learners.base import Learner
from lightning_meta.training.inner_loop import InnerLoopAlgorithm


class MultiTask(InnerLoopAlgorithm):
    """Ordinary training on every task: the "pretrained" baseline of Finn, Abbeel & Levine,
    "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017 (section 5.1).

    No inner loop while training. The surrogate of a task is the learner's plain mean loss on its
    support *and* query examples together, at the current weights: θ ← θ − β ∇θ mean_tasks
    L_{support ∪ query}(θ), so the meta-gradient is ordinary multi-task training's gradient.
    The two splits are concatenated along the example dimension when their fields have the same
    shapes past it (one forward on all the examples); otherwise the loss is the example-weighted
    mean (n_s·L_support + n_q·L_query) / (n_s + n_q). Both equal the mean loss over all the task's
    examples, gradient included, for losses that average over examples (regression,
    classification). A token-level LM loss takes the concatenated path when the blocks have one
    length (the token mean over all blocks); with splits of different block lengths the fallback
    weights the two splits' token means by their numbers of blocks, not of tokens.

    At evaluation it adapts like the MAML family, with SGD steps on the support from the trained
    weights, so it is scored on the same footing. ``train/query_*`` reports the query figures at
    the current weights (on the steps the host logs: ``report_query``).

    Args:
        inner_lr: SGD step size of the adaptation at validation/test time (training has no inner loop).
        inner_steps: default number of adaptation steps; used only to adapt, never in training.
        eval_inner_steps: steps used to adapt at validation/test time (default: ``inner_steps``).
        eval_inner_lr: step size used to adapt at validation/test time (default: ``inner_lr``).

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
    ) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps, eval_inner_lr)

    def task_loss(
        self, learner: Learner, episode: Episode, *, parallel: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss = joint_loss(learner, episode.support, episode.query)
        if not self.report_query:
            return loss, {}
        # A second, gradient-free forward on the query alone: the logged figures stay comparable with
        # the other algorithms' query_* (the joint loss mixes in the support).
        with torch.no_grad():
            _, metrics = learner.loss(episode.query)
        return loss, {f"query_{name}": value for name, value in metrics.items()}


def joint_loss(learner: Learner, support: Split, query: Split) -> Tensor:
    """The learner's mean loss over the examples of both splits (see :class:`MultiTask`)."""
    if support.keys() == query.keys() and all(support[name].shape[1:] == query[name].shape[1:] for name in support):
        loss, _ = learner.loss({name: torch.cat([support[name], query[name]]) for name in support})
        return loss
    support_count, query_count = len(next(iter(support.values()))), len(next(iter(query.values())))
    support_loss, _ = learner.loss(support)
    query_loss, _ = learner.loss(query)
    return (support_count * support_loss + query_count * query_loss) / (support_count + query_count)
