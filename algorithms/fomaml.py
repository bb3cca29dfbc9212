"""First-order MAML."""

from __future__ import annotations

from lightning_meta.algorithms.maml import MAML


class FOMAML(MAML):
    """First-order MAML (Finn et al., ICML 2017, section 5.2; Nichol et al. 2018 call it FOMAML).

    Same inner loop as :class:`MAML`, but the meta-gradient ignores the inner loop's second
    derivatives: the surrogate is L_query(θ + stop_grad(θ' − θ)), so its gradient is
    ∇L_query(θ') evaluated at the adapted weights and applied to θ. Memory stays that of one
    forward/backward per inner step.

    Args:
        inner_lr, inner_steps, eval_inner_steps, eval_inner_lr: as for :class:`MAML`.

    Example::

        from lightning_meta.algorithms import FOMAML
        fomaml = FOMAML(inner_lr=0.01, inner_steps=5, eval_inner_steps=10)
        fomaml.meta_loss(learner, task_batch).loss.backward()
    """

    def __init__(
        self,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        eval_inner_lr: float | None = None,
    ) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps, first_order=True, eval_inner_lr=eval_inner_lr)
