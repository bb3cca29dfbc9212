"""Language-model domain adaptation benchmark: meta-learned initializations vs ordinary LM training.

Trains the quick start's tiny GPT-2 (2 layers, width 128, random init, ``embedded-bpe-4096``
tokenizer) on the training domains of the embedded standard-library corpus with four methods,
each given the same number of block forward/backward passes (see ``passes_per_step``):

- FOMAML, all weights fast;
- Reptile, all weights fast;
- second-order MAML on LoRA adapters (the outer loop also meta-learns the base weights);
- a baseline: ordinary multi-domain LM training on the support and query blocks, no inner loop
  (``MultiTask``).

Then, on the fixed held-out *test* domains (``LanguageModelingTasksDataModule.eval_batches("test")``),
adapts each model to 4 support blocks of 64 tokens with plain SGD and reports the query loss
(nats/token) before adaptation and after 1, 5 and 10 steps, as the mean over the held-out domains
± 95% CI with the domain (the task) as the unit: each domain's episodes are averaged first. Each
method's evaluation step size is picked from a small grid on the *validation* domains (mean query
loss over 1, 5 and 10 steps) before the test episodes are touched.

    python benchmarks/lm_adaptation/run.py [--budget N] [--seed S] [--out DIR] [--methods ...]

Prints markdown tables and writes ``adaptation.png`` (loss vs adaptation steps) to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning
import matplotlib
import torch
from torch import Tensor

from lightning_meta import CausalLMLearner, Learner, MetaLearningModule, TaskBatch
from lightning_meta.algorithms import MetaAlgorithm, MultiTask
from lightning_meta.datamodules import LanguageModelingTasksDataModule
from lightning_meta.training.metrics import mean_and_ci95

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, tiny_lm.py
import common  # noqa: E402
from common import format_ci, markdown_table, steps_label  # noqa: E402
from tiny_lm import (  # noqa: E402
    BLOCK_SIZE,
    EVAL_DATA_SEED,
    EVAL_STEPS,
    META_BATCH_SIZE,
    METHODS,
    NUM_VAL_TASKS,
    QUERIES,
    SHOTS,
    Method,
    adaptation_curve,
    make_datamodule,
    step_size_label,
)

#: Block forward/backward passes per method (FOMAML: 300 outer steps, as the quick start).
DEFAULT_BUDGET = 14_400


@dataclass
class Result:
    """A trained method and its figures."""

    method: Method
    steps: int
    train_seconds: float
    final_train_loss: float
    step_size: float
    val_scores: dict[float, float]  # eval step size -> mean validation query loss over EVAL_STEPS
    test_loss: dict[int, Tensor]  # adaptation steps (0 = none) -> per-episode query loss
    eval_seconds: float = 0.0
    val_curves: dict[float, dict[int, Tensor]] = field(default_factory=dict)


def train(
    method: Method, steps: int, seed: int, datamodule: LanguageModelingTasksDataModule
) -> tuple[CausalLMLearner, MetaAlgorithm, float, float]:
    """Meta-train one method with ``lightning.Trainer``; returns the learner, the algorithm, seconds, last loss."""
    lightning.seed_everything(seed, verbose=False)  # the same initial base weights for every method
    learner = method.make_learner()
    module = MetaLearningModule(learner, method.make_algorithm(), optimizer=method.optimizer)
    trainer = common.benchmark_trainer(steps, log_every_n_steps=1)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    if trainer.global_step != steps:
        raise RuntimeError(f"{method.name}: trained {trainer.global_step} steps, expected {steps}.")
    return learner.eval(), module.algorithm, seconds, float(trainer.callback_metrics["train/query_loss"])


def pick_step_size(
    learner: Learner, val_batches: Sequence[TaskBatch], grid: Sequence[float], algorithm: MetaAlgorithm
) -> tuple[float, dict[float, float], dict[float, dict[int, Tensor]]]:
    """The grid step size with the lowest validation query loss, averaged over ``EVAL_STEPS``.

    A step size whose adaptation diverges on a validation episode scores ``inf`` (and has no curve).
    """
    curves, scores = {}, {}
    for lr in grid:
        try:
            curves[lr] = adaptation_curve(learner, val_batches, lr, algorithm=algorithm)
        except FloatingPointError:
            scores[lr] = math.inf
            continue
        scores[lr] = float(torch.stack([curves[lr][k].mean() for k in EVAL_STEPS]).mean())
    return min(scores, key=lambda lr: scores[lr]), scores, curves


def results_table(results: list[Result], tasks: Sequence[str]) -> str:
    """Test query loss (nats/token), mean over the test domains ± 95% CI over them (``tasks``: each episode's)."""
    header = ["method", "outer steps", "eval step size", "before adaptation", *map(steps_label, EVAL_STEPS)]
    rows = (
        [
            r.method.name,
            str(r.steps),
            step_size_label(r.step_size),
            *(format_ci(r.test_loss[k], tasks=tasks) for k in (0, *EVAL_STEPS)),
        ]
        for r in results
    )
    return "\n".join(markdown_table(header, rows))


def validation_table(results: list[Result]) -> str:
    """Validation query loss after 1/5/10 steps for every grid step size (what picked the step size)."""
    header = ["method", "step size", *map(steps_label, EVAL_STEPS), "mean"]
    rows = []
    for result in results:
        for lr, score in result.val_scores.items():
            chosen = " (chosen)" if lr == result.step_size else ""
            curve = result.val_curves.get(lr)
            cells = [f"{curve[k].mean().item():.3f}" if curve else "diverged" for k in EVAL_STEPS]
            rows.append([result.method.name, f"{step_size_label(lr)}{chosen}", *cells, f"{score:.3f}"])
    return "\n".join(markdown_table(header, rows))


def paired_table(results: list[Result], reference: Result, tasks: Sequence[str]) -> str:
    """Per-episode differences to ``reference`` on the same test episodes (negative: lower loss), domains as units."""
    header = ["method", "Δ before adaptation", *(f"Δ {steps_label(k)}" for k in EVAL_STEPS)]
    curves = {result.method.name: result.test_loss for result in results}
    return "\n".join(markdown_table(header, common.paired_rows(curves, reference.method.name, (0, *EVAL_STEPS), tasks)))


def domain_table(results: list[Result], domains: Sequence[str]) -> str:
    """Mean test query loss per held-out domain: before adaptation → after the most steps."""
    names = sorted(set(domains))
    last = max(EVAL_STEPS)
    counts = ", ".join(f"{name} {domains.count(name)}" for name in names)
    header = ["method", *names]
    lines = [f"Episodes per domain: {counts}.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = []
        for name in names:
            mask = torch.tensor([domain == name for domain in domains])
            before, after = result.test_loss[0][mask].mean().item(), result.test_loss[last][mask].mean().item()
            cells.append(f"{before:.2f} → {after:.2f}")
        lines.append(f"| {result.method.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[Result], path: Path, title: str, tasks: Sequence[str], reference: Result | None = None) -> None:
    """Test query loss vs adaptation steps, one line per method, 95% CI error bars (domains as units).

    With ``reference``, a second panel shows each method's paired difference to it.
    """
    panels = 2 if reference is not None and len(results) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 5.5), squeeze=False)
    ks = (0, *EVAL_STEPS)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for panel, ax in enumerate(axes[0]):
        for index, result in enumerate(results):
            if panel == 1 and result is reference:
                continue
            values = {k: result.test_loss[k] - (reference.test_loss[k] if panel else 0) for k in ks}
            offset = (index - (len(results) - 1) / 2) * 0.12  # keep the error bars apart
            finite = [k for k in ks if torch.isfinite(values[k]).all()]
            stats = [mean_and_ci95(values[k], groups=tasks) for k in finite]
            ax.errorbar(
                [k + offset for k in finite],
                [mean.item() for mean, _ in stats],
                yerr=[ci.item() for _, ci in stats],
                color=colors[index % len(colors)],
                marker="o",
                capsize=4,
                linewidth=2,
                label=f"{result.method.name}, step size {step_size_label(result.step_size)}",
            )
        ax.set_xticks(ks)
        ax.set_xlabel("SGD adaptation steps on the 4 support blocks")
        ax.grid(alpha=0.3)
        if panel == 0:
            ax.set_ylabel("query loss (nats/token), held-out test domains")
            ax.set_title("Query loss, mean ± 95% CI over the held-out domains", fontsize=11)
            ax.legend(fontsize=8.5)
        else:
            ax.axhline(0.0, color=colors[results.index(reference) % len(colors)], linewidth=1.5, linestyle="--")
            ax.set_ylabel("difference to the baseline (nats/token)")
            ax.set_title("Paired difference to the baseline (below 0: better)", fontsize=11)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Train every method, pick step sizes on validation, evaluate on test, print tables, save the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget", type=int, default=DEFAULT_BUDGET, help="block forward/backward passes per method (training)"
    )
    parser.add_argument("--seed", type=int, default=0, help="initial weights and training task stream")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="directory for adaptation.png"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core CPU)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    common.quiet_lightning()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # lightning 2.6 vs torch 2.13 deprecation notice
    warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*")  # peft 0.21 vs transformers 5 notice
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    methods = [METHODS[name] for name in args.methods]
    steps = {method.name: args.budget // (META_BATCH_SIZE * method.passes_per_task) for method in methods}
    train_data = make_datamodule(args.seed, batches_per_epoch=max(steps.values()))
    eval_data = train_data if args.seed == EVAL_DATA_SEED else make_datamodule(EVAL_DATA_SEED)
    val_batches, test_batches = eval_data.eval_batches("val"), eval_data.eval_batches("test")
    print(f"Data ready in {time.perf_counter() - started:.0f} s.", flush=True)

    results = []
    for method in methods:
        learner, algorithm, seconds, final_loss = train(method, steps[method.name], args.seed, train_data)
        eval_start = time.perf_counter()
        step_size, scores, curves = pick_step_size(learner, val_batches, method.grid, algorithm)
        test_loss = adaptation_curve(learner, test_batches, step_size, algorithm=algorithm)
        result = Result(
            method, steps[method.name], seconds, final_loss, step_size, scores, test_loss, val_curves=curves
        )
        result.eval_seconds = time.perf_counter() - eval_start
        results.append(result)
        print(
            f"{method.name}: {result.steps} steps ({result.steps * META_BATCH_SIZE * method.passes_per_task} block "
            f"passes) in {seconds:.0f} s, last train query_loss {final_loss:.3f}; "
            f"step size {step_size_label(step_size)} "
            f"(validation {', '.join(f'{step_size_label(lr)}: {s:.3f}' for lr, s in scores.items())}); "
            f"evaluation {result.eval_seconds:.0f} s",
            flush=True,
        )

    count = len(results[0].test_loss[0])
    domains = ", ".join(eval_data.split_domains["test"])
    test_domains = common.episode_tasks(test_batches)  # the domain is the task: the unit of the CIs
    print(
        f"\nQuery loss (nats/token) on {count} fixed test episodes from held-out domains ({domains}); "
        f"{SHOTS} support + {QUERIES} query blocks of {BLOCK_SIZE} tokens; mean over the domains ± 95% CI "
        f"with the domain as the unit; {args.budget} block forward/backward passes per method, seed {args.seed}:\n"
    )
    print(results_table(results, test_domains))
    print(f"\nValidation query loss ({NUM_VAL_TASKS} episodes) for each evaluation step size:\n")
    print(validation_table(results))
    baseline = next((r for r in results if isinstance(r.method.make_algorithm(), MultiTask)), None)
    if baseline is not None and len(results) > 1:
        print("\nPaired difference to the baseline on the same test episodes (negative: lower loss):\n")
        print(paired_table(results, baseline, test_domains))
    print(f"\nTest query loss by domain, before adaptation → after {max(EVAL_STEPS)} steps:\n")
    print(domain_table(results, test_domains))
    path = args.out / "adaptation.png"
    plot(
        results,
        path,
        f"Tiny GPT-2 adapting to held-out domains ({domains}): {count} test episodes, "
        f"{args.budget} training block fwd/bwd passes per method",
        test_domains,
        reference=baseline,
    )
    print(f"\nSaved {path}. Total wall time {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
