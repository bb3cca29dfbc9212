"""The one shared inner loop, and the SGD adaptation the MAML family composes.

The inner loop is a pure function from fast weights to adapted fast weights. It runs in one of
two modes, always given as an argument: ``parallel=False`` (one task; gradients by
``torch.autograd.grad``) or ``parallel=True`` (the tasks of a meta-batch, or the episodes of an
evaluation batch, run together under ``torch.func.vmap``, where ``torch.autograd.grad`` cannot
run: gradients by ``torch.func.grad``).

:class:`InnerLoopAlgorithm` is the base of the algorithms that adapt weights with it (MAML,
FOMAML, Reptile, Meta-SGD, MAML++, ANIL, and MultiTask at evaluation): their inner-loop options,
checked once, their update rule and the public adaptation trajectory. Algorithms without an
inner loop (ProtoNet, MetaICL) subclass :class:`~lightning_meta.training.algorithm.MetaAlgorithm`
directly and carry none of it.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from lightning_meta._compat import foreach_add
from lightning_meta.data.tasks import Split
from lightning_meta.learners.base import FastWeights, Learner
from lightning_meta.training.algorithm import MetaAlgorithm


class InnerUpdate(Protocol):
    """An inner update rule: ``(step, weights, gradients, *, parallel) -> new weights``, ``step`` counting from 0.

    Gradients are ``None`` for weights the support loss does not reach (zeros when the tasks run in
    parallel). The rule may use tensors that require grad (learned learning rates): the meta-gradient
    then reaches them. ``parallel`` is always given: ``True`` when the tasks run together under
    ``torch.func.vmap`` (a rule that computes differently there, as :class:`SGD`'s fused kernel, which has no
    vmap rule, reads it; others ignore it). :class:`SGD` and :class:`LearnedRates` are the package's rules.
    """

    def __call__(
        self, step: int, weights: FastWeights, gradients: Mapping[str, Tensor | None], *, parallel: bool
    ) -> FastWeights: ...


@dataclass(frozen=True)
class SGD:
    """θ ← θ − α g: the inner update of MAML, FOMAML and Reptile (the default rule)."""

    lr: float

    def __call__(
        self, step: int, weights: FastWeights, gradients: Mapping[str, Tensor | None], *, parallel: bool = False
    ) -> FastWeights:
        if parallel:  # fused list kernels have no vmap batching rule
            return {name: w if (g := gradients[name]) is None else w - self.lr * g for name, w in weights.items()}
        # One fused, differentiable (second order too) kernel over all the tensors instead of two per tensor.
        names = [name for name, gradient in gradients.items() if gradient is not None]
        updated = foreach_add([weights[name] for name in names], [gradients[name] for name in names], alpha=-self.lr)
        return weights | dict(zip(names, updated, strict=True))


@dataclass(frozen=True)
class LearnedRates:
    """θ ← θ − exp(log α) ⊙ g with meta-learned log-rates: the rule of Meta-SGD, MAML++ and a learned step size.

    ``log_rates``: one tensor, the log α of every fast weight (one learned step size), or a mapping from each fast
    weight's name to its own: a tensor that broadcasts against the weight (one rate per element or per tensor),
    or, with ``per_step=True``, one such rate per inner step stacked on a first dimension (MAML++'s LSLR: step
    ``k`` uses entry ``min(k, steps - 1)``). Learning log α keeps α positive; the meta-gradient reaches the
    log-rates through the update.

    Example::

        self.log_lr = nn.Parameter(torch.tensor(math.log(0.01)))   # in an algorithm's __init__
        def inner_update(self, training=True):
            return LearnedRates(self.log_lr)
    """

    log_rates: Tensor | Mapping[str, Tensor]
    per_step: bool = False

    def __call__(
        self, step: int, weights: FastWeights, gradients: Mapping[str, Tensor | None], *, parallel: bool = False
    ) -> FastWeights:
        return {
            name: w if (g := gradients[name]) is None else w - self._log_rate(name, step).exp() * g
            for name, w in weights.items()
        }

    def _log_rate(self, name: str, step: int) -> Tensor:
        log_rate = self.log_rates if isinstance(self.log_rates, Tensor) else self.log_rates[name]
        return log_rate[min(step, log_rate.shape[0] - 1)] if self.per_step else log_rate


def as_inner_update(rule: Callable[..., FastWeights]) -> InnerUpdate:
    """``rule`` as an :class:`InnerUpdate`: itself, or, for a rule of earlier versions that takes no ``parallel``
    (``(step, weights, gradients)``), the rule called without it, with a ``DeprecationWarning``. Checked once per
    trajectory where a rule enters the inner loop, never per step."""
    if isinstance(rule, SGD | LearnedRates):
        return rule
    try:
        parameters = inspect.signature(rule).parameters
    except (TypeError, ValueError):  # a builtin or C callable: taken as the protocol
        return rule
    if "parallel" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return rule
    warnings.warn(
        f"The inner update rule {rule!r} takes no `parallel` keyword; give it `*, parallel: bool = False` (the "
        "InnerUpdate protocol: every rule is called with it). Called without it for now.",
        DeprecationWarning,
        stacklevel=3,
    )
    return _WithoutParallel(rule)


@dataclass(frozen=True)
class _WithoutParallel:
    rule: Callable[[int, FastWeights, Mapping[str, Tensor | None]], FastWeights]

    def __call__(
        self, step: int, weights: FastWeights, gradients: Mapping[str, Tensor | None], *, parallel: bool = False
    ) -> FastWeights:
        return self.rule(step, weights, gradients)


def inner_step(
    learner: Learner,
    weights: Mapping[str, Tensor],
    support: Split,
    *,
    update: InnerUpdate,
    step: int,
    create_graph: bool,
    parallel: bool = False,
) -> FastWeights:
    """One inner step: the support loss's gradient at ``weights``, then ``update``.

    With ``create_graph=False`` the gradient is a constant (first order) but the update itself
    stays differentiable: in θ − α·g the path to θ is the identity (FOMAML's gradient) and to a
    learned α it is −g (first-order Meta-SGD). With ``parallel=True`` (inside ``torch.func.vmap``)
    the gradient is taken with ``torch.func.grad`` (zeros, not ``None``, for unreached weights).
    """
    return _step_and_loss(
        learner, weights, support, update=update, step=step, create_graph=create_graph, parallel=parallel
    )[0]


def _step_and_loss(
    learner: Learner,
    weights: Mapping[str, Tensor],
    support: Split,
    *,
    update: InnerUpdate,
    step: int,
    create_graph: bool,
    parallel: bool = False,
) -> tuple[FastWeights, Tensor]:
    """:func:`inner_step` and the support loss at ``weights`` it differentiated (detached)."""
    if parallel:
        gradients, loss = torch.func.grad(_support_loss, has_aux=True)(dict(weights), learner, support)
        if not create_graph:
            gradients = {name: gradient.detach() for name, gradient in gradients.items()}
        return update(step, dict(weights), gradients, parallel=True), loss  # traced once per step for all tasks
    loss, _ = learner.loss(support, weights)
    gradients = torch.autograd.grad(loss, list(weights.values()), create_graph=create_graph, allow_unused=True)
    return update(step, dict(weights), dict(zip(weights, gradients, strict=True)), parallel=False), loss.detach()


def inner_steps(
    learner: Learner,
    fast_weights: Mapping[str, Tensor],
    support: Split,
    *,
    steps: int,
    create_graph: bool,
    update: InnerUpdate | None = None,
    inner_lr: float | None = None,
    parallel: bool = False,
) -> Iterator[FastWeights]:
    """The adaptation trajectory: the fast weights after each of ``steps`` inner steps.

    The one shared inner loop, as a generator (``update``: the rule, plain SGD with ``inner_lr``
    by default; ``parallel``: see :func:`inner_step`). A pure function of its inputs. No step
    checks its loss: that would cost a host sync per step. The data are checked once per batch
    (:meth:`Learner.check_data`) and the host module checks the meta-loss once per batch.
    """
    for weights, _ in _trajectory(
        learner,
        fast_weights,
        support,
        steps=steps,
        create_graph=create_graph,
        update=update,
        inner_lr=inner_lr,
        parallel=parallel,
    ):
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
    parallel: bool = False,
) -> FastWeights:
    """``steps`` inner steps on the support loss (SGD: θ ← θ − α ∇θ L_support(θ) by default).

    A pure function from fast weights to adapted fast weights: the last point of
    :func:`inner_steps`. With ``create_graph=True`` the result stays differentiable with respect
    to ``fast_weights`` through the gradients too (second-order MAML); otherwise the gradients
    are constants (first order).
    """
    weights = dict(fast_weights)
    for weights in inner_steps(  # noqa: B007 (the last weights are the result)
        learner,
        fast_weights,
        support,
        steps=steps,
        create_graph=create_graph,
        update=update,
        inner_lr=inner_lr,
        parallel=parallel,
    ):
        pass
    return weights


def inner_loop_and_start_loss(
    learner: Learner,
    fast_weights: Mapping[str, Tensor],
    support: Split,
    *,
    steps: int,
    create_graph: bool,
    update: InnerUpdate | None = None,
    inner_lr: float | None = None,
    parallel: bool = False,
) -> tuple[FastWeights, Tensor]:
    """:func:`inner_loop`'s adapted weights and the support loss at ``fast_weights`` (detached): the loss its
    first step differentiates anyway, so a logged ``support_loss_pre`` costs no forward of its own."""
    weights, start_loss = dict(fast_weights), None
    for weights, loss in _trajectory(  # noqa: B007 (the last weights are the result)
        learner,
        fast_weights,
        support,
        steps=steps,
        create_graph=create_graph,
        update=update,
        inner_lr=inner_lr,
        parallel=parallel,
    ):
        start_loss = loss if start_loss is None else start_loss
    if start_loss is None:  # no step ran
        start_loss = learner.loss(support, weights)[0].detach()
    return weights, start_loss


def _trajectory(
    learner: Learner,
    fast_weights: Mapping[str, Tensor],
    support: Split,
    *,
    steps: int,
    create_graph: bool,
    update: InnerUpdate | None,
    inner_lr: float | None,
    parallel: bool,
) -> Iterator[tuple[FastWeights, Tensor]]:
    """Each inner step's weights and the support loss at the weights before it: the one shared loop."""
    update = _rule(update, inner_lr)
    weights = dict(fast_weights)
    for step in range(steps):
        weights, loss = _step_and_loss(
            learner, weights, support, update=update, step=step, create_graph=create_graph, parallel=parallel
        )
        yield weights, loss


def detached_start(weights: Learner | Mapping[str, Tensor], *, parallel: bool = False) -> FastWeights:
    """Fast weights cut from the meta-parameters' graph (a learner's, or the given ones).

    They require grad for :func:`inner_step`'s ``torch.autograd.grad``; with ``parallel=True``
    they do not (``torch.func.grad`` needs no ``requires_grad``, and vmap refuses to set it).
    """
    weights = weights.fast_parameters() if isinstance(weights, Learner) else weights
    if parallel:
        return {name: weight.detach() for name, weight in weights.items()}
    return {name: weight.detach().requires_grad_() for name, weight in weights.items()}


def _support_loss(weights: FastWeights, learner: Learner, support: Split) -> tuple[Tensor, Tensor]:
    loss, _ = learner.loss(support, weights)
    return loss, loss.detach()


def _rule(update: InnerUpdate | None, inner_lr: float | None) -> InnerUpdate:
    if (update is None) == (inner_lr is None):
        raise ValueError("Give the inner loop exactly one of update (a rule) or inner_lr (plain SGD).")
    return as_inner_update(update) if update is not None else SGD(inner_lr)


def check_step_size(name: str, value: float | None, default: str | None = None) -> None:
    """Raise a clear error unless ``value`` is a finite step size > 0 (or ``None``, meaning ``default``)."""
    if value is None and default is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
        allowed = "a finite number > 0" + (f" or None (= {default})" if default is not None else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}; the MAML paper uses 0.01 for sinusoids.")


def check_step_count(name: str, value: int | None, default: str | None = None) -> None:
    """Raise a clear error unless ``value`` is an integer >= 1 (or ``None``, meaning ``default``)."""
    if value is None and default is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "an integer >= 1" + (f" or None (= {default})" if default is not None else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


def check_inner_loop_options(
    inner_lr: float, inner_steps: int, eval_inner_steps: int | None, eval_inner_lr: float | None = None
) -> None:
    """Raise a clear error for inner-loop options no algorithm can run with."""
    check_step_size("inner_lr", inner_lr)
    check_step_size("eval_inner_lr", eval_inner_lr, default="inner_lr")
    check_step_count("inner_steps", inner_steps)
    check_step_count("eval_inner_steps", eval_inner_steps, default="inner_steps")


class InnerLoopAlgorithm(MetaAlgorithm):
    """Base of the algorithms that adapt weights with SGD steps on the support loss (the MAML family).

    Keeps the inner-loop options (``inner_lr``, ``inner_steps``, ``eval_inner_steps``,
    ``eval_inner_lr``, checked once), names the update rule (:meth:`inner_update`, plain SGD by
    default) and gives the public adaptation trajectory (:meth:`adapt_steps`) that evaluation,
    adaptation curves and benchmarks read.
    """

    adapts_weights: ClassVar[bool] = True

    def __init__(
        self, inner_lr: float, inner_steps: int, eval_inner_steps: int | None = None, eval_inner_lr: float | None = None
    ) -> None:
        super().__init__()
        check_inner_loop_options(inner_lr, inner_steps, eval_inner_steps, eval_inner_lr)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.eval_inner_lr = eval_inner_lr

    def inner_update(self, training: bool = True) -> InnerUpdate:
        """The inner update rule: SGD with ``inner_lr`` (at evaluation ``eval_inner_lr`` if set)."""
        return SGD(self.inner_lr if training or self.eval_inner_lr is None else self.eval_inner_lr)

    def evaluation_steps(self) -> int:
        """Adaptation steps at evaluation: ``eval_inner_steps``, else ``inner_steps``."""
        return self.eval_inner_steps or self.inner_steps

    def adapt_steps(
        self, learner: Learner, support: Split, steps: int | None = None, *, parallel: bool = False
    ) -> Iterator[FastWeights]:
        """The public adaptation trajectory at evaluation: detached fast weights after each step.

        First order, from the current meta-parameters, with the evaluation rule
        (``inner_update(training=False)``); works under ``torch.no_grad()`` and
        ``torch.inference_mode()``. Adaptation curves and benchmarks read it, so every step count
        comes from one trajectory. ``parallel=True``: the episodes run together under
        ``torch.func.vmap`` (see :func:`inner_step`).
        """
        steps = self.evaluation_steps() if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:  # range(-1) would run none
            raise ValueError(f"steps must be an integer >= 0 (0: the meta-parameters as they are), got {steps!r}.")
        update = as_inner_update(self.inner_update(training=False))
        with torch.inference_mode(False):
            support = {name: tensor.clone() if tensor.is_inference() else tensor for name, tensor in support.items()}
            weights = detached_start(self.fast_weights(learner), parallel=parallel)
        for step in range(steps):
            # Grad mode is set around each step, not around the yield: the caller's own mode holds between steps.
            with torch.inference_mode(False), torch.enable_grad():
                adapted = inner_step(
                    learner, weights, support, update=update, step=step, create_graph=False, parallel=parallel
                )
                weights = detached_start(adapted, parallel=parallel)
            yield {name: weight.detach() for name, weight in weights.items()}
