"""The seed's hand-off on a model that has learned to learn (issue 27 section 4).

The tiny GPT-2 of ``configs/control_maml_tiny.yaml`` (2 layers, width 128, an untied output head), its
recipe copied here: second-order MAML adapting the head to a label-mapping control task's 8 support
examples (every task's labels drawn afresh, held-out words at test), which meta-learns within a few
CPU minutes. Per seed, ``--tokens`` N tokens in all:

  (a) pretraining only: ``CausalLMPretraining`` from the random weights, N tokens;
  (b) MAML meta-training on the control tasks (``--meta_steps``), then pretraining for N minus the
      meta-training's tokens;
  (c) MultiTask (joint) training on the same control tasks for as many steps and tokens, then
      pretraining for the rest of N.

Pretraining starts from the stage-1 checkpoint *exported* (``export`` -> ``init_from``, the real
hand-off), on the embedded corpus's training domains as ``run.py`` packs them (64-token blocks, 16 a
step, AdamW lr 5e-3). Tokens are real (unpadded) tokens through forward and backward: a MAML step
counts its support once (one inner step) and its query once, MultiTask its support and query once,
a pretraining step its 16 x 64 tokens.

Each model (the random init, after stage 1, and at ``--eval_points`` pretraining steps after the
hand-off, the last being the end) is scored on:
  * language-modelling loss (nats/token) on held-out text: the last 2% of each training domain's text,
    which pretraining never trains on (its validation split), per 64-token block;
  * control_gap and accuracy on 256 held-out control tasks (words no training task used) before and
    after 1, 2 and 5 SGD steps (step size 1.0) on the head: the adaptation MAML meta-trained for.

Each arm's result is saved as it finishes (``results_control/seed<N>/<arm>.pt``); a rerun skips
finished arms. ``--report`` prints the tables from whatever is there.

    python benchmarks/handoff/control_run.py --seeds 0 1 2
    python benchmarks/handoff/control_run.py --report
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning
import torch
from torch import Tensor

from lightning_meta import CausalLMLearner, MetaLearningModule
from lightning_meta.algorithms import MAML, MultiTask
from lightning_meta.data.corpus import embedded_domains
from lightning_meta.data.local_files import write_file_atomically
from lightning_meta.datamodules import PackedTextDataModule, TextToTextTasksDataModule
from lightning_meta.datamodules.control_tasks import ControlSettings
from lightning_meta.datamodules.language_modeling import EMBEDDED_TEST_DOMAINS, EMBEDDED_VAL_DOMAINS
from lightning_meta.handoff.export import export

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: common.py
sys.path.insert(0, str(HERE))  # run.py: the pretraining stage and its data
import common  # noqa: E402
import run as handoff  # noqa: E402

TOKENIZER = "embedded-bpe-4096"
# configs/control_maml_tiny.yaml's model (n_positions 64 = the pretraining block): an untied head.
MODEL_CONFIG = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_embd": 128,
    "n_head": 4,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "tie_word_embeddings": False,
}
META_LR = 3e-4  # configs/control_maml_tiny.yaml: AdamW(3e-4, weight decay 0.01), gradient clipping 1.0
INNER_LR = 1.0
ADAPT_STEPS = (1, 2, 5)
CONTROL_TEST_TASKS = 256
EVAL_DATA_SEED = 0  # the held-out control tasks stay the same whatever the training seed is
ARMS = {"a": "(a) pretraining only", "b": "(b) MAML, then pretraining", "c": "(c) MultiTask, then pretraining"}
FIGURES = ("control_gap", "accuracy")


def learner(pretrained: Path | None = None) -> CausalLMLearner:
    """The recipe's learner: the tiny GPT-2 (random, or from an exported folder) adapting its head."""
    source = {"pretrained": str(pretrained)} if pretrained is not None else {"model_config": dict(MODEL_CONFIG)}
    return CausalLMLearner(**source, tokenizer=TOKENIZER, attn_implementation="eager", fast_weights="head")


def algorithm(name: str, inner_lr: float = INNER_LR) -> MAML | MultiTask:
    """MAML (the recipe's) or MultiTask with the same adaptation at test: 5 SGD steps of 1.0 on the head."""
    if name == "maml":
        return MAML(inner_lr=inner_lr, inner_steps=1, eval_inner_steps=max(ADAPT_STEPS))
    return MultiTask(inner_lr=inner_lr, eval_inner_steps=max(ADAPT_STEPS))


def control_data(seed: int, steps: int = 1000, test_tasks: int = CONTROL_TEST_TASKS) -> TextToTextTasksDataModule:
    """configs/control_maml_tiny.yaml's data: label mapping, 4 classes, 8 shots, 4 queries, held-out words."""
    data = TextToTextTasksDataModule(
        tokenizer=TOKENIZER,
        dataset="control",
        shots=8,
        queries=4,
        max_length=16,
        meta_batch_size=16,
        control=ControlSettings(families=["label_mapping"], classes=4, held_out_words=True),
        batches_per_epoch=steps,
        num_val_tasks=16,
        num_test_tasks=test_tasks,
        seed=seed,
    )
    data.setup("fit")
    return data


@functools.cache
def control_test_batches(test_tasks: int) -> list:
    return control_data(EVAL_DATA_SEED, test_tasks=test_tasks).eval_batches("test")


@functools.cache
def heldout_text() -> tuple[Tensor, list[str]]:
    """The held-out 64-token blocks of every training domain (pretraining's validation split) and their domains."""
    held_out = set(EMBEDDED_VAL_DOMAINS) | set(EMBEDDED_TEST_DOMAINS)  # what PackedTextDataModule leaves out
    domains = sorted(domain for domain in embedded_domains() if domain not in held_out)
    blocks, names = [], []
    for domain in domains:
        one = PackedTextDataModule(
            tokenizer=TOKENIZER,
            domains=[domain],
            block_size=handoff.lm.BLOCK_SIZE,
            batch_size=1,
            max_tokens_per_domain=handoff.PRETRAIN_TOKENS_PER_DOMAIN,
            val_fraction=0.02,
        )
        blocks.append(one.blocks["val"])
        names += [domain] * len(one.blocks["val"])
    return torch.cat(blocks), names


@torch.no_grad()
def lm_losses(model: torch.nn.Module, blocks: Tensor, batch: int = 64) -> Tensor:
    """Per-block mean next-token loss (nats/token, float64) of a causal LM."""
    model.eval()
    losses = []
    for start in range(0, len(blocks), batch):
        ids = blocks[start : start + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        losses.append(loss.mean(1).double())
    return torch.cat(losses)


def evaluate(folder: Path, test_tasks: int, text_blocks: int | None, other_lrs: tuple[float, ...] = ()) -> dict:
    """Held-out LM loss per block, and control figures per held-out task along the head's adaptation
    (step size 1.0; with ``other_lrs``, also ``control_gap@LR`` with those step sizes)."""
    model = learner(folder)
    blocks, _ = heldout_text()
    lm = lm_losses(model.model, blocks[:text_blocks])
    result = {"lm_loss": lm}
    for inner_lr in (INNER_LR, *other_lrs):
        curves = common.adaptation_curves(
            model,
            algorithm("maml", inner_lr),
            control_test_batches(test_tasks),
            ADAPT_STEPS,
            FIGURES,
            meta_batch="vmap",
        )
        result |= {(name if inner_lr == INNER_LR else f"{name}@{inner_lr:g}"): v for name, v in curves.items()}
    return result


class TokenCount(common.RealTokenBudget):
    """The real tokens of every training step, without stopping."""

    def __init__(self) -> None:
        super().__init__(budget=2**62, support_passes=1, query_passes=1)


def stage1(method: str, steps: int, seed: int, work: Path) -> tuple[Path, int, float]:
    """MAML or MultiTask on the control tasks for ``steps`` steps: the exported folder, its tokens, its seconds."""
    lightning.seed_everything(seed, verbose=False)
    optimizer = functools.partial(torch.optim.AdamW, lr=META_LR, weight_decay=0.01)
    module = MetaLearningModule(learner(), algorithm(method), meta_batch="vmap", optimizer=optimizer)
    tokens = TokenCount()
    run = common.benchmark_trainer(steps, default_root_dir=work, gradient_clip_val=1.0, callbacks=[tokens])
    start = time.perf_counter()
    run.fit(module, control_data(seed, steps))
    seconds = time.perf_counter() - start
    checkpoint = work / f"{method}.ckpt"
    run.save_checkpoint(checkpoint)
    return export(str(checkpoint), str(work / f"{method}-export")), tokens.tokens, seconds


def random_init(seed: int, folder: Path) -> Path:
    """The random weights stage 1 starts from (same seed, same config), saved as a model folder with its tokenizer."""
    lightning.seed_everything(seed, verbose=False)
    learner().model.save_pretrained(folder)
    handoff.load_tokenizer_into(folder)
    return folder


def run_arm(arm: str, seed: int, args: argparse.Namespace, out: Path) -> None:
    """Train and score one arm of one seed; its result file ``out/<arm>.pt``."""
    started = time.perf_counter()
    block_tokens = handoff.PRETRAIN_BATCH * handoff.lm.BLOCK_SIZE
    points: list[dict] = []
    seconds: dict[str, float] = {}

    def score(stage: str, folder: Path, meta_tokens: int, pretrain_steps: int, other_lrs: tuple = ()) -> None:
        start = time.perf_counter()
        figures = evaluate(folder, args.test_tasks, args.text_blocks, other_lrs)
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
        gap = figures["control_gap"]
        print(
            f"seed {seed} {ARMS[arm]} {stage}: LM loss {float(figures['lm_loss'].mean()):.3f}, control_gap "
            + ", ".join(f"{k}: {float(gap[k].mean()):.3f}" for k in (0, *ADAPT_STEPS)),
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix=f"handoff-control-{seed}-{arm}-") as scratch:
        work = Path(scratch)
        if arm == "a":
            folder, meta_tokens = random_init(seed, work / "random"), 0
            score("random init", folder, 0, 0)
        else:
            folder, meta_tokens, seconds["stage 1"] = stage1(
                "maml" if arm == "b" else "multitask", args.meta_steps, seed, work / "stage1"
            )
            score("after stage 1", folder, meta_tokens, 0)
        end_lrs = tuple(args.final_inner_lrs)
        seconds |= pretrain_and_score(
            folder,
            meta_tokens,
            args,
            seed,
            work,
            lambda stage, exported, mark: score(
                stage, exported, meta_tokens, mark, end_lrs if stage == "after stage 2" else ()
            ),
        )
    seconds["total"] = time.perf_counter() - started
    names = ("tokens", "meta_steps", "eval_points", "final_inner_lrs", "test_tasks", "text_blocks")
    settings = {key: getattr(args, key) for key in names}
    record = {
        "points": points,
        "seconds": seconds,
        "settings": settings,
        "text_domains": heldout_text()[1][: args.text_blocks],
    }
    save_arm(out, arm, record)
    print(f"seed {seed} {ARMS[arm]}: {seconds}", flush=True)


def pretrain_and_score(
    folder: Path,
    meta_tokens: int,
    args: argparse.Namespace,
    seed: int,
    work: Path,
    score: Callable[[str, Path, int], None],
) -> dict[str, float]:
    """Stage 2 from the exported ``folder`` for the rest of ``args.tokens`` after ``meta_tokens``, resumed from one
    ``args.eval_points`` mark to the next; ``score(stage, exported folder, pretraining steps)`` at each mark (the
    last: ``after stage 2``). Returns the seconds of each pretraining leg."""
    block_tokens = handoff.PRETRAIN_BATCH * handoff.lm.BLOCK_SIZE
    total = max(0, args.tokens - meta_tokens) // block_tokens  # this arm's pretraining steps: N in all
    marks = sorted({min(point, total) for point in args.eval_points} | {total})
    checkpoint, seconds = None, {}
    for mark in marks:
        checkpoint, seconds[f"pretrain to {mark}"] = handoff.pretrain(
            {"init_from": str(folder)}, mark, seed, work / "pretrain", resume=checkpoint
        )
        exported = Path(export(str(checkpoint), str(work / f"pretrained-{mark}")))
        score("after stage 2" if mark == total else f"pretraining step {mark}", exported, mark)
    return seconds


def save_arm(out: Path, arm: str, record: dict) -> None:
    """``out/<arm>.pt``, written whole or not at all: a killed run leaves no half file a rerun would take as done."""
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out / f"{arm}.pt", lambda partial: torch.save(record, partial), f"arm {arm}'s result")


def arm_parser(description: str, *, tokens: int, eval_points: list[int], out: Path) -> argparse.ArgumentParser:
    """The options every hand-off script shares (seeds, arms, N, scored pretraining steps, text blocks, results
    folder, ``--report``), with that script's defaults; the script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="training seeds to run")
    parser.add_argument("--arms", default="abc", help="which arms to run (a, b, c)")
    parser.add_argument("--tokens", type=int, default=tokens, help="N: tokens of every arm, meta-training included")
    parser.add_argument(
        "--eval_points",
        type=int,
        nargs="*",
        default=eval_points,
        help="pretraining steps after the hand-off scored besides the end",
    )
    parser.add_argument("--text_blocks", type=int, default=None, help="only the first N held-out text blocks (tests)")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--report", action="store_true", help="only print the tables of the saved results")
    return parser


def run_and_report(
    args: argparse.Namespace, arms: dict[str, str], run_arm: Callable, report: Callable[[Path], None]
) -> None:
    """Run the missing arms of ``args.seeds`` (unless ``--report``), then print the report of what is saved."""
    common.quiet_benchmark_process()
    if not args.report:
        run_missing_arms(args, arms, run_arm)
    report(args.out)


def run_missing_arms(args: argparse.Namespace, arms: dict[str, str], run_arm: Callable) -> None:
    """``run_arm(arm, seed, args, out)`` for each of ``args.seeds`` and ``args.arms`` without a saved result."""
    for seed in args.seeds:
        for arm in args.arms:
            if (args.out / f"seed{seed}" / f"{arm}.pt").exists():
                print(f"seed {seed} {arms[arm]}: saved already, skipped", flush=True)
                continue
            run_arm(arm, seed, args, args.out / f"seed{seed}")


# --------------------------------------------------------------------------------------------- report


def load(out: Path) -> dict[int, dict[str, dict]]:
    runs: dict[int, dict[str, dict]] = {}
    for path in sorted(out.glob("seed*/*.pt")):
        runs.setdefault(int(path.parent.name.removeprefix("seed")), {})[path.stem] = torch.load(path)
    return runs


def cell(values: list[Tensor], signed: bool = False, groups: list | None = None) -> str:
    """``mean ± 95% CI`` over tasks (or text domains) and seeds, [lowest, highest seed mean] with 2+ seeds."""
    return common.seed_spread(torch.stack(values), signed=signed, tasks=groups)


def report(out: Path) -> None:
    runs = load(out)
    if not runs:
        raise SystemExit(f"No results in {out}: run with --seeds first.")
    seeds = sorted(runs)
    complete = [s for s in seeds if set(runs[s]) == set(ARMS)]
    print(f"Seeds with every arm: {complete}; seeds with some: {seeds}")
    first = runs[seeds[0]][next(iter(runs[seeds[0]]))]
    print(f"Settings: {first['settings']}")
    domains = first["text_domains"]
    header = [
        "model",
        "stage",
        "tokens (meta + pretraining)",
        "LM loss (held-out text)",
        *(f"control_gap {common.steps_label(k) if k else 'before adaptation'}" for k in (0, *ADAPT_STEPS)),
        "accuracy after 5 steps",
    ]
    rows = []
    for arm in ARMS:
        have = [s for s in seeds if arm in runs[s]]
        if not have:
            continue
        for index, point in enumerate(runs[have[0]][arm]["points"]):
            at = [runs[s][arm]["points"][index] for s in have]
            tokens = f"{point['meta_tokens']:,} + {point['pretrain_tokens']:,}"
            rows.append(
                [
                    ARMS[arm],
                    point["stage"],
                    tokens,
                    cell([p["lm_loss"] for p in at], groups=domains),
                    *(cell([p["control_gap"][k] for p in at]) for k in (0, *ADAPT_STEPS)),
                    cell([p["accuracy"][max(ADAPT_STEPS)] for p in at]),
                ]
            )
    print(
        "\nPer arm and stage: mean ± 95% CI (LM loss: the text domains as units, each domain's blocks averaged "
        "first; control: the held-out tasks as units), seeds as units too [lowest, highest seed mean]:\n"
    )
    print("\n".join(common.markdown_table(header, rows)))

    lrs = first["settings"].get("final_inner_lrs", [])
    if lrs:
        rows = []
        for arm in ARMS:
            have = [s for s in seeds if arm in runs[s]]
            for inner_lr in sorted([*lrs, INNER_LR]):
                name = "control_gap" if inner_lr == INNER_LR else f"control_gap@{inner_lr:g}"
                at = [runs[s][arm]["points"][-1] for s in have]
                rows.append([ARMS[arm], f"{inner_lr:g}", *(cell([p[name][k] for p in at]) for k in ADAPT_STEPS)])
        print("\nAt the end, control_gap with other head step sizes (exploratory):\n")
        print(
            "\n".join(
                common.markdown_table(["model", "step size", *(common.steps_label(k) for k in ADAPT_STEPS)], rows)
            )
        )

    def final(s: int, arm: str) -> dict:
        return runs[s][arm]["points"][-1]

    def stage1_point(s: int, arm: str) -> dict:
        return runs[s][arm]["points"][0]

    rows = []
    steps = (1, max(ADAPT_STEPS))  # the primary figure (1 step: what MAML trained for) and the longest

    def difference(first: dict, second: dict, k: int) -> Tensor:
        return first["control_gap"][k] - second["control_gap"][k]

    for first_arm, second_arm in (("b", "a"), ("b", "c"), ("c", "a")):
        if not complete:
            break
        first_end, second_end = ([final(s, arm) for s in complete] for arm in (first_arm, second_arm))
        lm = [a["lm_loss"] - b["lm_loss"] for a, b in zip(first_end, second_end, strict=True)]
        rows.append(
            [
                f"{ARMS[first_arm]} − {ARMS[second_arm]}, end",
                *(
                    cell([difference(a, b, k) for a, b in zip(first_end, second_end, strict=True)], signed=True)
                    for k in steps
                ),
                cell(lm, signed=True, groups=domains),
            ]
        )
    for arm in "bc":
        have = [s for s in seeds if arm in runs[s]]
        if have:
            ends, starts = [final(s, arm) for s in have], [stage1_point(s, arm) for s in have]
            lm = [a["lm_loss"] - b["lm_loss"] for a, b in zip(ends, starts, strict=True)]
            rows.append(
                [
                    f"{ARMS[arm]}: end − after stage 1",
                    *(
                        cell([difference(a, b, k) for a, b in zip(ends, starts, strict=True)], signed=True)
                        for k in steps
                    ),
                    cell(lm, signed=True, groups=domains),
                ]
            )
    print(
        "\nPaired differences (same held-out tasks and text blocks): control_gap (step size 1.0) and LM loss; "
        "bold where the 95% CI excludes 0:\n"
    )
    header = ["difference", *(f"control_gap {common.steps_label(k)}" for k in steps), "LM loss"]
    print("\n".join(common.markdown_table(header, rows)))
    spent = sum(run[arm]["seconds"]["total"] for run in runs.values() for arm in run)
    print(f"\nWall time of all saved arms: {spent / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    parser = arm_parser(__doc__.split("\n\n")[0], tokens=1_000_000, eval_points=[50, 200], out=HERE / "results_control")
    parser.add_argument("--meta_steps", type=int, default=300, help="stage-1 steps of (b) and (c)")
    parser.add_argument(
        "--final_inner_lrs",
        type=float,
        nargs="*",
        default=[0.1, 10.0],
        help="other head step sizes scored at the end (is a lost adaptation a step-size mismatch?)",
    )
    parser.add_argument("--test_tasks", type=int, default=CONTROL_TEST_TASKS, help="held-out control tasks")
    run_and_report(parser.parse_args(argv), ARMS, run_arm, report)


if __name__ == "__main__":
    main()
