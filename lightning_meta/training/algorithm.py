"""The algorithm contract: a task batch in, a surrogate loss out.

Every algorithm turns a task batch into a *surrogate loss* whose gradient with respect to the
meta-parameters is the algorithm's meta-gradient. Lightning's automatic optimization, gradient
accumulation, clipping, AMP scaling and DDP gradient sync then work unchanged.

The inner loop (and :class:`~lightning_meta.training.inner_loop.InnerLoopAlgorithm`, the base of
the algorithms that adapt weights with it) lives in :mod:`lightning_meta.training.inner_loop`; how
the tasks of a meta-batch run (vmap, task by task, all at once) in
:mod:`lightning_meta.training.meta_batch`.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_meta.data.tasks import Episode, Split, TaskBatch, generation_rule
from lightning_meta.learners.base import DataCheck, FastWeights, Learner, is_normalization
from lightning_meta.training import meta_batch as execution
from lightning_meta.training.meta_batch import MetaBatch, MetaLoss

__all__ = ["MetaAlgorithm", "MetaBatch", "MetaLoss"]


class MetaAlgorithm(nn.Module, ABC):
    """Base of every meta-learning algorithm.

    Subclasses implement :meth:`task_loss` (the surrogate for one episode). Algorithms that adapt
    weights with the shared inner loop subclass
    :class:`~lightning_meta.training.inner_loop.InnerLoopAlgorithm`, which adds the inner-loop
    options, the update rule and the adaptation trajectory; the others (ProtoNet, MetaICL)
    subclass this class directly and say how they adapt in :meth:`adapt` or :meth:`evaluate`.

    An algorithm is an ``nn.Module``: parameters it owns (learned inner learning rates) are
    created in :meth:`bind`, optimized by the host module beside the learner's, saved in
    checkpoints and restored with them, and moved, synchronized and sharded like the learner's.
    Constructor arguments must be stored as attributes of the same name: configs and
    checkpoints rebuild an algorithm from them.
    """

    #: Whether the algorithm adapts fast weights (has an inner loop). Hosts keep fast weights
    #: replicated under FSDP and in float32 under low precision only when it does.
    adapts_weights: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        #: The meta-training step, set by the host before each meta-loss; schedules read it.
        self.outer_step = 0
        #: Whether :meth:`task_loss` reports the figures that cost extra forwards (Reptile's and MultiTask's
        #: query loss, the MAML family's support loss after adaptation). Off unless asked: the host turns it on
        #: for the steps it logs; a caller of :meth:`meta_loss` outside the host sets it when it reads them.
        self.report_query = False
        # meta_batch="auto" (lightning_meta.training.meta_batch): per (learner, fast weights, derivative
        # order, training mode, meta-loss or evaluation), "" once vmap was checked exact, else why not.
        self._vmap_verdicts: dict[tuple[int, tuple[str, ...], bool, bool, str], str] = {}

    @abstractmethod
    def task_loss(
        self, learner: Learner, episode: Episode, *, parallel: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Surrogate loss of one episode and its detached figures (at least ``query_loss``).

        ``parallel=True``: the tasks of the meta-batch run together under ``torch.func.vmap``
        (``meta_batch="vmap"``); pass it on to the inner loop.
        """

    def bind(self, learner: Learner) -> None:  # noqa: B027 (optional hook)
        """Create the meta-parameters that depend on the learner (one learning rate per fast weight).

        Called once by the host module before the optimizer is built; call it yourself when you
        drive the algorithm from your own loop. Must be idempotent.
        """

    def fast_weights(self, learner: Learner) -> FastWeights:
        """The weights adaptation changes: the learner's fast weights unless the algorithm chooses (ANIL)."""
        return learner.fast_parameters()

    def adapt_steps(
        self, learner: Learner, support: Split, steps: int | None = None, *, parallel: bool = False
    ) -> Iterator[FastWeights]:
        """The adaptation trajectory (fast weights after each step): empty for an algorithm without an inner loop."""
        return iter(())

    def adapt(self, learner: Learner, support: Split, steps: int | None = None) -> FastWeights:
        """Fast weights adapted to ``support``: the last point of :meth:`adapt_steps` (detached).

        ``steps=0``, or an algorithm without an inner loop, gives the current fast weights.
        """
        adapted = {name: weight.detach() for name, weight in self.fast_weights(learner).items()}
        for adapted in self.adapt_steps(learner, support, steps):  # noqa: B007
            pass
        return adapted

    def check_learner(self, learner: Learner) -> None:  # noqa: B027 (optional hook)
        """Raise a clear error when this algorithm cannot run with ``learner``."""

    def data_checks(self, learner: Learner, batch: TaskBatch) -> list[DataCheck]:
        """What every episode of ``batch`` must have for this algorithm, beyond the learner's checks.

        Evaluated on the device and folded into :meth:`Learner.check_data` (one host sync per batch,
        none per episode or inner step). None by default.
        """
        return []

    def check_data(self, learner: Learner, batch: TaskBatch) -> None:
        """The learner's and this algorithm's data checks on ``batch``: :class:`DataError` naming the episode."""
        learner.check_data(batch, self.data_checks(learner, batch))

    def second_order(self) -> bool:
        """Whether this meta-step differentiates through the inner loop's gradients."""
        return False

    def vmap_refusal(self, learner: Learner) -> str | None:
        """Why the tasks cannot run in parallel under ``torch.func.vmap`` with ``learner``; ``None`` if they can.

        vmap is exact only for learners without in-place buffer updates, random operations or
        data-dependent control flow (:meth:`Learner.vmap_refusal`). Second-order meta-gradients
        are refused when a normalization layer's weight is a fast weight: vmap gets them wrong
        (LayerNorm; torch 2.13 and 2.14, float64 too). Normalization layers of the shared base
        (LoRA or a head as the fast weights) are exact: there only the fast weights and the
        activations carry the task dimension. Algorithms whose task loss cannot run under vmap
        override this; one whose :meth:`task_loss` takes no ``parallel`` argument is refused.
        """
        if "parallel" not in inspect.signature(self.task_loss).parameters:
            return f"{type(self).__name__}.task_loss takes no parallel argument (the inner loop's mode under vmap)"
        reason = learner.vmap_refusal()
        if reason is None and self.second_order():
            fast = set(self.fast_weights(learner))
            norms = [(name, module) for name, module in learner.model.named_modules() if is_normalization(module)]
            normalized = [f"{name}.{weight}".removeprefix(".") for name, module in norms
                          for weight, _ in module.named_parameters(recurse=False)]  # fmt: skip
            adapted = [name for name in normalized if name in fast]
            if adapted:
                reason = (
                    f"second-order meta-gradients with a normalization layer's weight as a fast weight ({adapted[0]}) "
                    "come out wrong under vmap"
                )
        return reason

    def meta_loss(self, learner: Learner, batch: TaskBatch, *, meta_batch: MetaBatch = "auto") -> MetaLoss:
        """Average surrogate over the episodes of ``batch``; its gradient is the meta-gradient.

        ``meta_batch`` says how the tasks run; every way gives the same meta-gradient:

        - ``"vmap"``: all tasks at once, in parallel with ``torch.func.vmap`` (inner gradients by
          ``torch.func.grad``). Fastest for small models; memory grows with the meta-batch. Only
          where exact (:meth:`vmap_refusal`); forcing it elsewhere raises ``ValueError``.
        - ``"task_by_task"``: each task's meta-gradient is taken with ``torch.autograd.grad`` and
          its graph freed before the next task starts, so memory stays flat in the meta-batch size.
        - ``"all_at_once"``: every task's graph is kept until the caller's ``backward``: needed
          where ``autograd.grad`` cannot reach the parameters (FSDP-sharded ones, float16 loss
          scaling). Also what runs without autograd (``torch.no_grad``).
        - ``"auto"`` (default): ``"vmap"`` when :meth:`vmap_refusal` has no objection, the model
          has at most :data:`~lightning_meta.training.meta_batch.VMAP_MAX_PARAMETERS` trainable
          parameters, and, on the first batch of each (learner, fast weights, derivative order,
          training mode), vmap's meta-gradient equals the task-by-task loop's; otherwise
          ``"task_by_task"``, with the reason logged once.

        With ``"vmap"`` and ``"task_by_task"`` the returned loss is ``Σ_p ⟨p, stop_grad(G_p)⟩``
        shifted to the mean surrogate's value, whose gradient is the meta-gradient ``G``: one
        ``backward`` on it (by Lightning, with AMP, accumulation, clipping and DDP unchanged) gives
        it. A trainable parameter the surrogate does not reach (Reptile's backbone when only the
        head is a fast weight) gets no gradient, as under ``"all_at_once"`` (so weight decay leaves
        it alone in every mode); such parameters are listed in :attr:`MetaLoss.unreached`.

        Checks the batch's data first (:meth:`check_data`: one host sync for the batch).
        """
        execution.check_mode(meta_batch)
        self.check_learner(learner)
        self.check_data(learner, batch)
        return execution.run(self, learner, batch, meta_batch)

    def evaluate(self, learner: Learner, episode: Episode, steps: int | None = None) -> dict[str, Tensor]:
        """Query figures before (``*_pre``) and after (``*_post``) adaptation to the support."""
        self.check_learner(learner)
        rule = generation_rule(episode.metadata)
        before = learner.evaluation_metrics(episode.query, generation=rule)
        adapted = self.adapt(learner, episode.support, steps)
        after = learner.evaluation_metrics(episode.query, adapted, generation=rule)
        return {f"{name}_pre": value for name, value in before.items()} | {
            f"{name}_post": value for name, value in after.items()
        }

    def predict(self, learner: Learner, episode: Episode, steps: int | None = None) -> Tensor:
        """Model outputs on the query after adapting to the support."""
        adapted = self.adapt(learner, episode.support, steps)
        with torch.no_grad():
            return learner.predict(episode.query, adapted)

    def __repr__(self) -> str:
        from lightning_meta.training.config import init_args

        args = ", ".join(f"{name}={value!r}" for name, value in init_args(self).items())
        return f"{type(self).__name__}({args})"
