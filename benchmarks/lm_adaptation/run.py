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
(nats/token) before adaptation and after 1, 5 and 10 steps, as mean ± 95% CI over the test
episodes. Each method's evaluation step size is picked from a small grid on the *validation*
domains (mean query loss over 1, 5 and 10 steps) before the test episodes are touched.

    python benchmarks/lm_adaptation/run.py [--budget N] [--seed S] [--out DIR] [--methods ...]

Prints markdown tables and writes ``adaptation.png`` (loss vs adaptation steps) to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning
import matplotlib
import torch
from torch import Tensor

from lightning_meta import CausalLMLearner, LoraSettings, MetaLearningModule
from lightning_meta.algorithms import FOMAML, MAML, MAMLPlusPlus, MetaAlgorithm, MetaSGD, MultiTask, Reptile
from lightning_meta.datamodules.language_modeling import LanguageModelingTasksDataModule
from lightning_meta.learners import Learner
from lightning_meta.metrics import mean_and_ci95
from lightning_meta.tasks import TaskBatch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

MODEL_CONFIG = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_embd": 128,
    "n_head": 4,
    "n_positions": 128,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
TOKENIZER = "embedded-bpe-4096"
BLOCK_SIZE = 64
SHOTS = 4
QUERIES = 4
META_BATCH_SIZE = 4
NUM_VAL_TASKS = 16
NUM_TEST_TASKS = 64
EVAL_DATA_SEED = 0  # the validation and test episodes stay the same whatever --seed is
EVAL_STEPS = (1, 5, 10)
# Evaluation SGD step sizes tried on the validation domains, per method family.
ALL_WEIGHTS_GRID = (0.03, 0.1, 0.3)
LORA_GRID = (0.1, 0.3, 1.0)
META_LR = 5e-3
DEFAULT_BUDGET = 14_400  # block forward/backward passes per method (FOMAML: 300 outer steps, as the quick start)


@dataclass
class Method:
    """One row of the table: how to build its learner, algorithm and meta-optimizer."""

    name: str
    make_learner: Callable[[], CausalLMLearner]
    make_algorithm: Callable[[], MetaAlgorithm]
    optimizer: Callable[..., torch.optim.Optimizer]
    passes_per_task: int  # block forward/backward passes per task per outer step
    grid: tuple[float, ...]


def all_weights_learner() -> CausalLMLearner:
    """The tiny GPT-2 with every weight fast."""
    return CausalLMLearner(model_config=dict(MODEL_CONFIG), tokenizer=TOKENIZER)


def lora_learner() -> CausalLMLearner:
    """The tiny GPT-2 with LoRA adapters (r 8, alpha 16) as fast weights; base weights meta-learned too."""
    return CausalLMLearner(
        model_config=dict(MODEL_CONFIG),
        tokenizer=TOKENIZER,
        lora=LoraSettings(r=8, alpha=16),
        fast_weights="lora",
        meta_learn_base=True,
    )


def adamw(lr: float = META_LR) -> Callable[..., torch.optim.Optimizer]:
    """AdamW(lr, weight decay 0.01): the quick start's meta-optimizer (there with lr 2e-3)."""
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.01)


FOMAML_INNER = (0.1, 2)  # (inner_lr, inner_steps)
REPTILE_INNER = (0.1, 4)
MAML_LORA_INNER = (0.3, 1)
#: The "step size" of methods that adapt with their own learned rates (Meta-SGD, MAML++).
LEARNED = 0.0


def _step(step_size: float) -> str:
    return "learned" if step_size == LEARNED else f"{step_size:g}"


METHODS = {
    "fomaml": Method(
        f"FOMAML (all weights, {FOMAML_INNER[1]} inner steps)",
        all_weights_learner,
        lambda: FOMAML(inner_lr=FOMAML_INNER[0], inner_steps=FOMAML_INNER[1]),
        adamw(),
        SHOTS * FOMAML_INNER[1] + QUERIES,
        ALL_WEIGHTS_GRID,
    ),
    "reptile": Method(
        f"Reptile (all weights, {REPTILE_INNER[1]} inner steps)",
        all_weights_learner,
        lambda: Reptile(inner_lr=REPTILE_INNER[0], inner_steps=REPTILE_INNER[1]),
        adamw(),
        SHOTS * REPTILE_INNER[1],
        ALL_WEIGHTS_GRID,
    ),
    "maml_lora": Method(
        f"MAML 2nd order (LoRA fast, {MAML_LORA_INNER[1]} inner step{'s' * (MAML_LORA_INNER[1] > 1)})",
        lora_learner,
        lambda: MAML(inner_lr=MAML_LORA_INNER[0], inner_steps=MAML_LORA_INNER[1]),
        adamw(),
        SHOTS * MAML_LORA_INNER[1] + QUERIES,
        LORA_GRID,
    ),
    "metasgd_lora": Method(
        f"Meta-SGD (LoRA fast, {MAML_LORA_INNER[1]} inner step, learned rates)",
        lora_learner,
        lambda: MetaSGD(inner_lr=MAML_LORA_INNER[0], inner_steps=MAML_LORA_INNER[1]),
        adamw(),
        SHOTS * MAML_LORA_INNER[1] + QUERIES,
        (LEARNED,),
    ),
    "mamlpp_lora": Method(
        "MAML++ (LoRA fast, 2 inner steps: LSLR, MSL, DA)",
        lora_learner,
        lambda: MAMLPlusPlus(inner_lr=MAML_LORA_INNER[0], inner_steps=2, msl_anneal_steps=100, first_order_steps=50),
        adamw(),
        (SHOTS + QUERIES) * 2,  # every inner step's support pass and, for the multi-step loss, its query pass
        (LEARNED,),
    ),
    "baseline": Method(
        "Baseline: multi-domain LM training",
        all_weights_learner,
        lambda: MultiTask(inner_lr=0.1),
        adamw(),
        SHOTS + QUERIES,
        ALL_WEIGHTS_GRID,
    ),
}


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


def make_datamodule(seed: int, batches_per_epoch: int = 100) -> LanguageModelingTasksDataModule:
    """The quick start's LM tasks: 4 support + 4 query blocks of 64 tokens, meta-batch 4."""
    datamodule = LanguageModelingTasksDataModule(
        tokenizer=TOKENIZER,
        block_size=BLOCK_SIZE,
        shots=SHOTS,
        queries=QUERIES,
        meta_batch_size=META_BATCH_SIZE,
        batches_per_epoch=batches_per_epoch,
        num_val_tasks=NUM_VAL_TASKS,
        num_test_tasks=NUM_TEST_TASKS,
        seed=seed,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def train(
    method: Method, steps: int, seed: int, datamodule: LanguageModelingTasksDataModule
) -> tuple[CausalLMLearner, MetaAlgorithm, float, float]:
    """Meta-train one method with ``lightning.Trainer``; returns the learner, the algorithm, seconds, last loss."""
    lightning.seed_everything(seed, verbose=False)  # the same initial base weights for every method
    learner = method.make_learner()
    module = MetaLearningModule(learner, method.make_algorithm(), optimizer=method.optimizer)
    trainer = lightning.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    if trainer.global_step != steps:
        raise RuntimeError(f"{method.name}: trained {trainer.global_step} steps, expected {steps}.")
    return learner.eval(), module.algorithm, seconds, float(trainer.callback_metrics["train/query_loss"])


def adaptation_curves(
    learner: Learner,
    batches: Sequence[TaskBatch],
    step_size: float,
    steps: Sequence[int] = EVAL_STEPS,
    algorithm: MetaAlgorithm | None = None,
) -> dict[int, Tensor]:
    """Per-episode query loss before adaptation (key 0) and after each of ``steps`` SGD steps.

    One trajectory per episode: the library's public adaptation trajectory (``adapt_steps``, what
    every algorithm's ``adapt`` and evaluation run) with SGD steps of ``step_size``, so the losses
    after 1, 5 and 10 steps cost 10 steps, not 16. A diverged episode scores ``inf`` from then on.
    """
    # LEARNED: the trained algorithm's own rule (Meta-SGD's and MAML++'s learned rates).
    sgd = algorithm if step_size == LEARNED else MAML(inner_lr=step_size)
    losses: dict[int, list[Tensor]] = {0: [], **{k: [] for k in steps}}
    for batch in batches:
        for episode in batch.episodes():
            with torch.no_grad():
                losses[0].append(learner.loss(episode.query)[0])
            for step, weights in enumerate(sgd.adapt_steps(learner, episode.support, steps=max(steps)), start=1):
                if step in steps:
                    with torch.no_grad():
                        loss = learner.loss(episode.query, weights)[0]
                    losses[step].append(loss if torch.isfinite(loss) else torch.tensor(math.inf))
    return {k: torch.stack(values).double() for k, values in losses.items()}


def pick_step_size(
    learner: Learner, val_batches: Sequence[TaskBatch], grid: Sequence[float], algorithm: MetaAlgorithm
) -> tuple[float, dict[float, float], dict[float, dict[int, Tensor]]]:
    """The grid step size with the lowest validation query loss, averaged over ``EVAL_STEPS``."""
    curves = {lr: adaptation_curves(learner, val_batches, lr, algorithm=algorithm) for lr in grid}
    scores = {lr: float(torch.stack([curve[k].mean() for k in EVAL_STEPS]).mean()) for lr, curve in curves.items()}
    return min(scores, key=lambda lr: scores[lr]), scores, curves


def format_ci(values: Tensor) -> str:
    """``mean ± half-width`` of the 95% CI (``diverged`` if any episode diverged)."""
    if not torch.isfinite(values).all():
        return f"diverged ({int((~torch.isfinite(values)).sum())} episodes)"
    mean, ci95 = mean_and_ci95(values)
    return f"{mean.item():.3f} ± {ci95.item():.3f}"


def steps_label(k: int) -> str:
    """``after k step(s)``."""
    return f"after {k} step{'s' * (k > 1)}"


def markdown_table(results: list[Result]) -> str:
    """Test query loss (nats/token), mean ± 95% CI over the test episodes."""
    header = ["method", "outer steps", "eval step size", "before adaptation", *map(steps_label, EVAL_STEPS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = [
            result.method.name,
            str(result.steps),
            _step(result.step_size),
            *(format_ci(result.test_loss[k]) for k in (0, *EVAL_STEPS)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validation_table(results: list[Result]) -> str:
    """Validation query loss after 1/5/10 steps for every grid step size (what picked the step size)."""
    lines = [
        "| method | step size | " + " | ".join(map(steps_label, EVAL_STEPS)) + " | mean |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        for lr, curve in result.val_curves.items():
            chosen = " (chosen)" if lr == result.step_size else ""
            cells = [f"{curve[k].mean().item():.3f}" for k in EVAL_STEPS]
            lines.append(
                f"| {result.method.name} | {_step(lr)}{chosen} | "
                + " | ".join(cells)
                + f" | {result.val_scores[lr]:.3f} |"
            )
    return "\n".join(lines)


def paired_table(results: list[Result], reference: Result) -> str:
    """Per-episode differences to ``reference`` on the same test episodes (negative: lower loss)."""
    header = ["method", "Δ before adaptation", *(f"Δ {steps_label(k)}" for k in EVAL_STEPS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        if result is reference:
            continue
        cells = [format_ci(result.test_loss[k] - reference.test_loss[k]) for k in (0, *EVAL_STEPS)]
        lines.append(f"| {result.method.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def plot(results: list[Result], path: Path, title: str, reference: Result | None = None) -> None:
    """Test query loss vs adaptation steps, one line per method, 95% CI error bars.

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
            stats = [mean_and_ci95(values[k]) for k in finite]
            ax.errorbar(
                [k + offset for k in finite],
                [mean.item() for mean, _ in stats],
                yerr=[ci.item() for _, ci in stats],
                color=colors[index % len(colors)],
                marker="o",
                capsize=4,
                linewidth=2,
                label=f"{result.method.name}, step size {_step(result.step_size)}",
            )
        ax.set_xticks(ks)
        ax.set_xlabel("SGD adaptation steps on the 4 support blocks")
        ax.grid(alpha=0.3)
        if panel == 0:
            ax.set_ylabel("query loss (nats/token), held-out test domains")
            ax.set_title("Query loss, mean ± 95% CI over test episodes", fontsize=11)
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
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
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
        test_loss = adaptation_curves(learner, test_batches, step_size, algorithm=algorithm)
        result = Result(
            method, steps[method.name], seconds, final_loss, step_size, scores, test_loss, val_curves=curves
        )
        result.eval_seconds = time.perf_counter() - eval_start
        results.append(result)
        print(
            f"{method.name}: {result.steps} steps ({result.steps * META_BATCH_SIZE * method.passes_per_task} block "
            f"passes) in {seconds:.0f} s, last train query_loss {final_loss:.3f}; step size {_step(step_size)} "
            f"(validation {', '.join(f'{_step(lr)}: {s:.3f}' for lr, s in scores.items())}); "
            f"evaluation {result.eval_seconds:.0f} s",
            flush=True,
        )

    count = len(results[0].test_loss[0])
    domains = ", ".join(eval_data.split_domains["test"])
    print(
        f"\nQuery loss (nats/token) on {count} fixed test episodes from held-out domains ({domains}); "
        f"{SHOTS} support + {QUERIES} query blocks of {BLOCK_SIZE} tokens; mean ± 95% CI; "
        f"{args.budget} block forward/backward passes per method, seed {args.seed}:\n"
    )
    print(markdown_table(results))
    print(f"\nValidation query loss ({NUM_VAL_TASKS} episodes) for each evaluation step size:\n")
    print(validation_table(results))
    baseline = next((r for r in results if isinstance(r.method.make_algorithm(), MultiTask)), None)
    if baseline is not None and len(results) > 1:
        print("\nPaired difference to the baseline on the same test episodes (negative: lower loss):\n")
        print(paired_table(results, baseline))
    test_domains = [domain for batch in test_batches for domain in batch.metadata["domain"]]
    print(f"\nTest query loss by domain, before adaptation → after {max(EVAL_STEPS)} steps:\n")
    print(domain_table(results, test_domains))
    path = args.out / "adaptation.png"
    plot(
        results,
        path,
        f"Tiny GPT-2 adapting to held-out domains ({domains}): {count} test episodes, "
        f"{args.budget} training block fwd/bwd passes per method",
        reference=baseline,
    )
    print(f"\nSaved {path}. Total wall time {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
