"""Reptile."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_meta.data.tasks import Episode
from lightning_meta.learners.base import Learner
from lightning_meta.training.inner_loop import InnerLoopAlgorithm, detached_start, inner_loop


class Reptile(InnerLoopAlgorithm):
    """Reptile: Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018.

    Inner loop, per task: ``inner_steps`` SGD steps on the support loss, θ → θ'.
    Outer update: θ ← θ + ε (θ' − θ), averaged over the meta-batch.

    The surrogate is ½‖θ − stop_grad(θ')‖², whose gradient is exactly θ − θ'. A plain SGD
    meta-optimizer with learning rate ε (``torch.optim.SGD(lr=ε)``, no momentum) therefore performs
    Nichol et al.'s update exactly; Adam on the same gradient is the common variant. The query
    split is not used for the update; its post-adaptation loss is reported as ``query_loss`` (only
    while ``report_query`` is on: the host turns it on for the steps it logs; off by default, saving a
    forward per task).

    Args:
        inner_lr: inner SGD step size.
        inner_steps: inner SGD steps per task during meta-training (Reptile needs > 1 to
            differ from joint training).
        eval_inner_steps: steps used to adapt at validation/test time (default: ``inner_steps``).
        eval_inner_lr: step size used to adapt at validation/test time (default: ``inner_lr``).

    Example::

        from lightning_meta.algorithms import Reptile
        reptile = Reptile(inner_lr=0.02, inner_steps=5)
        reptile.meta_loss(learner, task_batch).loss.backward()   # grad = θ − θ'
        torch.optim.SGD(learner.parameters(), lr=0.1).step()      # θ ← θ + 0.1 (θ' − θ)
    """

    def __init__(
        self,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        eval_inner_lr: float | None = None,
    ) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps, eval_inner_lr)

    def task_loss(
        self, learner: Learner, episode: Episode, *, parallel: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        meta_weights = self.fast_weights(learner)
        with torch.enable_grad():
            adapted = inner_loop(
                learner,
                detached_start(meta_weights, parallel=parallel),
                episode.support,
                update=self.inner_update(),
                steps=self.inner_steps,
                create_graph=False,
                parallel=parallel,
            )
        adapted = {name: weight.detach() for name, weight in adapted.items()}
        surrogate = sum(0.5 * (meta_weights[name] - adapted[name]).pow(2).sum() for name in meta_weights)
        if not self.report_query:  # the update does not use the query: skip its forward when nothing logs it
            return surrogate, {}
        with torch.no_grad():
            _, metrics = learner.loss(episode.query, adapted)
        return surrogate, {f"query_{name}": value for name, value in metrics.items()}
