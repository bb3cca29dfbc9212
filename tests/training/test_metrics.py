"""Mean ± 95% CI: over independent episodes, over tasks, over seeds and tasks; the per-episode metric."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meta.training.metrics import (
    EpisodeStatistics,
    mean_and_ci95,
    paired_difference,
    student_t_quantile,
    task_ids,
)


def test_student_t_quantiles_are_exact() -> None:
    assert student_t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-12)  # Cauchy
    # ν = 2: t = (2p − 1)·√(2 / (4p(1 − p)))
    assert student_t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)), rel=1e-12)
    assert student_t_quantile(0.975, 20) == pytest.approx(2.0859634472658644, rel=1e-12)  # tables: 2.086
    assert student_t_quantile(0.975, 100_000) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError, match="at least 1"):
        student_t_quantile(0.975, 0)


def test_independent_values_keep_the_normal_interval() -> None:
    values = torch.tensor([0.2, 0.4, 0.9, 0.5])
    mean, ci95 = mean_and_ci95(values)
    assert mean.item() == pytest.approx(0.5)
    assert ci95.item() == pytest.approx(1.96 * values.double().std().item() / 2)


def test_tasks_as_the_unit_average_each_task_then_take_a_t_interval() -> None:
    # task means 2, 2, 5 (two episodes each, then one of three): mean 3, s = √3, t(0.975, 2)·s/√3
    values = torch.tensor([1.0, 3.0, 2.0, 2.0, 6.0, 4.0, 5.0])
    mean, ci95 = mean_and_ci95(values, groups=["a", "a", "b", "b", "c", "c", "c"])
    assert mean.item() == pytest.approx(3.0)  # each task weighs the same: the episode mean is 23/7
    assert ci95.item() == pytest.approx(student_t_quantile(0.975, 2) * math.sqrt(3) / math.sqrt(3), rel=1e-12)
    tensor_labels = mean_and_ci95(values, groups=torch.tensor([0, 0, 1, 1, 2, 2, 2]))
    assert [x.item() for x in tensor_labels] == [mean.item(), ci95.item()]
    one_seed = mean_and_ci95(values, groups=[0, 0, 1, 1, 2, 2, 2], seeds=[7] * 7)
    assert [x.item() for x in one_seed] == pytest.approx([mean.item(), ci95.item()], rel=1e-12)


def test_seeds_and_tasks_hand_computed() -> None:
    # cells (seed × task) [[1, 2], [3, 6]]: MS_seed 9, MS_task 4, MS_residual 1; variance (9 + 4 − 1)/4 = 3;
    # Satterthwaite degrees of freedom 12² / (9² + 4² + 1²) = 1.47 → 1
    values = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mean, ci95 = mean_and_ci95(values, groups=["x", "y", "x", "y"], seeds=[0, 0, 1, 1])
    assert mean.item() == pytest.approx(3.0)
    assert ci95.item() == pytest.approx(student_t_quantile(0.975, 1) * math.sqrt(3), rel=1e-12)
    # cells [[1, 2], [2, 1]]: MS_seed 0, MS_task 0, MS_residual 1: the floor, max(MS_seed, MS_task)/(S·T) = 0
    mean, ci95 = mean_and_ci95(torch.tensor([1.0, 2.0, 2.0, 1.0]), groups=[0, 1, 0, 1], seeds=[0, 0, 1, 1])
    assert (mean.item(), ci95.item()) == (1.5, 0.0)
    # cells [[0, 2, 4], [1, 3, 5]]: MS_seed 3·0.5 = 1.5 ≤ MS_task 2·4 = 8, MS_residual 0 → combined 9.5 over 6
    values = torch.tensor([0.0, 2.0, 4.0, 1.0, 3.0, 5.0])
    mean, ci95 = mean_and_ci95(values, groups=[0, 1, 2, 0, 1, 2], seeds=[0, 0, 0, 1, 1, 1])
    dof = int(9.5**2 / (1.5**2 / 1 + 8**2 / 2))
    assert ci95.item() == pytest.approx(student_t_quantile(0.975, dof) * math.sqrt(9.5 / 6), rel=1e-12)


def test_correlated_episodes_of_a_task_widen_the_interval() -> None:
    # 20 tasks of 2 episodes each: a task effect both episodes share, little episode noise
    generator = torch.Generator().manual_seed(0)
    task_effect = torch.randn(20, 1, generator=generator).expand(20, 2)
    values = (task_effect + 0.1 * torch.randn(20, 2, generator=generator)).flatten()
    tasks = torch.arange(20).repeat_interleave(2)
    naive = mean_and_ci95(values)[1].item()
    by_task = mean_and_ci95(values, groups=tasks)[1].item()
    assert by_task > 1.35 * naive  # √2 for perfectly correlated pairs, times t(19)/1.96
    # independent episodes, each its own task: the t-interval is the normal one up to t(n−1)/1.96
    independent = torch.randn(40, generator=generator)
    ratio = mean_and_ci95(independent, groups=range(40))[1] / mean_and_ci95(independent)[1]
    assert ratio.item() == pytest.approx(student_t_quantile(0.975, 39) / 1.96, rel=1e-12)


def test_seed_variance_is_included() -> None:
    # the same tasks for three seeds whose means differ: wider than the interval of the seeds' average
    generator = torch.Generator().manual_seed(1)
    tasks = torch.randn(1, 10, generator=generator)
    seeds = torch.tensor([[-0.5], [0.0], [0.5]])
    cells = tasks + seeds + 0.05 * torch.randn(3, 10, generator=generator)
    labels = {"groups": torch.arange(10).repeat(3), "seeds": torch.arange(3).repeat_interleave(10)}
    with_seeds = mean_and_ci95(cells.flatten(), **labels)[1]
    seeds_averaged = mean_and_ci95(cells.mean(0), groups=range(10))[1]
    assert with_seeds > 1.5 * seeds_averaged


def test_the_result_does_not_depend_on_the_order_of_the_values() -> None:
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(24, generator=generator)
    groups, seeds = torch.arange(4).repeat(6), torch.arange(3).repeat_interleave(8)
    order = torch.randperm(24, generator=generator)
    first = mean_and_ci95(values, groups, seeds)
    shuffled = mean_and_ci95(values[order], groups[order], seeds[order])
    torch.testing.assert_close(first, shuffled)


def test_paired_difference_is_the_interval_of_the_differences() -> None:
    a, b = torch.tensor([1.0, 2.0, 4.0, 3.0]), torch.tensor([0.5, 1.0, 1.0, 2.0])
    groups = ["p", "p", "q", "q"]
    assert paired_difference(a, b, groups) == mean_and_ci95(a - b, groups)
    with pytest.raises(ValueError, match="a has 4 values and b 2: pair them value by value"):
        paired_difference(a, b[:2])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"groups": ["t"] * 3}, "all 3 values belong to one task .'t'.: a CI over tasks needs at least two. Leave"),
        ({"groups": ["t", "u"]}, "2 groups for 3 values: give one group label per value"),
        ({"groups": [0, 1, 0], "seeds": [0, 0]}, "2 seeds for 3 values: give one seed label per value"),
        ({"groups": [0, 1, 0], "seeds": [0, 0, 1]}, "seed 1 has no value for task 1: evaluate every seed on the same"),
        ({"seeds": [0, 1, 2]}, "seeds= needs groups="),
    ],
)
def test_bad_labels_name_the_fix(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mean_and_ci95(torch.tensor([1.0, 2.0, 3.0]), **arguments)


def test_task_ids_are_stable_distinct_and_non_negative() -> None:
    ids = task_ids(["bbq_lite_json", "strategyqa", "bbq_lite_json"])
    assert ids.dtype == torch.int64 and bool((ids >= 0).all())
    assert ids[0] == ids[2] != ids[1]
    assert ids.tolist() == task_ids(["bbq_lite_json", "strategyqa", "bbq_lite_json"]).tolist()


def test_episode_statistics_without_task_ids_are_over_episodes() -> None:
    statistic = EpisodeStatistics()
    values = torch.tensor([0.2, 0.4, 0.9, 0.5])
    for value in values:
        statistic.update(value)
    summary = statistic.compute()
    assert (summary.episodes, summary.tasks) == (4, None)
    assert [summary.mean, summary.ci95] == list(mean_and_ci95(values))


def test_episode_statistics_with_shared_tasks_are_over_tasks() -> None:
    statistic = EpisodeStatistics()
    values = torch.tensor([1.0, 3.0, 2.0, 2.0, 6.0, 4.0])
    names = ["a", "a", "b", "b", "c", "c"]
    statistic.update(values[:4], task_ids(names[:4]))  # two evaluation batches
    statistic.update(values[4:], task_ids(names[4:]))
    mean, ci95, episodes, tasks = statistic.compute()
    assert (episodes, tasks) == (6, 3)
    torch.testing.assert_close((mean, ci95), mean_and_ci95(values, groups=names))


def test_episode_statistics_of_one_task_are_over_its_episodes() -> None:
    statistic = EpisodeStatistics()
    values = torch.tensor([1.0, 3.0, 2.0])
    statistic.update(values, task_ids(["only"] * 3))
    summary = statistic.compute()
    assert (summary.episodes, summary.tasks) == (3, 1)
    torch.testing.assert_close((summary.mean, summary.ci95), mean_and_ci95(values))


def test_episode_statistics_refuse_episodes_without_task_ids_among_others() -> None:
    statistic = EpisodeStatistics()
    statistic.update(torch.tensor([1.0, 2.0]), task_ids(["a", "b"]))
    statistic.update(torch.tensor([3.0]))
    with pytest.raises(ValueError, match="1 of 3 episodes have no task id"):
        statistic.compute()
    with pytest.raises(ValueError, match="2 values but 1 task ids"):
        EpisodeStatistics().update(torch.tensor([1.0, 2.0]), task_ids(["a"]))


def test_control_gaps_are_taken_of_the_primary_accuracy_only():
    """Every scoring rule's accuracy_<rule>_* is logged beside accuracy; the control gap is the primary one's, so that
    each gap has its statistic (a gap per rule would name figures nothing collects)."""
    from lightning_meta.data.tasks import CEILING, CHANCE
    from lightning_meta.training.metrics import control_metrics

    figures = {
        name: torch.tensor([0.5])
        for name in (
            "accuracy_pre",
            "accuracy_post",
            "accuracy_step2",
            "accuracy_sum_post",
            "accuracy_per_char_pre",
            "accuracy_per_token_step2",
            "correct_probability_post",
        )
    }
    result = control_metrics(figures, {CEILING: torch.tensor([1.0]), CHANCE: torch.tensor([0.0])})
    assert set(result) == {"ceiling", "chance", "control_gap_pre", "control_gap_post", "control_gap_step2"}
