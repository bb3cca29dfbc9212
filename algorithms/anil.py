"""ANIL: MAML that adapts only the head."""

from __future__ import annotations

from lightning_meta.algorithms.maml import MAML
from lightning_meta.learners.base import FastWeights, Learner
from lightning_meta.learners.fast_weights import resolve_fast_weights


class ANIL(MAML):
    """ANIL ("Almost No Inner Loop"): Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature
    Reuse? Towards Understanding the Effectiveness of MAML", ICLR 2020.

    MAML whose inner loop adapts only the head (the last module with weights, or ``head``),
    whatever fast weights the learner names; the outer loop still meta-learns the whole network
    (the body through the second-order path). ``--model.algorithm=ANIL`` is the same as MAML
    with ``fast_weights=head`` on the learner, without touching the learner.

    Args:
        inner_lr, inner_steps, eval_inner_steps, first_order, eval_inner_lr: as for :class:`MAML`.
        head: the name of the head submodule (``model.head``'s path inside the learner's model);
            by default the learner's ``head``, else its last module with weights.

    Example::

        from lightning_meta.algorithms import ANIL
        anil = ANIL(inner_lr=0.1, inner_steps=5)
        anil.meta_loss(learner, task_batch).loss.backward()
    """

    def __init__(
        self,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        eval_inner_lr: float | None = None,
        head: str | None = None,
    ) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps, first_order, eval_inner_lr)
        self.head = head

    def fast_weights(self, learner: Learner) -> FastWeights:
        named = dict(learner.model.named_parameters())
        names = resolve_fast_weights(learner.model, "head", self.head if self.head is not None else learner.head)
        return {name: named[name] for name in names}
