"""The methods on the control task families, side by side: what can each algorithm learn at small scale?

Every arm trains the same tiny GPT-2 (random init, untied output head) on the control families
(:mod:`lightning_meta.datamodules.control_tasks`: each task's rule is drawn afresh, so only its support tells
it) for the same training compute, **real tokens through forward + backward** (:class:`common.RealTokenBudget`;
MetaICL counts each demonstration once per query it precedes, the second-order backward is not counted
extra), and is then measured on fixed held-out test tasks (fresh rules no training episode had), the same
for every arm, at K = 1, 2, 4, 8, 16 support examples:

- ``metaicl``, ``metaicl_channel``: MetaICL, direct and channel (Min et al. 2022), evaluated in context
  (``configs/control_metaicl_tiny.yaml``'s settings);
- ``anil``: second-order MAML on the output head (``configs/control_maml_tiny.yaml``'s recipe);
- ``fomaml``, ``reptile``, ``metasgd``: first-order MAML, Reptile and Meta-SGD on the same head;
- ``maml``: second-order MAML on all weights (MAML on the head is ANIL);
- ``multitask``: joint training on every task's examples, adapted by SGD on the head at test.

The gradient-based arms are evaluated after 0..``eval_steps`` steps of their own inner update on the support
(``eval_curve``; step 0 is zero-shot), the MetaICL arms zero-shot and in context. Figures per test task:
accuracy and control_gap = (accuracy - chance) / (ceiling - chance), with the analytic ceiling and chance
of the task's K (``training/metrics.py`` ``control_metrics``); tables give the mean over tasks ± 95% CI with
tasks and seeds as the units, [lowest, highest seed mean], and differences to ANIL paired by task and seed.

Each (method, seed) arm runs in its own process (one thread) and writes ``{arm}.json`` under ``--out``;
a rerun skips the finished arms, and results of other settings are refused, never mixed.

    python benchmarks/control/run.py [--methods ...] [--seeds 0 1 2] [--budget N]
    python benchmarks/control/run.py --report           # tables and plot from the results so far
    python benchmarks/control/run.py --smoke --out DIR   # end to end in seconds, a smaller model and budget
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import common  # noqa: E402


@dataclass(frozen=True)
class Settings:
    """Everything that decides the figures (saved with each arm's results)."""

    model_config: dict[str, Any] = field(
        default_factory=lambda: {
            "model_type": "gpt2",
            "n_layer": 2,
            "n_embd": 128,
            "n_head": 4,
            "n_positions": 128,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": False,
        }
    )
    families: tuple[str, ...] = ("label_mapping",)
    classes: int = 4
    words: int | None = 16  # input and label words per split (control_metaicl_tiny's setting)
    held_out_words: bool = False
    shots: int = 8  # support examples per training episode
    budget: int = 57_600  # real tokens per arm: 100 steps of control_maml_tiny (16 episodes of 36 tokens)
    eval_shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    eval_queries: int = 4
    test_tasks: int = 64  # fixed test tasks (one episode each) per K
    eval_steps: int = 10  # SGD steps along the curve of the gradient-based arms
    primary_steps: int = 5  # the curve point of the primary metric (control_maml_tiny's eval_inner_steps)
    primary_shots: int = 8
    warmup_steps: int = 50  # MetaICL's linear warm-up (control_metaicl_tiny warms up over 100 of 4,000 steps)


FULL = Settings()
SMOKE = Settings(
    model_config={
        "model_type": "gpt2",
        "n_layer": 1,
        "n_embd": 32,
        "n_head": 2,
        "n_positions": 128,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": False,
    },
    budget=1_500,
    eval_shots=(1, 4),
    test_tasks=4,
    eval_steps=2,
    primary_steps=2,
    primary_shots=4,
    warmup_steps=2,
)
TOKENIZER = "embedded-bpe-4096"
EVAL_SEED = 0  # the test tasks are the same whatever the training seed


@dataclass(frozen=True)
class Method:
    """One arm's method: its algorithm, fast weights and training episodes."""

    label: str
    make_algorithm: Callable[[], Any]
    fast_weights: str = "head"
    # Forward + backward passes over the support's and the query's real tokens per episode (MetaICL: each
    # query runs after the whole support, so the support's tokens run once per query).
    support_passes: int = 1
    query_passes: int = 1
    queries: int = 4
    meta_batch_size: int = 16
    meta_lr: float = 3e-4
    channel: bool = False  # trains on the channel sequences and scores options by channel
    in_context: bool = False  # evaluated in context (else along SGD steps)
    meta_batch: str = "vmap"  # how a step's tasks run (MetaLearningModule's meta_batch)


def methods() -> dict[str, Method]:
    from lightning_meta.algorithms import ANIL, FOMAML, MAML, MetaICL, MetaSGD, MultiTask, Reptile

    in_context = {
        "support_passes": 1,
        "query_passes": 1,
        "queries": 1,
        "meta_batch_size": 32,
        "meta_lr": 1e-3,
        "in_context": True,
    }
    return {
        "metaicl": Method("MetaICL", lambda: MetaICL(demonstration_loss=True), **in_context),
        "metaicl_channel": Method(
            "Channel MetaICL", lambda: MetaICL(demonstration_loss=True, direction="channel"), channel=True, **in_context
        ),
        "multitask": Method("MultiTask (SGD on the head at test)", lambda: MultiTask(inner_lr=1.0)),
        "anil": Method("ANIL (MAML on the head, 2nd order)", lambda: ANIL(inner_lr=1.0, inner_steps=1)),
        "fomaml": Method("FOMAML (head)", lambda: FOMAML(inner_lr=1.0, inner_steps=1)),
        "reptile": Method(
            "Reptile (head, 5 steps)", lambda: Reptile(inner_lr=1.0, inner_steps=5), support_passes=5, query_passes=0
        ),
        "metasgd": Method("Meta-SGD (head)", lambda: MetaSGD(inner_lr=1.0, inner_steps=1)),
        "maml": Method(
            "MAML (all weights, 2nd order)",
            lambda: MAML(inner_lr=0.03, inner_steps=1),
            fast_weights="all",
            meta_batch="auto",
        ),  # second order through layer norms: not under vmap
    }


def arm_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def make_learner(settings: Settings, method: Method) -> Any:
    from lightning_meta import CausalLMLearner

    scoring = "channel" if method.channel else "sum"
    return CausalLMLearner(
        model_config=dict(settings.model_config),
        tokenizer=TOKENIZER,
        attn_implementation="eager",
        fast_weights=method.fast_weights,
        scoring=scoring,
    )


def make_datamodule(settings: Settings, method: Method, seed: int, shots: int, queries: int) -> Any:
    from lightning_meta.datamodules import TextToTextTasksDataModule
    from lightning_meta.datamodules.control_tasks import ControlSettings

    control = ControlSettings(
        families=list(settings.families),
        classes=settings.classes,
        words=settings.words,
        held_out_words=settings.held_out_words,
    )
    datamodule = TextToTextTasksDataModule(
        tokenizer=TOKENIZER,
        dataset="control",
        control=control,
        channel=method.channel,
        shots=shots,
        queries=queries,
        max_length=16,
        meta_batch_size=method.meta_batch_size,
        batches_per_epoch=1000,
        num_val_tasks=1,
        num_test_tasks=settings.test_tasks,
        eval_meta_batch_size=16,
        seed=seed,
    )
    datamodule.setup("fit")
    return datamodule


def write_json(path: Path, data: dict) -> None:
    """Written whole or not at all (a killed run leaves the previous file)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1))
    temporary.replace(path)


# ------------------------------------------------------------------------------------ one arm


def run_arm(settings: Settings, method_name: str, seed: int, out: Path) -> None:
    """Trains one arm for the token budget and evaluates it at every K; writes ``{arm}.json``."""
    import warnings

    import lightning
    import torch

    from lightning_meta import MetaLearningModule

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    common.quiet_lightning()
    method = methods()[method_name]
    lightning.seed_everything(seed, verbose=False)
    learner = make_learner(settings, method)
    support_passes = method.queries if method.in_context else method.support_passes
    rows = "channel_sequence_" if method.channel else ""
    budget = common.RealTokenBudget(settings.budget, support_passes, method.query_passes, rows=rows)
    optimizer = lambda params: torch.optim.AdamW(params, lr=method.meta_lr, weight_decay=0.01)  # noqa: E731
    warmup = settings.warmup_steps if method.in_context else 0
    scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))  # noqa: E731
    module = MetaLearningModule(
        learner, method.make_algorithm(), optimizer=optimizer, lr_scheduler=scheduler, meta_batch=method.meta_batch
    )
    trainer = common.benchmark_trainer(max_epochs=-1, callbacks=[budget], gradient_clip_val=1.0, log_every_n_steps=10)
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=make_datamodule(settings, method, seed, settings.shots, method.queries))
    train = {
        "steps": trainer.global_step,
        "tokens": budget.tokens,
        "train_seconds": time.perf_counter() - start,
        "train_cpu_seconds": time.process_time() - cpu_start,
        "final_train_loss": float(trainer.callback_metrics.get("train/query_loss", math.nan)),
    }
    learner.eval()
    start, cpu_start = time.perf_counter(), time.process_time()
    curve = None if method.in_context else list(range(settings.eval_steps + 1))
    by_shots = {}
    for shots in settings.eval_shots:
        datamodule = make_datamodule(settings, method, EVAL_SEED, shots, settings.eval_queries)
        batches = datamodule.eval_batches("test")
        figures = common.episode_figures(
            learner, module.algorithm, batches, eval_curve=curve, meta_batch=method.meta_batch
        )
        by_shots[str(shots)] = {
            "task": common.episode_tasks(batches),
            **{name: values.tolist() for name, values in sorted(figures.items()) if curve_figure(name)},
        }
    write_json(
        out / f"{arm_name(method_name, seed)}.json",
        {
            "method": method_name,
            "seed": seed,
            "settings": asdict(settings),
            **train,
            "eval_seconds": time.perf_counter() - start,
            "eval_cpu_seconds": time.process_time() - cpu_start,
            "figures": by_shots,
        },
    )


def curve_figure(name: str) -> bool:
    """The figures an arm's results keep: accuracy and control_gap (before, in context or along the curve),
    the output loss, ceiling and chance."""
    return name in ("ceiling", "chance") or name.startswith(
        ("accuracy_pre", "accuracy_post", "accuracy_step", "control_gap", "loss_")
    )


def finished(out: Path, method: str, seed: int, settings: Settings) -> bool:
    """Whether the arm's results exist (with these settings: other settings are an error)."""
    path = out / f"{arm_name(method, seed)}.json"
    if not path.exists():
        return False
    check_settings(path, json.loads(path.read_text()), settings)
    return True


def check_settings(path: Path, result: dict, settings: Settings) -> None:
    """Results of other settings are never mixed with these."""
    current = json.loads(json.dumps(asdict(settings)))  # as a results file holds them (tuples as lists)
    if result.get("settings") != current:
        raise SystemExit(
            f"{path} was written with other settings ({result.get('settings')}): give another --out, "
            "or delete the file to run this arm again."
        )


# ------------------------------------------------------------------------------------ report


def load_results(out: Path) -> dict[str, list[dict]]:
    """Each method's results, by seed, methods in :func:`methods` order."""
    results: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*-seed*.json")):
        result = json.loads(path.read_text())
        results.setdefault(result["method"], []).append(result)
    return {name: sorted(results[name], key=lambda r: r["seed"]) for name in methods() if name in results}


def adapted_key(result: dict, figure: str, steps: int | None) -> str:
    """The key of ``figure`` after adaptation: in context (``_post``) for MetaICL, else after ``steps`` steps."""
    return f"{figure}_post" if methods()[result["method"]].in_context else f"{figure}_step{steps}"


def per_seed(runs: list[dict], shots: int, key: str) -> Any:
    """A (seeds, tasks) float64 tensor of ``key`` at K = ``shots``."""
    import torch

    return torch.tensor([r["figures"][str(shots)][key] for r in runs], dtype=torch.float64)


def report(out: Path) -> str:
    results = load_results(out)
    if not results:
        return "No results yet."
    first = next(iter(results.values()))[0]
    settings = Settings(
        **{
            **first["settings"],
            "families": tuple(first["settings"]["families"]),
            "eval_shots": tuple(first["settings"]["eval_shots"]),
        }
    )
    names = methods()
    shots_all = settings.eval_shots
    k, steps = settings.primary_shots, settings.primary_steps
    tasks = {shots: first["figures"][str(shots)]["task"] for shots in shots_all}
    ceiling = {shots: sum(first["figures"][str(shots)]["ceiling"]) / len(tasks[shots]) for shots in shots_all}
    chance = sum(first["figures"][str(k)]["chance"]) / len(tasks[k])
    lines = [
        f"{settings.test_tasks} fixed held-out test tasks per K (families {', '.join(settings.families)}), "
        f"{settings.eval_queries} queries each; {settings.budget:,} real training tokens per arm. Mean over "
        "tasks ± 95% CI with tasks and seeds as the units; [lowest, highest seed mean]. In context for MetaICL, "
        f"after {steps} SGD steps on the support for the others. Chance {chance:.3f}; ceiling by K: "
        + ", ".join(f"K={s}: {ceiling[s]:.3f}" for s in shots_all)
        + "."
    ]
    for figure in ("control_gap", "accuracy"):
        lines += [f"\n### {figure} against K\n"]
        rows = []
        for name, runs in results.items():
            zero = common.seed_spread(per_seed(runs, k, f"{figure}_pre"), tasks=tasks[k])  # K's queries, no support
            cells = [
                common.seed_spread(per_seed(runs, s, adapted_key(runs[0], figure, steps)), tasks=tasks[s])
                for s in shots_all
            ]
            rows.append([names[name].label, str(len(runs)), zero, *cells])
        header = ["method", "seeds", f"zero-shot (K={k}'s tasks)", *(f"K={s}" for s in shots_all)]
        lines += common.markdown_table(header, rows)
    curved = {name: runs for name, runs in results.items() if not names[name].in_context}
    if curved:
        step_range = range(settings.eval_steps + 1)
        lines += [f"\n### control_gap against SGD steps at K = {k} (mean ± 95% CI, tasks and seeds as units)\n"]
        rows = [
            [
                names[name].label,
                *(
                    common.seed_spread(per_seed(runs, k, f"control_gap_step{s}"), tasks=tasks[k]).split(" [")[0]
                    for s in step_range
                ),
            ]  # without the seeds' range: 11 columns
            for name, runs in curved.items()
        ]
        lines += common.markdown_table(["method", *(f"{s} steps" for s in step_range)], rows)
    if "anil" in results:
        lines += ["\n### control_gap − ANIL, paired by task and seed (bold: the CI excludes 0)\n"]
        rows = []
        for name, runs in results.items():
            if name != "anil":
                rows.append(
                    [names[name].label, *(paired(runs, results["anil"], s, steps, tasks[s]) for s in shots_all)]
                )
        lines += common.markdown_table(["method", *(f"K={s}" for s in shots_all)], rows)
    lines += ["\n### Training and evaluation\n"]
    rows = [
        [
            names[name].label,
            str(r["seed"]),
            str(r["steps"]),
            f"{r['tokens']:,}",
            f"{r['train_cpu_seconds']:.0f}",
            f"{r['train_seconds']:.0f}",
            f"{r['eval_cpu_seconds']:.0f}",
            f"{r['final_train_loss']:.3f}",
        ]
        for name, runs in results.items()
        for r in runs
    ]
    lines += common.markdown_table(
        ["method", "seed", "steps", "tokens", "train CPU s", "train wall s", "eval CPU s", "final train loss"], rows
    )
    plot(results, settings, ceiling, chance, out / "control.png")
    return "\n".join(lines)


def paired(runs: list[dict], reference: list[dict], shots: int, steps: int, tasks: list[str]) -> str:
    """control_gap of ``runs`` − ``reference`` at K = ``shots``, paired by task and seed (seeds both have)."""
    import torch

    theirs = {r["seed"]: r for r in reference}
    pairs = [(r, theirs[r["seed"]]) for r in runs if r["seed"] in theirs]
    if not pairs:
        return "–"
    differences = torch.stack(
        [
            per_seed([a], shots, adapted_key(a, "control_gap", steps))[0]
            - per_seed([b], shots, adapted_key(b, "control_gap", steps))[0]
            for a, b in pairs
        ]
    )
    return common.seed_spread(differences, signed=True, tasks=tasks)


def plot(
    results: dict[str, list[dict]], settings: Settings, ceiling: dict[int, float], chance: float, path: Path
) -> None:
    """Accuracy against K (categorical axis) with ceiling and chance, and control_gap against steps at the
    primary K; 95% CI bars over tasks and seeds."""
    import matplotlib

    from lightning_meta.training.metrics import mean_and_ci95

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def point(runs: list[dict], shots: int, key: str) -> tuple[float, float]:
        values = per_seed(runs, shots, key)
        tasks = runs[0]["figures"][str(shots)]["task"]
        mean, ci95 = mean_and_ci95(
            values.flatten(), groups=tasks * len(runs), seeds=[s for s in range(len(runs)) for _ in tasks]
        )
        return float(mean), float(ci95)

    names = methods()
    shots_all = settings.eval_shots
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    positions = list(range(len(shots_all)))
    left.plot(positions, [ceiling[s] for s in shots_all], "k--", label="ceiling (Bayes-optimal reader)")
    left.axhline(chance, color="grey", linestyle=":", label="chance")
    for color, (name, runs) in enumerate(results.items()):
        means, errors = zip(
            *(point(runs, s, adapted_key(runs[0], "accuracy", settings.primary_steps)) for s in shots_all), strict=True
        )
        offset = (color - len(results) / 2) * 0.03  # bars side by side, not on top of each other
        left.errorbar(
            [p + offset for p in positions],
            means,
            yerr=errors,
            marker="o",
            capsize=2,
            color=f"C{color}",
            linestyle="-" if names[name].in_context else "--",
            label=names[name].label,
        )
        if not names[name].in_context:
            steps = range(settings.eval_steps + 1)
            means, errors = zip(
                *(point(runs, settings.primary_shots, f"control_gap_step{s}") for s in steps), strict=True
            )
            right.errorbar(
                list(steps), means, yerr=errors, marker="o", capsize=2, color=f"C{color}", label=names[name].label
            )
        else:
            mean, error = point(runs, settings.primary_shots, "control_gap_post")
            right.axhspan(
                mean - error, mean + error, color=f"C{color}", alpha=0.2, label=f"{names[name].label}, in context"
            )
    left.set_xticks(positions, [str(s) for s in shots_all])
    left.set_xlabel("support examples K")
    left.set_ylabel(f"test accuracy (in context; SGD: after {settings.primary_steps} steps)")
    left.legend(fontsize=6)
    right.axhline(1.0, color="black", linestyle="--", label="ceiling")
    right.axhline(0.0, color="grey", linestyle=":", label="chance")
    right.set_xlabel("SGD steps on the support")
    right.set_ylabel(f"test control_gap at K = {settings.primary_shots}")
    right.legend(fontsize=6)
    figure.suptitle(
        "Control tasks, held out: mean over tasks and seeds, 95% CI with tasks and seeds as units", fontsize=9
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(methods()), choices=list(methods()))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, help=f"real tokens per arm (default {FULL.budget:,})")
    parser.add_argument("--test-tasks", type=int, help=f"fixed test tasks per K (default {FULL.test_tasks})")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="arms at once, one process (one thread) each; 0: one after another in this process",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--smoke", action="store_true", help="a smaller model, budget and test set: seconds")
    parser.add_argument("--report", action="store_true", help="only print the tables from the results so far")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    changes = {"budget": args.budget, "test_tasks": args.test_tasks}
    settings = replace(settings, **{key: value for key, value in changes.items() if value is not None})
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        run_arm(settings, args.one[0], int(args.one[1]), args.out)
        return
    if not args.report:
        run_all(args, settings)
    print(report(args.out))


def run_all(args: argparse.Namespace, settings: Settings) -> None:
    """Every unfinished arm, seeds in the outer loop (every method's seed 0 first), ``--workers`` at a time."""
    arms = [(method, seed) for seed in args.seeds for method in args.methods]
    todo = [(method, seed) for method, seed in arms if not finished(args.out, method, seed, settings)]
    for method, seed in [arm for arm in arms if arm not in todo]:
        print(f"skip {arm_name(method, seed)}: finished", flush=True)
    if args.workers == 0:
        for method, seed in todo:
            run_arm(settings, method, seed, args.out)
        return
    options = ["--out", str(args.out), "--budget", str(settings.budget), "--test-tasks", str(settings.test_tasks)]
    options += ["--smoke"] * args.smoke

    def command(method: str, seed: int) -> list[str]:
        return [sys.executable, __file__, *options, "--one", method, str(seed)]

    common.run_arm_processes(todo, command, args.workers, arm_name)


if __name__ == "__main__":
    main()
