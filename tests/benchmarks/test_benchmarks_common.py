"""benchmarks/common.py: the helpers every benchmark's figures go through."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from lightning_meta import MLP, RegressionLearner
from lightning_meta.algorithms import FOMAML
from lightning_meta.datamodules import SinusoidDataModule
from lightning_meta.training.metrics import Z_95, mean_and_ci95, student_t_quantile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import common  # noqa: E402


def test_mean_ci_is_the_packages_interval() -> None:
    values = [0.5, 1.5, 2.0, 4.0]
    mean = sum(values) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    assert common.mean_ci(values) == pytest.approx((mean, Z_95 * std / 2), rel=1e-12)
    assert common.mean_ci([3.0]) == (3.0, 0.0)


def test_format_ci_names_diverged_episodes_and_signs() -> None:
    assert common.format_ci(torch.tensor([1.0, 3.0])) == f"2.000 ± {Z_95 * math.sqrt(2) / math.sqrt(2):.3f}"
    assert common.format_ci(torch.tensor([-1.0, -1.0]), signed=True) == "-1.000 ± 0.000"
    assert common.format_ci(torch.tensor([0.5, 0.5]), signed=True) == "+0.500 ± 0.000"
    assert common.format_ci(torch.tensor([1.0, math.inf, math.nan])) == "diverged (2 episodes)"


def test_seed_spread_has_seeds_and_tasks_as_units() -> None:
    per_seed = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]], dtype=torch.float64)  # seed means 2 and 4
    # Each episode its own task: cells = per_seed; MS_seed 6, MS_task 2, MS_residual 0: variance 8/6,
    # Satterthwaite 64 / (36 + 2) → 1 degree of freedom.
    expected_ci = student_t_quantile(0.975, 1) * math.sqrt(8 / 6)
    assert common.seed_spread(per_seed) == f"3.000 ± {expected_ci:.3f} [2.000, 4.000]"
    assert common.seed_spread(-per_seed, signed=True) == f"-3.000 ± {expected_ci:.3f} [-4.000, -2.000]"
    # tasks shared by episodes: each task weighs the same (task means 1.5 and 3; seeds 2.25 and 4.25)
    tasks = ["a", "a", "b"]
    mean, ci95 = mean_and_ci95(per_seed.flatten(), groups=tasks * 2, seeds=[0, 0, 0, 1, 1, 1])
    assert common.seed_spread(per_seed, tasks=tasks) == f"{mean:.3f} ± {ci95:.3f} [2.250, 4.250]"
    # a paired difference whose CI excludes 0 is bold
    assert common.seed_spread(torch.tensor([[1.0, 1.1], [1.0, 0.9]]), signed=True).startswith("**+1.000 ± ")


def test_markdown_table_and_paired_rows() -> None:
    curves = {"a": {0: torch.tensor([1.0, 2.0])}, "b": {0: torch.tensor([2.0, 2.0])}}
    rows = common.paired_rows(curves, "b", [0])
    assert rows == [["a", common.format_ci(torch.tensor([-1.0, 0.0]))]]
    assert common.markdown_table(["method", "Δ"], rows) == ["| method | Δ |", "|---|---|", f"| a | {rows[0][1]} |"]


def test_format_ci_and_paired_rows_over_tasks() -> None:
    # differences 1, 2 (task t) and 4, 5 (task u): task means 1.5 and 4.5, s = 3/√2 over 2 tasks
    curves = {"a": {0: torch.tensor([1.0, 2.0, 4.0, 5.0])}, "b": {0: torch.zeros(4)}}
    tasks = ["t", "t", "u", "u"]
    expected = f"3.000 ± {student_t_quantile(0.975, 1) * 3 / math.sqrt(2) / math.sqrt(2):.3f}"
    assert common.format_ci(curves["a"][0], tasks=tasks) == expected
    assert common.paired_rows(curves, "b", [0], tasks=tasks) == [["a", expected]]
    assert common.mean_ci([1.0, 2.0, 4.0, 5.0], tasks=tasks)[0] == 3.0


def test_episode_tasks_reads_each_episodes_task() -> None:
    from lightning_meta.datamodules import LanguageModelingTasksDataModule

    datamodule = LanguageModelingTasksDataModule(
        tokenizer="embedded-bpe-4096",
        block_size=16,
        shots=1,
        queries=1,
        num_val_tasks=2,
        num_test_tasks=6,
        eval_meta_batch_size=4,
        max_tokens_per_domain=2_000,
        seed=0,
    )
    datamodule.setup("test")
    batches = datamodule.eval_batches("test")
    assert common.episode_tasks(batches) == [d for batch in batches for d in batch.metadata["domain"]]
    sinusoid = SinusoidDataModule(shots=2, queries=2, num_test_tasks=3, seed=0).eval_batches("test")
    assert common.episode_tasks(sinusoid) is None  # every sinusoid its own task: no task ids


def test_adaptation_curve_is_the_per_episode_trajectory() -> None:
    """Per episode: the query loss before adaptation and after 1 and 3 steps of one SGD trajectory."""
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [8], 1))
    batches = SinusoidDataModule(shots=5, queries=5, num_test_tasks=6, eval_meta_batch_size=3, seed=0).eval_batches(
        "test"
    )
    algorithm = FOMAML(inner_lr=0.05)
    curve = common.adaptation_curve(learner, algorithm, batches, [1, 3])
    expected: dict[int, list[float]] = {0: [], 1: [], 3: []}
    for batch in batches:
        for episode in batch.episodes():
            with torch.no_grad():
                expected[0].append(learner.loss(episode.query)[0].item())
            for step, weights in enumerate(algorithm.adapt_steps(learner, episode.support, 3), start=1):
                if step in expected:
                    with torch.no_grad():
                        expected[step].append(learner.loss(episode.query, weights)[0].item())
    assert sorted(curve) == [0, 1, 3]
    for step, values in expected.items():
        assert curve[step].dtype == torch.float64
        torch.testing.assert_close(curve[step], torch.tensor(values, dtype=torch.float64))
    assert not torch.equal(curve[0], curve[3])  # it adapted


def test_peak_rss_mib_sees_an_allocation() -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    kept = []
    peak = common.peak_rss_mib(lambda: kept.append(torch.ones(64 * 2**20 // 4)))  # 64 MiB, touched
    assert peak > 32
    with pytest.raises(RuntimeError, match="NoSuchField: not in /proc/self/status"):
        common.kib("NoSuchField:")


def test_sinusoid_benchmark_runs_below_fifty_steps(tmp_path, capsys) -> None:
    """It read the last training loss from a logging step, and Lightning logs every 50 steps by default: a run
    of fewer steps stopped with ``KeyError: 'train/query_loss'`` (Reptile's query is computed only then)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "sinusoid"))
    try:
        import run as sinusoid_benchmark
    finally:
        sys.path.pop(0)
    sys.modules.pop("run")
    sinusoid_benchmark.main(["--steps", "3", "--methods", "Reptile", "FOMAML", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for method in ("Reptile (5 inner steps)", "FOMAML (1 inner step)"):
        loss = float(printed.split(f"{method}: 3 steps")[1].split("last train query_loss ")[1].split(",")[0])
        assert math.isfinite(loss)
    assert (tmp_path / "adaptation.png").exists()


def test_arms_run_as_processes_a_worker_count_at_a_time_and_a_failure_names_its_command(tmp_path, capsys):
    def command(method: str, seed: int) -> list[str]:
        out = tmp_path / f"{method}-{seed}"
        code = f"import pathlib, os; pathlib.Path({str(out)!r}).write_text(os.environ['OMP_NUM_THREADS'])"
        return [sys.executable, "-c", code]

    common.run_arm_processes([("a", 0), ("b", 0), ("a", 1)], command, workers=2, poll_seconds=0.05)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-0", "a-1", "b-0"]
    assert {path.read_text() for path in tmp_path.iterdir()} == {"1"}  # one torch thread per arm
    assert [line.split("] ")[1] for line in capsys.readouterr().out.splitlines()] == [
        "start a seed 0",
        "start b seed 0",
        "start a seed 1",
    ]
    with pytest.raises(SystemExit, match=r"An arm failed: .*exit\(3\)"):
        common.run_arm_processes(
            [("x", 0)], lambda method, seed: [sys.executable, "-c", "exit(3)"], workers=1, poll_seconds=0.05
        )
