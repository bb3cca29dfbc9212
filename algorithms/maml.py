"""Model-Agnostic Meta-Learning."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_meta.data.tasks import Episode
from lightning_meta.learners.base import Learner
from lightning_meta.training.inner_loop import InnerLoopAlgorithm, inner_loop_and_start_loss


class MAML(InnerLoopAlgorithm):
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

    Metrics: ``query_loss`` (and the learner's other query metrics), and while ``report_query``
    is on (the host's logging steps) ``support_loss_pre`` / ``support_loss_post``, the support
    loss before and after the inner loop: the first from the inner loop's first step, the second at
    the cost of one forward without a graph.

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
        super().__init__(inner_lr, inner_steps, eval_inner_steps, eval_inner_lr)
        self.first_order = first_order

    def second_order(self) -> bool:
        """Whether this step differentiates through the inner loop (subclasses may schedule it)."""
        return not self.first_order

    def check_learner(self, learner: Learner) -> None:
        if not self.first_order:
            learner.prepare_second_order()

    def task_loss(
        self, learner: Learner, episode: Episode, *, parallel: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        # First order: the inner gradients are constants, so θ' = θ − α Σ g has the identity as its
        # derivative in θ (FOMAML: ∇L_query(θ')), while a learned α still gets −Σ g.
        fast_weights = self.fast_weights(learner)
        create_graph = self.second_order() and torch.is_grad_enabled()
        with torch.enable_grad():  # the inner gradients, also under torch.no_grad (an evaluation's meta-loss)
            adapted, support_loss_pre = inner_loop_and_start_loss(
                learner,
                fast_weights,
                episode.support,
                update=self.inner_update(),
                steps=self.inner_steps,
                create_graph=create_graph,
                parallel=parallel,
            )
        loss, query = learner.loss(episode.query, adapted)
        metrics = {f"query_{name}": value for name, value in query.items()}
        if self.report_query:  # on the steps the host logs: did the inner loop fit the support? One more forward.
            metrics["support_loss_pre"] = support_loss_pre  # the inner loop's first step computed it
            with torch.no_grad():
                metrics["support_loss_post"] = learner.loss(episode.support, adapted)[0]
        return loss, metrics
