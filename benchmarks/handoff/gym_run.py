"""The seed's hand-off on the text task gym (issue 27 section 4, "then the same on the text task gym").

The gym's one meta-learned result (``benchmarks/task_gym/``): second-order MAML with LoRA adapters as
fast weights adapts to the held-out test families by 5 SGD steps better than MultiTask does. Here that
model is handed to ordinary pretraining, N tokens in all per arm and seed:

  (a) pretraining only: ``CausalLMPretraining`` from the random weights, N tokens;
  (b) MAML-LoRA meta-training on the gym's training families (``--meta_tokens`` real tokens, the task
      gym's recipe), then pretraining for the rest of N;
  (c) MultiTask on the same episode stream for as many tokens, then pretraining for the rest.

The model is the task gym's tiny GPT-2 (512 positions, tied embeddings) with LoRA (r 8, alpha 16) on
``c_attn``/``c_proj``, every weight trained by the outer loop. The hand-off is the real one: the stage-1
checkpoint *exported* (LoRA merged into the weights) -> ``CausalLMPretraining(init_from=)``, on the
embedded corpus's training domains as ``run.py`` packs them (64-token blocks, 16 a step, AdamW 5e-3).

Each model (random init or after stage 1, at ``--eval_points`` pretraining steps, at the end) is scored on
  * language-modelling loss (nats/token) on held-out text (``control_run.heldout_text``: the last 2% of
    every training domain, pretraining's validation split);
  * the task gym's fixed test episodes at K = 4 (families ``string_transform`` and ``topic_to_title``,
    never trained on): output-token query loss and accuracy before adaptation and after 1 and 5 SGD
    steps on the K support examples, on *fresh* LoRA adapters (the same seed for every model: what a user
    of the exported folder would do), step size chosen per model from {0.1, 0.3, 1.0} on the gym's
    validation families as ``task_gym`` does.
After stage 1, (b) and (c) are also scored with the adapters they trained (before the export), to see
what the export's merge itself costs (exploratory).

Each arm's result is saved as it finishes (``results_gym/seed<N>/<arm>.pt``); a rerun skips finished
arms. ``--report`` prints the tables from whatever is there.

    python benchmarks/handoff/gym_run.py --seeds 0 1 2
    python benchmarks/handoff/gym_run.py --report
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import lightning
import torch
from torch import Tensor

from lightning_meta import CausalLMLearner, LoraSettings, MetaLearningModule
from lightning_meta.algorithms import FOMAML, MAML, MultiTask
from lightning_meta.handoff.export import export

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: common.py
sys.path.insert(0, str(HERE))  # run.py: the pretraining stage and its data
import common  # noqa: E402
import run as handoff  # noqa: E402


def _script(path: Path, name: str) -> ModuleType:
    """A benchmark script as a module under a name of its own (``benchmarks/*/run.py`` share their file names,
    and the tests load ``benchmarks/control/run.py`` as ``control_run``); loaded once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gym = _script(HERE.parent / "task_gym" / "run.py", "task_gym_run")  # the task gym's model, data and recipe
control = _script(HERE / "control_run.py", "handoff_control_run")  # held-out text, LM loss, the arm loop

MODEL = "tiny"
TOKENIZER = gym.MODELS[MODEL]["tokenizer"]
SHOTS = 4  # the task gym's primary K
ADAPT_STEPS = (1, gym.EVAL_SGD_STEPS)
FIGURES = ("loss", "accuracy")
EVAL_LORA_SEED = 1234  # the fresh adapters every scored model gets: the same for every arm and seed
ARMS = {"a": "(a) pretraining only", "b": "(b) MAML-LoRA, then pretraining", "c": "(c) MultiTask, then pretraining"}


def learner(folder: Path | None = None) -> CausalLMLearner:
    """The task gym's learner (random), or an exported folder with fresh LoRA adapters (seeded)."""
    if folder is None:
        return gym.make_learner(MODEL)
    torch.manual_seed(EVAL_LORA_SEED)
    return CausalLMLearner(
        pretrained=str(folder),
        tokenizer=TOKENIZER,
        lora=LoraSettings(r=8, alpha=16),
        fast_weights="lora",
        meta_learn_base=True,
    )


@functools.cache
def episodes(split: str) -> tuple[list, list[str]]:
    """The task gym's fixed episodes at K = 4 (``val``: 8 of the validation families; ``test``: 32) and their tasks."""
    batches = gym.make_datamodule(MODEL, SHOTS, gym.EVAL_DATA_SEED).eval_batches(split)
    return batches, [batch.episode(0).metadata["task"] for batch in batches]


def gym_figures(model: CausalLMLearner) -> dict:
    """Per test episode: loss and accuracy before and after 1 and 5 SGD steps on the LoRA weights; the step
    size is the one of ``gym.SGD_GRID`` with the lowest validation loss after 5 steps."""
    val, _ = episodes("val")
    val_loss = {}
    for lr in gym.SGD_GRID:
        curve = common.adaptation_curves(
            model, FOMAML(inner_lr=lr, eval_inner_steps=max(ADAPT_STEPS)), val, (max(ADAPT_STEPS),), ("loss",)
        )
        val_loss[lr] = float(curve["loss"][max(ADAPT_STEPS)].mean())
    step_size = min(val_loss, key=val_loss.__getitem__)
    test, _ = episodes("test")
    curves = common.adaptation_curves(
        model, FOMAML(inner_lr=step_size, eval_inner_steps=max(ADAPT_STEPS)), test, ADAPT_STEPS, FIGURES
    )
    return {"step_size": step_size, "val_loss_by_step_size": val_loss, **curves}


def evaluate(model: CausalLMLearner, text_blocks: int | None) -> dict:
    blocks, _ = control.heldout_text()
    return {"lm_loss": control.lm_losses(model.model, blocks[:text_blocks]), **gym_figures(model)}


def algorithm(arm: str) -> MAML | MultiTask:
    """The task gym's recipes: second-order MAML (1 inner step of 0.3 on the adapters) or MultiTask."""
    return MAML(inner_lr=0.3, inner_steps=1) if arm == "b" else MultiTask(inner_lr=0.3)


def stage1(arm: str, budget: int, seed: int, work: Path) -> tuple[MetaLearningModule, Path, int, int, float]:
    """The task gym's training of ``run_one`` (same learner, optimizer, data and token budget): the trained
    module, its export, its real tokens, its steps and its seconds."""
    lightning.seed_everything(seed, verbose=False)
    optimizer = functools.partial(torch.optim.AdamW, lr=gym.MODELS[MODEL]["meta_lr"], weight_decay=0.01)
    module = MetaLearningModule(learner(), algorithm(arm), optimizer=optimizer)
    tokens = common.RealTokenBudget(budget, support_passes=1, query_passes=1)
    run = common.benchmark_trainer(max_epochs=-1, default_root_dir=work, callbacks=[tokens])
    start = time.perf_counter()
    run.fit(module, datamodule=gym.make_datamodule(MODEL, SHOTS, seed))
    seconds = time.perf_counter() - start
    checkpoint = work / f"{arm}.ckpt"
    run.save_checkpoint(checkpoint)
    exported = Path(export(str(checkpoint), str(work / f"{arm}-export")))
    return module, exported, tokens.tokens, run.global_step, seconds


def random_init(seed: int, folder: Path) -> Path:
    """Stage 1's random base weights (same seed, same config; LoRA left out), saved as a model folder."""
    lightning.seed_everything(seed, verbose=False)
    options = {key: value for key, value in gym.MODELS[MODEL].items() if key != "meta_lr"}
    CausalLMLearner(**options).model.save_pretrained(folder)
    handoff.load_tokenizer_into(folder)
    return folder


def run_arm(arm: str, seed: int, args: argparse.Namespace, out: Path) -> None:
    """Train and score one arm of one seed; its result file ``out/<arm>.pt``."""
    started = time.perf_counter()
    block_tokens = handoff.PRETRAIN_BATCH * handoff.lm.BLOCK_SIZE
    points: list[dict] = []
    seconds: dict[str, float] = {}

    def score(stage: str, model: CausalLMLearner, meta_tokens: int, pretrain_steps: int) -> None:
        start = time.perf_counter()
        figures = evaluate(model, args.text_blocks)
        seconds[f"evaluate {stage}"] = time.perf_counter() - start
        points.append(
            {
                "stage": stage,
                "meta_tokens": meta_tokens,
                "pretrain_tokens": pretrain_steps * block_tokens,
                "pretrain_steps": pretrain_steps,
                **figures,
            }
        )
        loss = figures["loss"]
        print(
            f"seed {seed} {ARMS[arm]} {stage}: LM loss {float(figures['lm_loss'].mean()):.3f}, gym loss "
            + ", ".join(f"{k}: {float(loss[k].mean()):.3f}" for k in (0, *ADAPT_STEPS))
            + f" (step size {figures['step_size']:g})",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix=f"handoff-gym-{seed}-{arm}-") as scratch:
        work = Path(scratch)
        meta_steps = 0
        if arm == "a":
            folder, meta_tokens = random_init(seed, work / "random"), 0
            score("random init", learner(folder), 0, 0)
        else:
            module, folder, meta_tokens, meta_steps, seconds["stage 1"] = stage1(
                arm, args.meta_tokens, seed, work / "stage1"
            )
            module.learner.eval()
            score("after stage 1, own adapters", module.learner, meta_tokens, 0)
            del module
            score("after stage 1", learner(folder), meta_tokens, 0)
        seconds |= control.pretrain_and_score(
            folder,
            meta_tokens,
            args,
            seed,
            work,
            lambda stage, exported, mark: score(stage, learner(exported), meta_tokens, mark),
        )
    seconds["total"] = time.perf_counter() - started
    settings = {key: getattr(args, key) for key in ("tokens", "meta_tokens", "eval_points", "text_blocks")}
    record = {
        "points": points,
        "seconds": seconds,
        "settings": settings | {"meta_steps": meta_steps},
        "text_domains": control.heldout_text()[1][: args.text_blocks],
        "tasks": episodes("test")[1],
    }
    control.save_arm(out, arm, record)
    print(f"seed {seed} {ARMS[arm]}: {seconds}", flush=True)


# --------------------------------------------------------------------------------------------- report


def report(out: Path) -> None:
    runs = control.load(out)
    if not runs:
        raise SystemExit(f"No results in {out}: run with --seeds first.")
    seeds = sorted(runs)
    complete = [s for s in seeds if set(runs[s]) == set(ARMS)]
    print(f"Seeds with every arm: {complete}; seeds with some: {seeds}")
    first = runs[seeds[0]][next(iter(runs[seeds[0]]))]
    print(f"Settings: {first['settings']}")
    domains, tasks = first["text_domains"], first["tasks"]

    def cell(values: list[Tensor], signed: bool = False, groups: list | None = None) -> str:
        return common.seed_spread(torch.stack(values), signed=signed, tasks=groups if groups is not None else tasks)

    steps = (0, *ADAPT_STEPS)
    header = [
        "model",
        "stage",
        "tokens (meta + pretraining)",
        "LM loss (held-out text)",
        *(f"gym loss {common.steps_label(k) if k else 'before adaptation'}" for k in steps),
        f"gym accuracy {common.steps_label(max(steps))}",
        "step sizes",
    ]
    rows = []
    for arm in ARMS:
        have = [s for s in seeds if arm in runs[s]]
        if not have:
            continue
        for index, point in enumerate(runs[have[0]][arm]["points"]):
            at = [runs[s][arm]["points"][index] for s in have]
            rows.append(
                [
                    ARMS[arm],
                    point["stage"],
                    f"{point['meta_tokens']:,} + {point['pretrain_tokens']:,}",
                    cell([p["lm_loss"] for p in at], groups=domains),
                    *(cell([p["loss"][k] for p in at]) for k in steps),
                    cell([p["accuracy"][max(steps)] for p in at]),
                    ", ".join(f"{p['step_size']:g}" for p in at),
                ]
            )
    print(
        "\nPer arm and stage: mean ± 95% CI (LM loss: the text domains as units; gym: the test tasks as units; "
        "seeds as units too) [lowest, highest seed mean]. Gym figures on fresh LoRA adapters unless the stage "
        "says own adapters:\n"
    )
    print("\n".join(common.markdown_table(header, rows)))

    def point(s: int, arm: str, stage: str) -> dict:
        return next(p for p in runs[s][arm]["points"] if p["stage"] == stage)

    comparisons = [
        ("b", "after stage 1", "c", "after stage 1"),
        ("b", "after stage 2", "c", "after stage 2"),
        ("b", "after stage 2", "a", "after stage 2"),
        ("c", "after stage 2", "a", "after stage 2"),
        ("b", "after stage 1, own adapters", "c", "after stage 1, own adapters"),
        ("b", "after stage 2", "b", "after stage 1"),
        ("c", "after stage 2", "c", "after stage 1"),
    ]
    rows = []
    for arm1, stage1_, arm2, stage2_ in comparisons:
        have = [s for s in seeds if arm1 in runs[s] and arm2 in runs[s]]
        if not have:
            continue
        pairs = [(point(s, arm1, stage1_), point(s, arm2, stage2_)) for s in have]
        name = (
            f"{ARMS[arm1]}: {stage1_.removeprefix('after ')} − {stage2_.removeprefix('after ')}"
            if arm1 == arm2
            else f"{ARMS[arm1]} − {ARMS[arm2]}, {stage1_.removeprefix('after ')}"
        )
        rows.append(
            [
                name,
                *(cell([x["loss"][k] - y["loss"][k] for x, y in pairs], signed=True) for k in steps),
                cell([x["lm_loss"] - y["lm_loss"] for x, y in pairs], signed=True, groups=domains),
            ]
        )
    print(
        "\nPaired differences (same test episodes and text blocks; negative = lower loss); bold where the 95% CI "
        "excludes 0:\n"
    )
    header = [
        "difference",
        *(f"gym loss {common.steps_label(k) if k else 'before adaptation'}" for k in steps),
        "LM loss",
    ]
    print("\n".join(common.markdown_table(header, rows)))
    spent = sum(run[arm]["seconds"]["total"] for run in runs.values() for arm in run)
    print(f"\nWall time of all saved arms: {spent / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    parser = control.arm_parser(__doc__.split("\n\n")[0], tokens=600_000, eval_points=[50], out=HERE / "results_gym")
    parser.add_argument("--meta_tokens", type=int, default=300_000, help="stage-1 real tokens of (b) and (c)")
    control.run_and_report(parser.parse_args(argv), ARMS, run_arm, report)


if __name__ == "__main__":
    main()
