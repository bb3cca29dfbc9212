"""Meta-batch execution: how the tasks of a meta-batch (and the episodes of an evaluation batch) run.

One owner, :class:`MetaBatchRunner`: every way it runs a meta-batch gives the same meta-gradient (and the
same metrics): all tasks at once in parallel under ``torch.func.vmap``, task by task with each task's graph
freed before the next, or every task's graph kept until one ``backward``. It holds the one rule for where
vmap is exact (:meth:`MetaBatchRunner.refusal`, asking the algorithm and the learner for their own refusals)
and the ``"auto"`` verdicts. :meth:`MetaAlgorithm.meta_loss` runs the algorithm's task loss through a runner
(the host module's, or one the algorithm keeps for callers of its plain API); the host module evaluates
through its runner too. The algorithms only say how one task runs (``task_loss``, with ``parallel`` when the
tasks run under vmap). This module asks no more of an algorithm than :class:`TaskLossAlgorithm`, and imports
none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_debug
from torch import Tensor, nn

from lightning_meta.data.tasks import Episode, Split, TaskBatch, generation_rule
from lightning_meta.learners.base import FastWeights, Learner
from lightning_meta.learners.fast_weights import is_normalization

MetaBatchMode = Literal["auto", "vmap", "task_by_task", "all_at_once"]
"""How a :class:`MetaBatchRunner` runs the tasks of a meta-batch (all give the same meta-gradient)."""
#: The earlier name of :data:`MetaBatchMode` (a mode, not a batch), kept for code that imports it.
MetaBatch = MetaBatchMode

#: ``meta_batch="auto"`` runs the tasks with ``vmap`` only for models with at most this many trainable
#: parameters. There vmap batches many tiny kernels into a few (the sinusoid MLP's meta-step runs
#: several times faster); on larger models each task's kernels already keep the processor busy, and
#: vmap would only add memory (every task's graph at once, against one task's task by task).
VMAP_MAX_PARAMETERS = 2**17


class TaskLossAlgorithm(Protocol):
    """What a runner asks of an algorithm (:class:`~lightning_meta.training.algorithm.MetaAlgorithm` has it all)."""

    def task_loss(
        self, learner: Learner, episode: Episode, *, parallel: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]: ...

    def vmap_refusal(self, learner: Learner) -> str | None: ...

    def second_order(self) -> bool: ...

    def fast_weights(self, learner: Learner) -> FastWeights: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


@dataclass
class MetaLoss:
    """``loss``: the surrogate to call ``backward`` on; ``metrics``: detached means over the meta-batch.

    ``unreached``: trainable parameters that ``loss`` does not depend on (known on the ``vmap`` and
    ``task_by_task`` paths; empty otherwise). They get no gradient from ``loss.backward()``; DDP,
    which expects a gradient for every parameter, needs them tied in (the host module does it).
    """

    loss: Tensor
    metrics: dict[str, Tensor]
    unreached: tuple[Tensor, ...] = ()


def check_mode(meta_batch: str) -> None:
    """Raise a clear error for a ``meta_batch`` that is not one of :data:`MetaBatchMode`."""
    if meta_batch not in get_args(MetaBatchMode):
        raise ValueError(f"meta_batch must be one of {get_args(MetaBatchMode)}, got {meta_batch!r}.")


VerdictKey = tuple[int, tuple[str, ...], bool, bool, str]


@dataclass
class MetaBatchRunner:
    """Runs meta-batches and evaluation batches as ``mode`` says, and owns the ``"auto"`` verdicts.

    ``verdicts``: per (learner, fast weights, derivative order, training mode, ``"meta_loss"`` or
    ``"evaluate"``), ``""`` once vmap was checked exact on a first batch, else why it is not used.
    """

    mode: MetaBatchMode = "auto"
    verdicts: dict[VerdictKey, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_mode(self.mode)

    def refusal(self, algorithm: TaskLossAlgorithm, learner: Learner) -> str | None:
        """Why the tasks cannot run in parallel under ``torch.func.vmap`` exactly; ``None`` if they can.

        The one exactness rule: the algorithm's own refusal (:meth:`MetaAlgorithm.vmap_refusal`), the learner's
        (:meth:`Learner.vmap_refusal`: in-place buffer updates, random operations, data-dependent control flow),
        and second-order meta-gradients with a normalization layer's weight as a fast weight, which vmap gets
        wrong (LayerNorm; torch 2.13 and 2.14, float64 too). Normalization layers of the shared base (LoRA or a
        head as the fast weights) are exact: there only the fast weights and the activations carry the task
        dimension.
        """
        reason = algorithm.vmap_refusal(learner) or learner.vmap_refusal()
        if reason is None and algorithm.second_order():
            fast = set(algorithm.fast_weights(learner))
            norms = [(name, module) for name, module in learner.model.named_modules() if is_normalization(module)]
            normalized = [
                f"{name}.{weight}".removeprefix(".")
                for name, module in norms
                for weight, _ in module.named_parameters(recurse=False)
            ]
            adapted = [name for name in normalized if name in fast]
            if adapted:
                reason = (
                    f"second-order meta-gradients with a normalization layer's weight as a fast weight ({adapted[0]}) "
                    "come out wrong under vmap"
                )
        return reason

    def meta_loss(self, algorithm: TaskLossAlgorithm, learner: Learner, batch: TaskBatch) -> MetaLoss:
        """The mean surrogate of ``batch``'s tasks (see :meth:`MetaAlgorithm.meta_loss` for the modes)."""
        parameters = _trainable(algorithm, learner)
        if self.mode == "all_at_once" or not (torch.is_grad_enabled() and parameters):
            return _loop(algorithm, learner, batch, None)
        if self.mode == "vmap":
            self._refuse_vmap_where_inexact(algorithm, learner)
            try:
                return _vmapped(algorithm, learner, batch, parameters)
            except TypeError as error:  # a task_loss written before its parallel argument
                if "'parallel'" not in str(error):
                    raise
                self._refuse_vmap_where_inexact(
                    algorithm,
                    learner,
                    f"{type(algorithm).__name__}.task_loss takes "
                    "no parallel argument (the inner loop's mode under vmap)",
                )
        if self.mode == "auto":
            return self._auto(algorithm, learner, batch, parameters)
        return _loop(algorithm, learner, batch, parameters)

    def evaluate(
        self,
        algorithm: TaskLossAlgorithm,
        learner: Learner,
        batch: TaskBatch,
        figures_of: Callable[[Episode, bool], dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """``figures_of(episode, parallel)`` for every episode of ``batch``, stacked along the episodes.

        Where the mode resolves to vmap for this learner and algorithm (as for training, with its own verdict
        for evaluation: ``"auto"`` checks the first batch's metrics against the loop's), all the episodes run
        together in one vmapped call with ``parallel=True``; otherwise one after the other. The metrics are
        the same either way.
        """

        def looped() -> dict[str, Tensor]:
            episodes = [figures_of(episode, False) for episode in batch.episodes()]
            return {key: torch.stack([episode[key] for episode in episodes]) for key in episodes[0]}

        if any(generation_rule(episode.metadata) is not None for episode in batch.episodes()):
            return looped()  # a generated output is decoded token by token on the host: never under vmap

        def vmapped() -> dict[str, Tensor]:
            return _over_episodes(batch, lambda episode: figures_of(episode, True))

        if self.mode in ("task_by_task", "all_at_once"):
            return looped()
        if self.mode == "vmap":
            self._refuse_vmap_where_inexact(algorithm, learner)
            return vmapped()
        key = (id(learner), tuple(learner.fast_weight_names), False, learner.training, "evaluate")
        verdict = self.verdicts.get(key)
        if verdict is not None:
            return vmapped() if verdict == "" else looped()
        reason = static = self._static_refusal(algorithm, learner, _trainable(algorithm, learner))
        checking, low_precision = _in_float32(learner)
        parallel = metrics = None
        with checking:
            if reason is None:
                try:
                    parallel = vmapped()
                except (RuntimeError, NotImplementedError) as error:  # no batching rule, a host sync in the metrics
                    reason = f"torch.func.vmap cannot run the evaluation ({str(error).splitlines()[0]})"
            if reason is None or not low_precision:
                metrics = looped()
            if reason is None:
                reason = _metrics_disagreement(parallel, metrics)
        self._record(key, algorithm, reason, static=static is not None, evaluation=True)
        if low_precision:  # checked in float32: the metrics at the caller's precision
            return looped() if reason else vmapped()
        return metrics if reason else parallel

    def _auto(
        self, algorithm: TaskLossAlgorithm, learner: Learner, batch: TaskBatch, parameters: list[Tensor]
    ) -> MetaLoss:
        # Per mode too: dropout and batch-norm statistics, which vmap cannot run, act in training mode only.
        key = (id(learner), tuple(learner.fast_weight_names), algorithm.second_order(), learner.training, "meta_loss")
        verdict = self.verdicts.get(key)
        if verdict == "":
            return _vmapped(algorithm, learner, batch, parameters)
        if verdict is not None:
            return _loop(algorithm, learner, batch, parameters)
        reason = static = self._static_refusal(algorithm, learner, parameters)
        checking, low_precision = _in_float32(learner)
        with checking:
            if reason is None:
                try:
                    vmapped = _vmapped(algorithm, learner, batch, parameters)
                except (RuntimeError, NotImplementedError, TypeError) as error:  # no batching rule, data-dependent
                    # control flow, a task_loss written before its parallel argument
                    reason = f"torch.func.vmap cannot run the task loss ({str(error).splitlines()[0]})"
            if reason is None or not low_precision:
                looped = _loop(algorithm, learner, batch, parameters)
            if reason is None:
                reason = _disagreement(vmapped.loss, looped.loss, parameters)
        self._record(key, algorithm, reason, static=static is not None, evaluation=False)
        if low_precision:  # checked in float32: the meta-step at the caller's precision
            return (_loop if reason else _vmapped)(algorithm, learner, batch, parameters)
        return looped if reason else vmapped

    def _refuse_vmap_where_inexact(
        self, algorithm: TaskLossAlgorithm, learner: Learner, reason: str | None = None
    ) -> None:
        reason = reason or self.refusal(algorithm, learner)
        if reason is not None:
            raise ValueError(
                f"meta_batch='vmap' cannot run {type(algorithm).__name__} with this {type(learner).__name__}: "
                f"{reason}. Use meta_batch='task_by_task' (the same meta-gradient, memory flat in the "
                "meta-batch size) or 'auto'."
            )

    def _static_refusal(self, algorithm: TaskLossAlgorithm, learner: Learner, parameters: list[Tensor]) -> str | None:
        """Why ``"auto"`` does not try vmap: :meth:`refusal`, or a model too large to gain from it."""
        reason = self.refusal(algorithm, learner)
        size = sum(p.numel() for p in parameters)
        if reason is None and size > VMAP_MAX_PARAMETERS:
            reason = f"{size:,} trainable parameters, more than VMAP_MAX_PARAMETERS={VMAP_MAX_PARAMETERS:,}"
        return reason

    def _record(
        self, key: VerdictKey, algorithm: TaskLossAlgorithm, reason: str | None, *, static: bool, evaluation: bool
    ) -> None:
        """Keep the verdict; log why ``"auto"`` does not run in parallel, once per reason (training and evaluation
        share the static ones)."""
        if reason and reason not in self.verdicts.values():
            if static:  # known before trying: it holds for training and evaluation alike
                what = (
                    "runs the tasks of a meta-batch one by one (task_by_task), and the episodes of an evaluation batch,"
                )
            elif evaluation:
                what = "adapts the episodes of an evaluation batch one by one,"
            else:
                what = "runs the tasks of a meta-batch one by one (task_by_task),"
            # Debug level: an implementation note (same metrics, only slower), nothing a user can act on.
            name = type(algorithm).__name__
            rank_zero_debug(f"meta_batch='auto': {name} {what} not in parallel with vmap: {reason}.")
        self.verdicts[key] = reason or ""


def _trainable(algorithm: TaskLossAlgorithm, learner: Learner) -> list[Tensor]:
    return [p for module in (learner, algorithm) for p in module.parameters() if p.requires_grad]


def _over_episodes(batch: TaskBatch, function: Callable[[Episode], Tensor | dict]) -> Tensor | dict:
    """``function`` of every episode of ``batch`` in one call under ``torch.func.vmap``."""
    # Per-episode tensors only: metadata lists (names) cannot be split by vmap.
    metadata = {name: values for name, values in batch.metadata.items() if isinstance(values, Tensor)}

    def one(support: Split, query: Split, episode_metadata: dict[str, Tensor]) -> Tensor | dict:
        return function(Episode(dict(support), dict(query), batch.ways, batch.shots, episode_metadata))

    return torch.func.vmap(one)(batch.support, batch.query, metadata)


def _loop(
    algorithm: TaskLossAlgorithm, learner: Learner, batch: TaskBatch, parameters: list[Tensor] | None
) -> MetaLoss:
    """The tasks one after the other: task by task given ``parameters``, else all at once."""
    count = len(batch)
    losses: list[Tensor] = []
    sums: dict[str, Tensor] = {}
    gradients: list[Tensor | None] = [None] * len(parameters or ())
    for episode in batch.episodes():
        loss, metrics = algorithm.task_loss(learner, episode)
        if parameters is not None:
            task_gradients = torch.autograd.grad(loss / count, parameters, allow_unused=True)
            gradients = [_add(total, new) for total, new in zip(gradients, task_gradients, strict=True)]
            loss = loss.detach()
        losses.append(loss)
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0) + value
    mean = torch.stack(losses).mean()
    metrics = {name: value / count for name, value in sums.items()}
    return MetaLoss(mean, metrics) if parameters is None else _surrogate(parameters, gradients, mean, metrics)


def _vmapped(algorithm: TaskLossAlgorithm, learner: Learner, batch: TaskBatch, parameters: list[Tensor]) -> MetaLoss:
    """All tasks in parallel under ``torch.func.vmap``; the meta-gradient taken at once."""
    losses, metrics = _over_episodes(batch, lambda episode: algorithm.task_loss(learner, episode, parallel=True))
    mean = losses.mean()
    gradients = list(torch.autograd.grad(mean, parameters, allow_unused=True))
    return _surrogate(parameters, gradients, mean.detach(), {name: value.mean() for name, value in metrics.items()})


def _in_float32(learner: Learner) -> tuple[AbstractContextManager, bool]:
    """Where ``"auto"`` compares vmap with the loop: with low-precision autocast off (and whether it was on).

    The verdict is about exactness, and its tolerance is rounding in the parameters' dtype: under
    ``bf16-mixed`` two correct computations differ by bf16 rounding (3e-2 to 6e-2 relative on
    meta-gradients), which would refuse vmap everywhere. So the check runs once in float32 and the
    step (or evaluation) then runs again at the caller's precision on the path it chose. A learner holding
    bfloat16 weights (a frozen base kept in bf16: ``scaling.keep_frozen_linear_weights_in``) cannot run
    without autocast: its check stays at the caller's precision (and mostly keeps the loop).
    """
    device_type = next(learner.parameters()).device.type
    low_weights = any(p.dtype in (torch.bfloat16, torch.float16) for p in learner.parameters())
    if low_weights or not torch.is_autocast_enabled(device_type):
        return nullcontext(), False
    return torch.autocast(device_type, enabled=False), True


def _surrogate(
    parameters: list[Tensor], gradients: list[Tensor | None], mean: Tensor, metrics: dict[str, Tensor]
) -> MetaLoss:
    """A loss whose value is ``mean`` and whose gradient is ``gradients`` (none where ``None``)."""
    reached = [(p, g) for p, g in zip(parameters, gradients, strict=True) if g is not None]
    unreached = tuple(p for p, g in zip(parameters, gradients, strict=True) if g is None)
    if not reached:
        return MetaLoss(mean, metrics, unreached)
    product = torch.stack([p.flatten().dot(g.flatten()) for p, g in reached]).sum()
    return MetaLoss(product - product.detach() + mean, metrics, unreached)


def _disagreement(found: Tensor, expected: Tensor, parameters: list[Tensor]) -> str | None:
    """Whether two surrogates' meta-gradients differ beyond rounding (one host sync), and by how much."""

    def gradients_of(surrogate: Tensor) -> list[Tensor]:  # zeros where the surrogate does not reach
        gradients = torch.autograd.grad(surrogate, parameters, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, gradients, strict=True)]

    relative = _relative_difference(gradients_of(found), gradients_of(expected))
    if relative is None:
        return None
    return f"its meta-gradient differs from the task-by-task loop's on the first batch (relative: {relative:.1e})"


def _metrics_disagreement(found: dict[str, Tensor], expected: dict[str, Tensor]) -> str | None:
    """Whether vmapped evaluation metrics differ from the loop's beyond rounding (one host sync)."""
    relative = _relative_difference([found[key] for key in expected], list(expected.values()))
    if relative is None:
        return None
    return f"its metrics differ from the loop's on the first batch (relative: {relative:.1e})"


def _relative_difference(found: list[Tensor], expected: list[Tensor]) -> float | None:
    """The relative difference of two lists of tensors where it exceeds rounding, else ``None``."""
    difference = torch.cat([(f - e).flatten() for f, e in zip(found, expected, strict=True)])
    scale = torch.cat([e.flatten() for e in expected]).norm()
    relative = float(difference.norm() / scale.clamp_min(torch.finfo(scale.dtype).tiny))
    # Batched kernels sum in another order than one task's: allow rounding, well below any real error.
    return None if relative <= 0.1 * torch.finfo(scale.dtype).eps ** 0.5 else relative


def _add(total: Tensor | None, new: Tensor | None) -> Tensor | None:
    if new is None:
        return total
    return new if total is None else total.add_(new)
