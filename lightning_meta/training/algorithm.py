"""The algorithm contract: a task batch in, a surrogate loss out.

Every algorithm turns a task batch into a *surrogate loss* whose gradient with respect to the
meta-parameters is the algorithm's meta-gradient. Lightning's automatic optimization, gradient
accumulation, clipping, AMP scaling and DDP gradient sync then work unchanged.

The inner loop (and :class:`~lightning_meta.training.inner_loop.InnerLoopAlgorithm`, the base of
the algorithms that adapt weights with it) lives in :mod:`lightning_meta.training.inner_loop`; how
the tasks of a meta-batch run (vmap, task by task, all at once) in
:mod:`lightning_meta.training.meta_batch` (:class:`MetaBatchRunner`, which imports nothing from here).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_meta.data.tasks import Episode, Split, TaskBatch, generation_rule
from lightning_meta.learners.base import DataCheck, FastWeights, Learner
from lightning_meta.training.meta_batch import MetaBatch, MetaBatchMode, MetaBatchRunner, MetaLoss, check_mode

__all__ = ["MetaAlgorithm", "MetaBatch", "MetaBatchMode", "MetaBatchRunner", "MetaLoss"]


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
        #: The meta-training step of the meta-loss being computed (schedules such as MAML++'s annealing read it):
        #: :meth:`meta_loss` sets it from its ``outer_step`` argument.
        self.outer_step = 0
        #: Whether :meth:`task_loss` reports the metrics that cost extra forwards (Reptile's and MultiTask's
        #: query loss, the MAML family's support loss after adaptation): :meth:`meta_loss` sets it from its
        #: ``report_query`` argument. The host asks for them on the steps it logs.
        self.report_query = False
        # Runners for callers of meta_loss(meta_batch="auto" | ...) outside a host (which passes its own).
        self._runners: dict[str, MetaBatchRunner] = {}

    @abstractmethod
    def task_loss(
        self, learner: Learner, episode: Episode, *, parallel: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Surrogate loss of one episode and its detached metrics (at least ``query_loss``).

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
        """Why this algorithm's task loss cannot run under ``torch.func.vmap`` with ``learner``; ``None`` if it can.

        Only the algorithm's own reasons (ProtoNet's ``bincount``): :meth:`MetaBatchRunner.refusal` adds the
        learner's and the rule on second-order meta-gradients through normalization layers.
        """
        return None

    def meta_loss(
        self,
        learner: Learner,
        batch: TaskBatch,
        *,
        meta_batch: MetaBatchMode | MetaBatchRunner = "auto",
        outer_step: int | None = None,
        report_query: bool | None = None,
    ) -> MetaLoss:
        """Average surrogate over the episodes of ``batch``; its gradient is the meta-gradient.

        ``outer_step``: the meta-training step (schedules read it as :attr:`outer_step`); ``report_query``:
        whether to compute the metrics that cost extra forwards. ``None`` keeps the current value (0 and off
        unless set). ``meta_batch`` says how the tasks run, a mode or the :class:`MetaBatchRunner` that keeps
        the ``"auto"`` verdicts (the host module's); every way gives the same meta-gradient:

        - ``"vmap"``: all tasks at once, in parallel with ``torch.func.vmap`` (inner gradients by
          ``torch.func.grad``). Fastest for small models; memory grows with the meta-batch. Only
          where exact (:meth:`MetaBatchRunner.refusal`); forcing it elsewhere raises ``ValueError``.
        - ``"task_by_task"``: each task's meta-gradient is taken with ``torch.autograd.grad`` and
          its graph freed before the next task starts, so memory stays flat in the meta-batch size.
        - ``"all_at_once"``: every task's graph is kept until the caller's ``backward``: needed
          where ``autograd.grad`` cannot reach the parameters (FSDP-sharded ones, float16 loss
          scaling). Also what runs without autograd (``torch.no_grad``, and ``torch.inference_mode``, where
          the batch is copied out of inference mode first, as Lightning's validation and test steps need).
        - ``"auto"`` (default): ``"vmap"`` when :meth:`MetaBatchRunner.refusal` has no objection, the
          model has at most :data:`~lightning_meta.training.meta_batch.VMAP_MAX_PARAMETERS` trainable
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
        if torch.is_inference_mode_enabled():  # a LightningModule's validation step: inner loops need autograd
            with torch.inference_mode(False), torch.no_grad():
                batch = batch.detached_clone()
                return self.meta_loss(
                    learner, batch, meta_batch=meta_batch, outer_step=outer_step, report_query=report_query
                )
        if isinstance(meta_batch, str):
            check_mode(meta_batch)
            meta_batch = self._runners.setdefault(meta_batch, MetaBatchRunner(meta_batch))
        if outer_step is not None:
            self.outer_step = outer_step
        if report_query is not None:
            self.report_query = report_query
        self.check_learner(learner)
        self.check_data(learner, batch)
        return meta_batch.meta_loss(self, learner, batch)

    def evaluate(self, learner: Learner, episode: Episode, steps: int | None = None) -> dict[str, Tensor]:
        """Query metrics before (``*_pre``) and after (``*_post``) adaptation to the support."""
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
