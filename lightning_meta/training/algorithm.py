"""The algorithm contract and the one shared inner loop.

Every algorithm turns a task batch into a *surrogate loss* whose gradient with respect to the
meta-parameters is the algorithm's meta-gradient. Lightning's automatic optimization, gradient
accumulation, clipping, AMP scaling and DDP gradient sync then work unchanged.
"""

from __future__ import annotations

import contextvars
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_meta.data.tasks import Episode, Split, TaskBatch
from lightning_meta.learners.base import FastWeights, Learner, is_normalization

MetaBatch = Literal["auto", "vmap", "task_by_task", "all_at_once"]
"""How :meth:`MetaAlgorithm.meta_loss` runs the tasks of a meta-batch (all give the same meta-gradient)."""

#: ``meta_batch="auto"`` runs the tasks with ``vmap`` only for models with at most this many trainable
#: parameters. There vmap batches many tiny kernels into a few (the sinusoid MLP's meta-step runs
#: several times faster); on larger models each task's kernels already keep the processor busy, and
#: vmap would only add memory (every task's graph at once, against one task's task by task).
VMAP_MAX_PARAMETERS = 2**17

# Set while meta_loss runs the tasks under torch.func.vmap, where torch.autograd.grad cannot run:
# the inner steps then take their gradients with torch.func.grad.
_TASKS_IN_PARALLEL = contextvars.ContextVar("tasks_in_parallel", default=False)


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
        if _TASKS_IN_PARALLEL.get():  # foreach kernels have no vmap batching rule
            return {name: w if (g := gradients[name]) is None else w - self.lr * g for name, w in weights.items()}
        # One fused, differentiable (second order too) kernel over all the tensors instead of two per tensor.
        names = [name for name, gradient in gradients.items() if gradient is not None]
        updated = torch._foreach_add([weights[name] for name in names], [gradients[name] for name in names],
                                     alpha=-self.lr)  # fmt: skip
        return weights | dict(zip(names, updated, strict=True))


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
    learned α it is −g (first-order Meta-SGD). Under :meth:`MetaAlgorithm.meta_loss`'s vmap path
    the same gradient is taken with ``torch.func.grad`` (zeros, not ``None``, for unreached weights).
    """
    if _TASKS_IN_PARALLEL.get():
        gradients = torch.func.grad(_support_loss)(dict(weights), learner, support)
        if not create_graph:
            gradients = {name: gradient.detach() for name, gradient in gradients.items()}
        return update(step, dict(weights), gradients)
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


def _support_loss(weights: FastWeights, learner: Learner, support: Split) -> Tensor:
    loss, _ = learner.loss(support, weights)
    return loss


def _rule(update: InnerUpdate | None, inner_lr: float | None) -> InnerUpdate:
    if (update is None) == (inner_lr is None):
        raise ValueError("Give the inner loop exactly one of update (a rule) or inner_lr (plain SGD).")
    return update if update is not None else SGD(inner_lr)


def detached_start(weights: Learner | Mapping[str, Tensor]) -> FastWeights:
    """Fast weights cut from the meta-parameters' graph (a learner's, or the given ones)."""
    weights = weights.fast_parameters() if isinstance(weights, Learner) else weights
    if _TASKS_IN_PARALLEL.get():  # torch.func.grad needs no requires_grad (and vmap refuses to set it)
        return {name: weight.detach() for name, weight in weights.items()}
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
        #: Whether :meth:`task_loss` reports the query figures when they cost extra work (Reptile's
        #: and MultiTask's query forward); the host turns it off on steps it does not log.
        self.report_query = True
        # meta_batch="auto": per (learner, fast weights, derivative order, training mode), "" once vmap
        # was checked exact on a batch, else the reason it is not used.
        self._vmap_verdicts: dict[tuple[int, tuple[str, ...], bool, bool], str] = {}

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
        override this.
        """
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
          has at most :data:`VMAP_MAX_PARAMETERS` trainable parameters, and, on the first batch of
          each (learner, fast weights, derivative order, training mode), vmap's meta-gradient equals the
          task-by-task loop's; otherwise ``"task_by_task"``, with the reason logged once.

        With ``"vmap"`` and ``"task_by_task"`` the returned loss is ``Σ_p ⟨p, stop_grad(G_p)⟩``
        shifted to the mean surrogate's value, whose gradient is the meta-gradient ``G``: one
        ``backward`` on it (by Lightning, with AMP, accumulation, clipping and DDP unchanged) gives
        it. A trainable parameter the surrogate does not reach (Reptile's backbone when only the
        head is a fast weight) gets no gradient, as under ``"all_at_once"`` (so weight decay leaves
        it alone in every mode); such parameters are listed in :attr:`MetaLoss.unreached`.

        Checks the batch's data first (:meth:`Learner.check_data`: one host sync for the batch).
        """
        if meta_batch not in get_args(MetaBatch):
            raise ValueError(f"meta_batch must be one of {get_args(MetaBatch)}, got {meta_batch!r}.")
        self.check_learner(learner)
        learner.check_data(batch)
        parameters = [p for module in (learner, self) for p in module.parameters() if p.requires_grad]
        if meta_batch == "all_at_once" or not (torch.is_grad_enabled() and parameters):
            return self._loop(learner, batch, None)
        if meta_batch == "vmap":
            reason = self.vmap_refusal(learner)
            if reason is not None:
                raise ValueError(
                    f"meta_batch='vmap' cannot run {type(self).__name__} with this {type(learner).__name__}: "
                    f"{reason}. Use meta_batch='task_by_task' (the same meta-gradient, memory flat in the "
                    "meta-batch size) or 'auto'."
                )
            return self._vmapped(learner, batch, parameters)
        if meta_batch == "auto":
            return self._auto(learner, batch, parameters)
        return self._loop(learner, batch, parameters)

    def _loop(self, learner: Learner, batch: TaskBatch, parameters: list[Tensor] | None) -> MetaLoss:
        """The tasks one after the other: task by task given ``parameters``, else all at once."""
        count = len(batch)
        losses: list[Tensor] = []
        sums: dict[str, Tensor] = {}
        gradients: list[Tensor | None] = [None] * len(parameters or ())
        for episode in batch.episodes():
            loss, metrics = self.task_loss(learner, episode)
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

    def _vmapped(self, learner: Learner, batch: TaskBatch, parameters: list[Tensor]) -> MetaLoss:
        """All tasks in parallel under ``torch.func.vmap``; the meta-gradient taken at once."""
        # Per-episode tensors only: metadata lists (names) cannot be split by vmap.
        metadata = {name: values for name, values in batch.metadata.items() if isinstance(values, Tensor)}

        def one_task(support: Split, query: Split, task_metadata: dict[str, Tensor]) -> tuple[Tensor, dict]:
            return self.task_loss(learner, Episode(dict(support), dict(query), batch.ways, batch.shots, task_metadata))

        token = _TASKS_IN_PARALLEL.set(True)
        try:
            losses, metrics = torch.func.vmap(one_task)(batch.support, batch.query, metadata)
        finally:
            _TASKS_IN_PARALLEL.reset(token)
        mean = losses.mean()
        gradients = list(torch.autograd.grad(mean, parameters, allow_unused=True))
        return _surrogate(parameters, gradients, mean.detach(), {name: value.mean() for name, value in metrics.items()})

    def _auto(self, learner: Learner, batch: TaskBatch, parameters: list[Tensor]) -> MetaLoss:
        # Per mode too: dropout and batch-norm statistics, which vmap cannot run, act in training mode only.
        key = (id(learner), tuple(learner.fast_weight_names), self.second_order(), learner.training)
        verdict = self._vmap_verdicts.get(key)
        if verdict == "":
            return self._vmapped(learner, batch, parameters)
        if verdict is not None:
            return self._loop(learner, batch, parameters)
        reason = self.vmap_refusal(learner)
        size = sum(p.numel() for p in parameters)
        if reason is None and size > VMAP_MAX_PARAMETERS:
            reason = f"{size:,} trainable parameters, more than VMAP_MAX_PARAMETERS={VMAP_MAX_PARAMETERS:,}"
        if reason is None:
            try:
                vmapped = self._vmapped(learner, batch, parameters)
            except (RuntimeError, NotImplementedError) as error:  # no batching rule, data-dependent control flow
                reason = f"torch.func.vmap cannot run the task loss ({str(error).splitlines()[0]})"
        looped = self._loop(learner, batch, parameters)
        if reason is None:
            reason = _disagreement(vmapped.loss, looped.loss, parameters)
        self._vmap_verdicts[key] = reason or ""
        if reason:
            rank_zero_info(
                f"meta_batch='auto': {type(self).__name__} runs the tasks of a meta-batch one by one "
                f"(task_by_task), not in parallel with vmap: {reason}."
            )
            return looped
        return vmapped

    def evaluate(self, learner: Learner, episode: Episode, steps: int | None = None) -> dict[str, Tensor]:
        """Query figures before (``*_pre``) and after (``*_post``) adaptation to the support."""
        self.check_learner(learner)
        before = learner.evaluation_metrics(episode.query)
        adapted = self.adapt(learner, episode.support, steps)
        after = learner.evaluation_metrics(episode.query, adapted)
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

    found_gradients, expected_gradients = gradients_of(found), gradients_of(expected)
    difference = torch.cat([(f - e).flatten() for f, e in zip(found_gradients, expected_gradients, strict=True)])
    scale = torch.cat([e.flatten() for e in expected_gradients]).norm()
    relative = float(difference.norm() / scale.clamp_min(torch.finfo(scale.dtype).tiny))
    # Batched kernels sum in another order than one task's: allow rounding, well below any real error.
    if relative <= 0.1 * torch.finfo(scale.dtype).eps ** 0.5:
        return None
    return f"its meta-gradient differs from the task-by-task loop's on the first batch (relative: {relative:.1e})"


def _add(total: Tensor | None, new: Tensor | None) -> Tensor | None:
    if new is None:
        return total
    return new if total is None else total.add_(new)
