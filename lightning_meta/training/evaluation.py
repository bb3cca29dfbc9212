"""Evaluation along the adaptation curve, and what a non-finite loss or figure says about its cause."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from lightning_meta.data.tasks import Episode, TaskBatch, generation_rule
from lightning_meta.learners.base import Learner
from lightning_meta.training.algorithm import MetaAlgorithm

#: The most adaptation steps ``eval_curve`` may ask for: each is a forward and backward on every
#: evaluation episode, at every validation.
MAX_EVAL_CURVE_STEPS = 1000


def along_curve(
    algorithm: MetaAlgorithm,
    learner: Learner,
    episode: Episode,
    steps: int | None,
    curve_steps: list[int],
    *,
    parallel: bool = False,
    stop_requested: Callable[[], bool] = lambda: False,
) -> dict[str, Tensor]:
    """:meth:`MetaAlgorithm.evaluate`'s metrics plus ``{name}_step{k}`` for each ``eval_curve`` step count.

    Everything comes from one trajectory: the ``*_post`` metrics are those at the evaluation
    steps, so they equal ``evaluate``'s. ``parallel``: the episodes of the batch run together
    under ``torch.func.vmap``.
    """
    algorithm.check_learner(learner)
    post_steps = algorithm.evaluation_steps() if steps is None else steps
    wanted = {post_steps, *curve_steps}
    rule = None if parallel else generation_rule(episode.metadata)  # vmap cannot decode
    before = learner.evaluation_metrics(episode.query, parallel=parallel, generation=rule)
    figures_at = {0: before}
    trajectory = algorithm.adapt_steps(learner, episode.support, max(wanted), parallel=parallel)
    for step, adapted in enumerate(trajectory, start=1):
        # Lightning checks the signal only between batches, and one batch may adapt for minutes.
        if stop_requested():
            raise SIGTERMException
        if step in wanted:
            figures_at[step] = learner.evaluation_metrics(episode.query, adapted, parallel=parallel, generation=rule)
    metrics = {f"{name}_pre": value for name, value in before.items()}
    metrics |= {f"{name}_post": value for name, value in figures_at[post_steps].items()}
    return metrics | {f"{name}_step{step}": value for step in curve_steps for name, value in figures_at[step].items()}


def describe_bad_evaluation(
    metrics: dict[str, Tensor], stage: str, curve_steps: list[int], algorithm: MetaAlgorithm
) -> str:
    """Which evaluation figure is not finite, on which episode, and what to change (``algorithm``'s options)."""
    before = torch.isfinite(metrics["loss_pre"]) if "loss_pre" in metrics else torch.ones((), dtype=torch.bool)
    if not bool(before.all()):
        episode = int(torch.nonzero(~before)[0])
        return (
            f"{stage}: the query loss before adaptation is not finite on episode {episode} of the batch: the "
            "meta-parameters diverged. Resume from an earlier checkpoint with a lower meta learning rate."
        )
    # The earliest adapted figure that is not finite names the episode (curve points come in step order).
    adapted = [f"loss_step{step}" for step in curve_steps if step > 0] + ["loss_post"]
    finite = {key: torch.isfinite(metrics[key]) for key in adapted if key in metrics}
    diverged = next((key for key, values in finite.items() if not bool(values.all())), None)
    episode = int(torch.nonzero(~finite[diverged])[0]) if diverged else 0
    step = int(diverged.removeprefix("loss_step")) if diverged and diverged.startswith("loss_step") else None
    when = "after" if step is None else f"after {step} step{'s' * (step != 1)}"
    options = inspect.signature(type(algorithm)).parameters
    if "eval_inner_lr" in options:
        fix = "the evaluation step size (--model.algorithm.init_args.eval_inner_lr) or"
    elif "inner_lr" in options:  # learned step sizes (MetaSGD, MAML++): they start at inner_lr
        fix = f"the learned step sizes' start (--model.algorithm.init_args.inner_lr; {type(algorithm).__name__} "
        fix += "adapts with its learned ones) or"
    else:
        fix = ""
    return (
        f"{stage}: adaptation diverged on episode {episode} of the batch (the query loss is finite before "
        f"adaptation, not {when}). Lower {fix} the evaluation steps (--model.eval_inner_steps)."
    )


def diagnose_divergence(algorithm: MetaAlgorithm, learner: Learner, batch: TaskBatch) -> str:
    """Which side diverged: the meta-parameters (outputs before adaptation) or the inner loop."""
    parameters_finite = all(bool(torch.isfinite(p).all()) for p in learner.parameters())
    with torch.no_grad():
        outputs_finite = parameters_finite and all(
            bool(torch.isfinite(learner.predict(episode.support)).all()) for episode in batch.episodes()
        )
    if not outputs_finite:
        return (
            "the meta-parameters diverged (the model's outputs are not finite even before adaptation). Lower "
            "the meta learning rate (--model.optimizer.init_args.lr), enable gradient clipping "
            "(--trainer.gradient_clip_val=1.0), or resume from an earlier checkpoint."
        )
    inner_lr = getattr(algorithm, "inner_lr", None)
    if inner_lr is None:
        return f"the model is finite before adaptation, so {type(algorithm).__name__}'s loss diverged."
    return (
        f"the model is finite before adaptation, so the inner loop diverged: lower inner_lr (now {inner_lr}) "
        "or inner_steps (--model.algorithm.init_args.inner_lr=...). If earlier steps' losses were growing, the "
        "meta-parameters grew too large for that step size: lower the meta learning rate "
        "(--model.optimizer.init_args.lr) or clip gradients (--trainer.gradient_clip_val=1.0)."
    )


def check_eval_curve(eval_curve: list[int] | None, algorithm: MetaAlgorithm) -> None:
    if eval_curve is None:
        return
    if not eval_curve or any(isinstance(step, bool) or not isinstance(step, int) or step < 0 for step in eval_curve):
        raise ValueError(
            f"eval_curve must be a non-empty list of step counts >= 0 (0 = before adaptation), got {eval_curve!r}; "
            "e.g. --model.eval_curve=[0,1,5,10], or leave it unset."
        )
    if max(eval_curve) > MAX_EVAL_CURVE_STEPS:
        raise ValueError(
            f"eval_curve={eval_curve!r} asks for {max(eval_curve)} adaptation steps per evaluation episode, more "
            f"than {MAX_EVAL_CURVE_STEPS} (each is a forward and backward on every episode, at every validation): "
            "list step counts up to that, e.g. --model.eval_curve=[0,1,5,10]."
        )
    if not algorithm.adapts_weights:
        raise ValueError(
            f"eval_curve={eval_curve!r} needs an algorithm that adapts weights; {type(algorithm).__name__} has no "
            "adaptation steps. Leave eval_curve unset."
        )
