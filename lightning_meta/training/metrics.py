"""Few-shot evaluation metrics: mean ± 95% confidence interval over episodes, or over tasks (and seeds).

Episodes of the same task are not independent draws (a hard task is hard in each of its episodes),
and models trained with different seeds differ. Where episodes share tasks, the unit of the interval
is the task: the values of a task are averaged first and the interval is a Student-t interval over
the task means; where several training seeds were evaluated on the same tasks, the seed-to-seed
variance is added (seeds and tasks as crossed random factors). Independent values (each episode
its own task, as in the sinusoid benchmark) keep the normal interval 1.96·σ/√n.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_meta.data.tasks import CEILING, CHANCE

Z_95 = 1.96

#: labels of the values: one task (or seed) per value, as a sequence of names or numbers or a 1-d tensor
Labels = Sequence[Hashable] | Tensor


@functools.cache
def student_t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """The ``probability`` quantile (above 0.5) of Student's t with an integer number of degrees of freedom.

    Bisection on the exact distribution function of Abramowitz & Stegun 26.7.3-4 (finite sums in
    cos θ, θ = atan(t/√ν)): no SciPy, exact to float precision (``student_t_quantile(0.975, 2)`` is
    4.3027). ``torch.distributions.StudentT`` has no ``icdf``.
    """
    if not 0.5 < probability < 1:
        raise ValueError(f"student_t_quantile: probability {probability} is not in (0.5, 1).")
    if degrees_of_freedom < 1:
        raise ValueError(f"student_t_quantile: {degrees_of_freedom} degrees of freedom; it needs at least 1.")
    nu = degrees_of_freedom
    two_sided = 2 * probability - 1  # P(|T| < t)

    def central_mass(t: float) -> float:
        theta = math.atan(t / math.sqrt(nu))
        cos2 = math.cos(theta) ** 2
        # terms of the finite sum: ratios (2k)/(2k+1)·cos²θ (odd ν) or (2k-1)/(2k)·cos²θ (even ν)
        k = torch.arange(1, max((nu - 1) // 2 + (nu % 2 == 0), 1), dtype=torch.float64)
        ratios = (2 * k) / (2 * k + 1) if nu % 2 else (2 * k - 1) / (2 * k)
        series = 1 + float(torch.cumprod(ratios * cos2, 0).sum())
        if nu % 2:
            return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series * (nu > 1))
        return math.sin(theta) * series

    low, high = 0.0, 1.0
    while central_mass(high) < two_sided:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if central_mass(middle) < two_sided else (low, middle)
    return (low + high) / 2


def mean_and_ci95(values: Tensor, groups: Labels | None = None, seeds: Labels | None = None) -> tuple[Tensor, Tensor]:
    """Mean and 95% CI half-width of ``values``; with ``groups``, tasks are the unit; with ``seeds``, seeds too.

    - ``groups=None``: the values are independent (each episode its own task): 1.96·σ/√n (σ: sample
      standard deviation; 0 for one value).
    - ``groups``: the task of each value. The values of each task are averaged first; the mean is the
      mean of the T task means and the half-width t₀.₉₇₅(T−1)·s/√T (s: their standard deviation).
    - ``groups`` and ``seeds``: the training seed of each value too; every seed evaluated on the same
      tasks (seeds crossed with tasks). From the S×T means of each (seed, task) cell, the variance of
      the grand mean with seeds and tasks both random, (MS_seed + MS_task − MS_residual)/(S·T) (two-way
      ANOVA mean squares; never below max(MS_seed, MS_task)/(S·T), what one factor alone gives), with
      t₀.₉₇₅ at its Satterthwaite degrees of freedom rounded down (a wider, never narrower interval).
      With one seed this is the ``groups`` interval.

    Raises ``ValueError`` for no values, labels of another length, one task only, or a seed without a
    value for some task.
    """
    values = values.flatten().double()
    count = values.numel()
    if count == 0:
        raise ValueError("mean_and_ci95 needs at least one value.")
    if groups is None:
        if seeds is not None:
            raise ValueError(
                "mean_and_ci95: seeds= needs groups=, the task of each value (where each episode is its own "
                "task, pass the episode's index), so that seeds are compared on the same tasks."
            )
        std = values.std(unbiased=True) if count > 1 else values.new_zeros(())
        return values.mean(), Z_95 * std / math.sqrt(count)
    cells = _cell_means(values, groups, seeds)  # (seeds, tasks)
    num_seeds, num_tasks = cells.shape
    if num_tasks < 2:
        raise ValueError(
            f"mean_and_ci95: all {count} values belong to one task ({_first(groups)!r}): a CI over tasks needs at "
            "least two. Leave groups out for a CI over the episodes of this one task."
        )
    mean = cells.mean()
    if num_seeds == 1:
        variance, dof = cells[0].var(unbiased=True) / num_tasks, num_tasks - 1
    else:
        seed_means, task_means = cells.mean(1), cells.mean(0)
        ms_seed = num_tasks * (seed_means - mean).pow(2).sum() / (num_seeds - 1)
        ms_task = num_seeds * (task_means - mean).pow(2).sum() / (num_tasks - 1)
        residual = cells - seed_means[:, None] - task_means[None, :] + mean
        dof_residual = (num_seeds - 1) * (num_tasks - 1)
        ms_residual = residual.pow(2).sum() / dof_residual
        combined = ms_seed + ms_task - ms_residual
        floor, floor_dof = max((ms_seed, num_seeds - 1), (ms_task, num_tasks - 1), key=lambda pair: float(pair[0]))
        if combined > floor:
            terms = ms_seed**2 / (num_seeds - 1) + ms_task**2 / (num_tasks - 1) + ms_residual**2 / dof_residual
            variance, dof = combined / (num_seeds * num_tasks), int(combined**2 / terms)
        else:
            variance, dof = floor / (num_seeds * num_tasks), floor_dof
    if float(variance) == 0:
        return mean, values.new_zeros(())
    return mean, student_t_quantile(0.975, max(dof, 1)) * variance.sqrt()


def paired_difference(
    a: Tensor, b: Tensor, groups: Labels | None = None, seeds: Labels | None = None
) -> tuple[Tensor, Tensor]:
    """Mean and 95% CI half-width of ``a − b``, paired value by value (same episode, same seed).

    The differences get :func:`mean_and_ci95`'s structure: tasks as the unit with ``groups``, seed
    variance with ``seeds``. An arm without seeds (an untrained model) against a seeded one: repeat its
    values for each seed of the other.
    """
    a, b = a.flatten(), b.flatten()
    if a.numel() != b.numel():
        raise ValueError(
            f"paired_difference: a has {a.numel()} values and b {b.numel()}: pair them value by value (the same "
            "episodes in the same order; repeat an unseeded arm's values once per seed of the other)."
        )
    return mean_and_ci95(a.double() - b.double(), groups, seeds)


def _labels(labels: Labels, count: int, name: str) -> list[Hashable]:
    labels = labels.flatten().tolist() if isinstance(labels, Tensor) else list(labels)
    if len(labels) != count:
        raise ValueError(
            f"mean_and_ci95: {len(labels)} {name} for {count} values: give one {name.rstrip('s')} label per value."
        )
    return labels


def _first(labels: Labels) -> Hashable:
    return labels.flatten()[0].item() if isinstance(labels, Tensor) else next(iter(labels))


def _cell_means(values: Tensor, groups: Labels, seeds: Labels | None) -> Tensor:
    """The (seeds, tasks) table of mean values; every seed must have values of every task."""
    tasks = _labels(groups, values.numel(), "groups")
    seed_labels = _labels(seeds, values.numel(), "seeds") if seeds is not None else [0] * values.numel()
    task_index = {task: index for index, task in enumerate(dict.fromkeys(tasks))}
    seed_index = {seed: index for index, seed in enumerate(dict.fromkeys(seed_labels))}
    flat = torch.tensor(
        [seed_index[s] * len(task_index) + task_index[t] for s, t in zip(seed_labels, tasks, strict=True)]
    )
    size = len(seed_index) * len(task_index)
    sums = values.new_zeros(size).index_add_(0, flat, values)
    counts = values.new_zeros(size).index_add_(0, flat, torch.ones_like(values))
    if bool((counts == 0).any()):
        missing = int(torch.nonzero(counts == 0)[0])
        seed, task = list(seed_index)[missing // len(task_index)], list(task_index)[missing % len(task_index)]
        raise ValueError(
            f"mean_and_ci95: seed {seed!r} has no value for task {task!r}: evaluate every seed on the same tasks, "
            "or leave seeds out."
        )
    return (sums / counts).reshape(len(seed_index), len(task_index))


def task_ids(names: Sequence[Hashable]) -> Tensor:
    """Stable int64 ids of task names (the same in every process, unlike ``hash``), for tensor states."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(str(name).encode(), digest_size=8).digest(), "big") >> 1 for name in names],
        dtype=torch.int64,
    )


class EpisodeSummary(NamedTuple):
    """What :class:`EpisodeStatistics` computes: ``tasks`` is ``None`` where episodes carry no task id."""

    mean: Tensor
    ci95: Tensor
    episodes: int
    tasks: int | None


#: The ``metadata`` key of an episode's task name (text-to-text tasks: the task; LM tasks: the domain).
TASK_KEY = "task"
NO_TASK = -1  # the task id of an episode that has none (ids from task_ids are non-negative)


class EpisodeStatistics(Metric):
    """Collects one value per episode, and optionally its task id (across DDP ranks): mean, 95% CI half-width.

    Episodes with task ids that share tasks: the CI is over the task means (``mean_and_ci95(values,
    groups=tasks)``); all episodes of one task: over those episodes (the task is then given, not
    sampled); episodes without task ids: over episodes, as independent values.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("tasks", default=[], dist_reduce_fx="cat")

    def update(self, value: Tensor, task: Tensor | None = None) -> None:
        """``value``: one figure per episode; ``task``: their ids (:func:`task_ids`), or ``None``."""
        value = value.detach().reshape(-1).to(torch.float64)
        if task is None:
            task = torch.full_like(value, NO_TASK, dtype=torch.int64)
        task = task.reshape(-1).to(device=value.device, dtype=torch.int64)
        if task.numel() != value.numel():
            raise ValueError(f"EpisodeStatistics.update: {value.numel()} values but {task.numel()} task ids.")
        self.values.append(value)
        self.tasks.append(task)

    def compute(self) -> EpisodeSummary:
        """Mean, 95% CI half-width, number of episodes and of tasks (``None`` without task ids)."""
        values, tasks = dim_zero_cat(self.values), dim_zero_cat(self.tasks)
        unlabelled = int((tasks == NO_TASK).sum())
        if unlabelled == values.numel():
            return EpisodeSummary(*mean_and_ci95(values), values.numel(), None)
        if unlabelled:
            raise ValueError(
                f"EpisodeStatistics: {unlabelled} of {values.numel()} episodes have no task id: give every "
                "episode its task (metadata['task']) or none."
            )
        distinct = int(tasks.unique().numel())
        groups = tasks if distinct > 1 else None
        return EpisodeSummary(*mean_and_ci95(values, groups=groups), values.numel(), distinct)


def control_metrics(metrics: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> dict[str, Tensor]:
    """Per episode of control tasks (metadata with a ``ceiling``): ``ceiling``, ``chance`` and, beside each
    ``accuracy_*`` figure, its ``control_gap_*`` = (accuracy - chance) / (ceiling - chance): 0 at chance, 1 at
    the best any reader of the support can do. ``{}`` for episodes without a ceiling."""
    if CEILING not in metadata:
        return {}
    ceiling, chance = (torch.as_tensor(metadata[name], dtype=torch.float64) for name in (CEILING, CHANCE))
    gaps = {
        "control_gap" + name.removeprefix("accuracy"): (values - chance.to(values)) / (ceiling - chance).to(values)
        for name, values in metrics.items()
        # accuracy itself (the primary rule), not each rule's accuracy_<rule>_* beside it
        if name == "accuracy_pre" or name == "accuracy_post" or name.startswith("accuracy_step")
    }
    return {"ceiling": ceiling, "chance": chance} | gaps
