"""Sinusoid regression benchmark: the MAML paper's section 5.1 experiment (Finn et al., ICML 2017).

Meta-trains a 1-40-40-1 ReLU MLP on K=10-shot sinusoid tasks with MAML, first-order MAML,
Reptile and the "pretrained" baseline (``MultiTask``: plain regression on all the tasks' points),
each for the same number of outer steps with meta-batch 25 and Adam(1e-3), through
``lightning.Trainer`` + :class:`MetaLearningModule`. Then adapts each model to the 10 support
points of 600 fixed test tasks with SGD (step size 0.01) and reports the query MSE before
adaptation and after 1 and 10 steps, as mean ± 95% CI over the tasks.

    python benchmarks/sinusoid/run.py [--steps N] [--seed S] [--out DIR]

Prints a markdown table and writes ``adaptation.png`` (predictions on two test tasks) to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning
import matplotlib
import torch
from torch import Tensor

from lightning_meta import MLP, Episode, Learner, MetaLearningModule, RegressionLearner
from lightning_meta.algorithms import FOMAML, MAML, MAMLPlusPlus, MetaAlgorithm, MetaSGD, MultiTask, Reptile
from lightning_meta.datamodules import SinusoidDataModule
from lightning_meta.learners.base import FastWeights

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import common  # noqa: E402

SHOTS = 10
QUERIES = 10
META_BATCH_SIZE = 25
META_LR = 1e-3
EVAL_STEP_SIZE = 0.01
EVAL_STEPS = (1, 10)
NUM_TEST_TASKS = 600
TEST_DATA_SEED = 0  # the test tasks stay the same whatever --seed is
DEFAULT_STEPS = 5000


@dataclass
class Method:
    """One row of the table: a name and a fresh algorithm for it."""

    name: str
    make_algorithm: Callable[[], MetaAlgorithm]


# Every algorithm's ``adapt`` takes SGD steps of size ``inner_lr``; all are 0.01, the evaluation step size.
METHODS = [
    Method("MAML (2nd order, 1 inner step)", lambda: MAML(inner_lr=0.01, inner_steps=1)),
    Method("FOMAML (1 inner step)", lambda: FOMAML(inner_lr=0.01, inner_steps=1)),
    Method("Reptile (5 inner steps)", lambda: Reptile(inner_lr=0.01, inner_steps=5)),
    Method("Pretrained (joint regression)", lambda: MultiTask(inner_lr=0.01)),
    # Learned inner loops: their rates start at 0.01 and are meta-learned; evaluation adapts with the learned rates.
    Method("Meta-SGD (1 inner step)", lambda: MetaSGD(inner_lr=0.01, inner_steps=1)),
    Method(
        "MAML++ (5 inner steps: LSLR, MSL, DA)",
        lambda: MAMLPlusPlus(inner_lr=0.01, inner_steps=5, msl_anneal_steps=1000, first_order_steps=1000),
    ),
]


@dataclass
class Result:
    """A trained method and its figures."""

    method: Method
    learner: Learner
    algorithm: MetaAlgorithm
    query_mse: dict[int, Tensor]  # adaptation steps (0 = none) -> per-task query MSE
    train_seconds: float
    final_train_loss: float


def train(method: Method, steps: int, seed: int) -> tuple[Learner, MetaAlgorithm, float, float]:
    """Meta-train one method with ``lightning.Trainer``; returns learner, algorithm, seconds, last loss."""
    lightning.seed_everything(seed, verbose=False)  # same initial weights for every method
    learner = RegressionLearner(MLP(1, [40, 40], 1))
    algorithm = method.make_algorithm()
    module = MetaLearningModule(learner, algorithm, optimizer=functools.partial(torch.optim.Adam, lr=META_LR))
    # Same training task stream for every method: batch i depends only on (seed, i).
    datamodule = SinusoidDataModule(
        shots=SHOTS, queries=QUERIES, meta_batch_size=META_BATCH_SIZE, batches_per_epoch=steps, seed=seed
    )
    trainer = common.benchmark_trainer(steps, log_every_n_steps=min(50, steps))  # the last step logs below 50 too
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    if trainer.global_step != steps:
        raise RuntimeError(f"{method.name}: trained {trainer.global_step} steps, expected {steps}.")
    final_loss = float(trainer.callback_metrics["train/query_loss"])
    return learner.eval(), algorithm, seconds, final_loss


def markdown_table(results: list[Result]) -> str:
    """The results as a markdown table (query MSE, mean ± 95% CI over the test tasks)."""
    header = ["method", "pre-adaptation MSE", *map(common.steps_label, EVAL_STEPS)]
    rows = ([r.method.name, *(common.format_ci(r.query_mse[k]) for k in (0, *EVAL_STEPS))] for r in results)
    return "\n".join(common.markdown_table(header, rows))


def predictions(learner: Learner, algorithm: MetaAlgorithm, episode: Episode, x: Tensor) -> dict[int, Tensor]:
    """Predictions on ``x`` before adaptation (key 0) and after each of ``EVAL_STEPS`` steps."""
    weights: dict[int, FastWeights | None] = {0: None}
    weights.update({k: algorithm.adapt(learner, episode.support, steps=k) for k in EVAL_STEPS})
    with torch.no_grad():
        return {k: learner.predict({"x": x}, w).squeeze(-1) for k, w in weights.items()}


def plot(results: list[Result], episodes: list[Episode], path: Path) -> None:
    """MAML and the pretrained baseline on a few test tasks, as in the paper's figure 2."""
    # MAML and the pretrained baseline, as in the paper's figure; the first and last method run otherwise.
    by_name = {result.method.name.split(" ")[0]: result for result in results}
    shown = (
        [by_name["MAML"], by_name["Pretrained"]]
        if {"MAML", "Pretrained"} <= by_name.keys()
        else [results[0], results[-1]]
    )
    x = torch.linspace(-5.0, 5.0, 200).unsqueeze(-1)
    fig, axes = plt.subplots(
        len(episodes), len(shown), figsize=(6 * len(shown), 4 * len(episodes)), squeeze=False, sharex=True
    )
    colors = {0: "tab:gray", 1: "tab:green", 10: "tab:red"}
    for row, episode in enumerate(episodes):
        amplitude, phase = float(episode.metadata["amplitude"]), float(episode.metadata["phase"])
        truth = amplitude * torch.sin(x.squeeze(-1) - phase)
        for col, result in enumerate(shown):
            ax = axes[row][col]
            ax.plot(x, truth, color="black", linewidth=2, label="ground truth")
            for k, y in predictions(result.learner, result.algorithm, episode, x).items():
                label = "pre-update" if k == 0 else f"after {k} step{'s' * (k > 1)}"
                ax.plot(x, y, color=colors.get(k), linestyle="--" if k == 0 else "-", label=label)
            ax.scatter(
                episode.support["x"].squeeze(-1),
                episode.support["y"].squeeze(-1),
                marker="^",
                s=60,
                color="tab:purple",
                zorder=3,
                label=f"{SHOTS} support points",
            )
            ax.set_title(
                f"{result.method.name.split(' (')[0]} — test task {row + 1} (A={amplitude:.2f}, φ={phase:.2f})"
            )
            ax.grid(alpha=0.3)
            if row == len(episodes) - 1:
                ax.set_xlabel("x")
            if col == 0:
                ax.set_ylabel("y")
            if row == 0 and col == 0:
                ax.legend(loc="best", fontsize=9)
    fig.suptitle(f"K={SHOTS} sinusoid regression, SGD step size {EVAL_STEP_SIZE}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Train every method, evaluate on the fixed test tasks, print the table, save the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="meta-training steps, every method")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and training task stream")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="directory for adaptation.png"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest here)")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="run only the methods whose name starts with one of these"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    common.quiet_lightning()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # lightning 2.6 vs torch 2.13 deprecation notice
    args.out.mkdir(parents=True, exist_ok=True)

    test_batches = SinusoidDataModule(
        shots=SHOTS, queries=QUERIES, num_test_tasks=NUM_TEST_TASKS, seed=TEST_DATA_SEED
    ).eval_batches("test")
    started = time.perf_counter()
    results = []
    chosen = [m for m in METHODS if args.methods is None or any(m.name.startswith(p) for p in args.methods)]
    for method in chosen:
        learner, algorithm, seconds, final_loss = train(method, args.steps, args.seed)
        eval_start = time.perf_counter()
        query_mse = common.adaptation_curve(learner, algorithm, test_batches, EVAL_STEPS)
        print(
            f"{method.name}: {args.steps} steps in {seconds:.0f} s ({args.steps / seconds:.1f} steps/s), "
            f"last train query_loss {final_loss:.3f}, evaluation {time.perf_counter() - eval_start:.0f} s",
            flush=True,
        )
        results.append(Result(method, learner, algorithm, query_mse, seconds, final_loss))

    count = len(results[0].query_mse[0])
    print(
        f"\nQuery MSE on {count} fixed test tasks (K={SHOTS}, {QUERIES} query points each), mean ± 95% CI; "
        f"{args.steps} meta-training steps, seed {args.seed}, SGD step size {EVAL_STEP_SIZE}:\n"
    )
    print(markdown_table(results))
    path = args.out / "adaptation.png"
    plot(results, [test_batches[0].episode(i) for i in range(2)], path)
    print(f"\nSaved {path}. Total wall time {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
