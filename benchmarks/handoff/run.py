"""Hand-off experiment: does a meta-learned initialization keep its advantage through pretraining?

Tiny GPT-2, the embedded corpus's training and held-out domains, as in ``benchmarks/lm_adaptation/``
(whose training, evaluation and baseline this script reuses). Per training seed:

Stage 1, equal compute (``--budget`` block forward/backward passes of 64 tokens):
  (a) FOMAML, (b) multi-domain LM training, (c) random init (no stage 1).
Stage 2: ``CausalLMPretraining`` on the training domains' packed text, ``--pretrain_steps`` steps of
  16 blocks of 64 tokens, for each, started from its *exported* folder (the real hand-off:
  ``trainer.save_checkpoint`` -> ``export`` -> ``init_from``); (c) starts from the same random weights.
The other order:
  (d) (c) after stage 2, exported, then FOMAML meta-training from it (``pretrained=`` the folder) for
      ``--budget`` passes; against (e) (c)'s pretraining resumed from its checkpoint for the same
      extra passes (the same data stream and optimizer, continued).

Each model is scored on the fixed held-out test episodes of ``lm_adaptation`` (email, html,
reference, tomllib): query loss (nats/token) before and after 1, 5 and 10 SGD steps on 4 support
blocks. Per-seed results are saved as they finish (``results/seed<N>.pt``); ``--report`` prints the
tables and writes ``handoff.png`` from whatever seeds are there.

    python benchmarks/handoff/run.py --seeds 0 1 2          # train + evaluate, then report
    python benchmarks/handoff/run.py --report               # tables and plot from saved results
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import lightning
import matplotlib
import torch
from torch import Tensor

from lightning_meta import CausalLMLearner, MetaLearningModule
from lightning_meta.datamodules import PackedTextDataModule
from lightning_meta.handoff.export import export
from lightning_meta.handoff.pretraining import CausalLMPretraining
from lightning_meta.training.metrics import mean_and_ci95

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: common.py, tiny_lm.py
import common  # noqa: E402
import tiny_lm as lm  # noqa: E402  (lm_adaptation's set-up: model, data, methods, evaluation)

PRETRAIN_BATCH = 16  # blocks of lm.BLOCK_SIZE tokens per pretraining step: 16 block passes
PRETRAIN_TOKENS_PER_DOMAIN = 100_000
STEPS = (0, *lm.EVAL_STEPS)
METHODS = {
    "a": "(a) FOMAML",
    "b": "(b) multi-domain LM",
    "c": "(c) random init",
    "d": "(d) pretrain, then FOMAML",
    "e": "(e) pretrain, continued",
}


@functools.cache  # tokenized once per seed; each run's position starts at 0 unless a checkpoint is resumed
def pretrain_data(seed: int, tokenizer: str = lm.TOKENIZER) -> PackedTextDataModule:
    """The training domains' text (held-out domains left out), packed in blocks of 64 tokens.

    ``tokenizer``: the model's name for it (an export ships the same tokenizer under its folder's name).
    """
    return PackedTextDataModule(
        tokenizer=tokenizer,
        block_size=lm.BLOCK_SIZE,
        batch_size=PRETRAIN_BATCH,
        max_tokens_per_domain=PRETRAIN_TOKENS_PER_DOMAIN,
        val_fraction=0.02,
        seed=seed,
    )


def trainer(max_steps: int, root: Path) -> lightning.Trainer:
    return common.benchmark_trainer(max_steps, default_root_dir=root)


def pretrain(init: dict, steps: int, seed: int, folder: Path, resume: Path | None = None) -> tuple[Path, float]:
    """Stage 2: ``CausalLMPretraining(**init)`` for ``steps`` steps (or resumed to ``steps``); its checkpoint."""
    lightning.seed_everything(seed, verbose=False)
    module = CausalLMPretraining(optimizer=lm.adamw(), **init)
    run = trainer(steps, folder)
    start = time.perf_counter()
    run.fit(module, pretrain_data(seed, module.tokenizer), ckpt_path=resume)
    seconds = time.perf_counter() - start
    checkpoint = folder / f"pretrain-{steps}.ckpt"
    run.save_checkpoint(checkpoint)
    return checkpoint, seconds


def meta_train(method: str, steps: int, seed: int, folder: Path, pretrained: Path | None = None) -> tuple[Path, float]:
    """Stage 1 (or (d)): ``lm_adaptation``'s FOMAML or multi-domain training; its checkpoint."""
    lightning.seed_everything(seed, verbose=False)
    spec = lm.METHODS[method]
    learner = (
        CausalLMLearner(pretrained=str(pretrained), tokenizer=lm.TOKENIZER)
        if pretrained is not None
        else spec.make_learner()
    )
    module = MetaLearningModule(learner, spec.make_algorithm(), optimizer=spec.optimizer)
    run = trainer(steps, folder)
    start = time.perf_counter()
    run.fit(module, lm.make_datamodule(seed, batches_per_epoch=steps))
    seconds = time.perf_counter() - start
    checkpoint = folder / f"{method}.ckpt"
    run.save_checkpoint(checkpoint)
    return checkpoint, seconds


def evaluate(folder: Path, batches: list, step_size: float) -> dict[int, Tensor]:
    """Per-episode held-out query loss after 0, 1, 5, 10 steps, of the model exported to ``folder``."""
    learner = CausalLMLearner(pretrained=str(folder), tokenizer=lm.TOKENIZER).eval()
    return lm.adaptation_curve(learner, batches, step_size)


def run_seed(
    seed: int, budget: int, pretrain_steps: int, step_size: float, out: Path, test_batches: int | None = None
) -> None:
    started = time.perf_counter()
    test_batches = lm.make_datamodule(lm.EVAL_DATA_SEED).eval_batches("test")[:test_batches]
    fomaml_steps = budget // (lm.META_BATCH_SIZE * lm.METHODS["fomaml"].passes_per_task)
    baseline_steps = budget // (lm.META_BATCH_SIZE * lm.METHODS["baseline"].passes_per_task)
    extra_pretrain_steps = budget // PRETRAIN_BATCH
    losses: dict[str, dict[str, dict[int, Tensor]]] = {"before": {}, "after": {}}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix=f"handoff-{seed}-") as scratch:
        work = Path(scratch)

        def exported(checkpoint: Path, name: str) -> Path:
            return export(str(checkpoint), str(work / name))

        # Stage 1.
        for key, method, steps in (("a", "fomaml", fomaml_steps), ("b", "baseline", baseline_steps)):
            checkpoint, seconds[f"{key} stage 1"] = meta_train(method, steps, seed, work / key)
            folder = exported(checkpoint, f"{key}-stage1")
            losses["before"][key] = evaluate(folder, test_batches, step_size)
            checkpoint, seconds[f"{key} stage 2"] = pretrain(
                {"init_from": str(folder)}, pretrain_steps, seed, work / f"{key}-pre"
            )
            losses["after"][key] = evaluate(exported(checkpoint, f"{key}-stage2"), test_batches, step_size)
            print(f"seed {seed} {METHODS[key]} done at {time.perf_counter() - started:.0f} s", flush=True)
        # (c): stage 2 from the random weights stage 1 started from (same seed, same config).
        lightning.seed_everything(seed, verbose=False)
        random_init = CausalLMPretraining(model_config=dict(lm.MODEL_CONFIG), tokenizer=lm.TOKENIZER)
        random_init.model.save_pretrained(work / "c-stage1")
        load_tokenizer_into(work / "c-stage1")
        losses["before"]["c"] = evaluate(work / "c-stage1", test_batches, step_size)
        c_checkpoint, seconds["c stage 2"] = pretrain(
            {"model_config": dict(lm.MODEL_CONFIG), "tokenizer": lm.TOKENIZER}, pretrain_steps, seed, work / "c-pre"
        )
        c_folder = exported(c_checkpoint, "c-stage2")
        losses["after"]["c"] = evaluate(c_folder, test_batches, step_size)
        print(f"seed {seed} {METHODS['c']} done at {time.perf_counter() - started:.0f} s", flush=True)
        # (d) meta-training after pretraining, against (e) the same pretraining resumed for as much compute.
        checkpoint, seconds["d"] = meta_train("fomaml", fomaml_steps, seed, work / "d", pretrained=c_folder)
        losses["after"]["d"] = evaluate(exported(checkpoint, "d-export"), test_batches, step_size)
        checkpoint, seconds["e"] = pretrain(
            {"model_config": dict(lm.MODEL_CONFIG), "tokenizer": lm.TOKENIZER},
            pretrain_steps + extra_pretrain_steps,
            seed,
            work / "e",
            resume=c_checkpoint,
        )
        losses["after"]["e"] = evaluate(exported(checkpoint, "e-export"), test_batches, step_size)
    seconds["total"] = time.perf_counter() - started
    settings = {
        "budget": budget,
        "pretrain_steps": pretrain_steps,
        "step_size": step_size,
        "fomaml_steps": fomaml_steps,
        "baseline_steps": baseline_steps,
        "extra_pretrain_steps": extra_pretrain_steps,
    }
    out.mkdir(parents=True, exist_ok=True)
    tasks = common.episode_tasks(test_batches)  # each episode's held-out domain: the unit of the CIs
    torch.save({"losses": losses, "seconds": seconds, "settings": settings, "tasks": tasks}, out / f"seed{seed}.pt")
    print(f"seed {seed}: {seconds}", flush=True)


def load_tokenizer_into(folder: Path) -> None:
    from lightning_meta.data.tokenization import load_tokenizer

    load_tokenizer(lm.TOKENIZER).save_pretrained(folder)


def report(out: Path) -> None:
    runs = {int(path.stem.removeprefix("seed")): torch.load(path) for path in sorted(out.glob("seed*.pt"))}
    if not runs:
        raise SystemExit(f"No results in {out}: run with --seeds first.")
    seeds = sorted(runs)
    settings = runs[seeds[0]]["settings"]
    tasks = episode_tasks(runs[seeds[0]])
    print(f"Seeds {seeds}; settings {settings}")
    print("Wall time per seed (s): " + ", ".join(f"{s}: {runs[s]['seconds']['total']:.0f}" for s in seeds) + "\n")

    def cell(stage: str, key: str, k: int) -> str:
        return common.seed_spread(torch.stack([runs[s]["losses"][stage][key][k] for s in seeds]), tasks=tasks)

    header = (
        "| model | stage | " + " | ".join(common.steps_label(k) if k else "before adaptation" for k in STEPS) + " |"
    )
    lines = [header, "|" + "---|" * (len(STEPS) + 2)]
    for stage, keys in (("before", "abc"), ("after", "abcde")):
        for key in keys:
            label = "after stage 2" if stage == "after" else "after stage 1" if key != "c" else "(no stage 1)"
            lines.append(f"| {METHODS[key]} | {label} | " + " | ".join(cell(stage, key, k) for k in STEPS) + " |")
    units = (
        f"{len(set(tasks))} held-out domains (the tasks: {len(tasks)} episodes, each domain's averaged first) "
        f"and {len(seeds)} seeds"
    )
    print(
        f"Held-out query loss (nats/token): mean over the domains ± 95% CI with the {units} as units "
        "[lowest, highest seed mean]:\n"
    )
    print("\n".join(lines))

    def paired(stage: str, first: str, second: str, k: int) -> str:
        per_seed = [runs[s]["losses"][stage][first][k] - runs[s]["losses"][stage][second][k] for s in seeds]
        return common.seed_spread(torch.stack(per_seed), signed=True, tasks=tasks)

    pairs = [
        ("before", "a", "b"),
        ("after", "a", "b"),
        ("before", "a", "c"),
        ("after", "a", "c"),
        ("before", "b", "c"),
        ("after", "b", "c"),
        ("after", "d", "e"),
    ]
    lines = ["| difference | stage | " + " | ".join(header.split(" | ")[2:]), "|" + "---|" * (len(STEPS) + 2)]
    for stage, first, second in pairs:
        label = "after stage 2" if stage == "after" else "after stage 1"
        name = f"{METHODS[first]} − {METHODS[second]}"
        lines.append(f"| {name} | {label} | " + " | ".join(paired(stage, first, second, k) for k in STEPS) + " |")
    print(
        "\nPaired differences on the same episodes and seeds (negative: the first is better), mean ± 95% CI with "
        f"the {units} as units [lowest, highest seed]; bold where the CI excludes 0:\n"
    )
    print("\n".join(lines))
    domains = sorted(set(tasks))
    lines = [
        "| difference | stage | "
        + " | ".join(
            f"{domain}, {common.steps_label(k) if k else 'before'}" for k in (0, STEPS[-1]) for domain in domains
        )
        + " |",
        "|" + "---|" * (2 * len(domains) + 2),
    ]
    for stage, first, second in pairs:
        label = "after stage 2" if stage == "after" else "after stage 1"
        cells = []
        for k in (0, STEPS[-1]):
            difference = sum(runs[s]["losses"][stage][first][k] - runs[s]["losses"][stage][second][k] for s in seeds)
            for domain in domains:
                cells.append(f"{float(difference[[t == domain for t in tasks]].mean()) / len(seeds):+.3f}")
        lines.append(f"| {METHODS[first]} − {METHODS[second]} | {label} | " + " | ".join(cells) + " |")
    print("\nThe same differences per held-out domain (mean over its episodes and the seeds), descriptive:\n")
    print("\n".join(lines))

    def gain(stage: str, key: str, k: int) -> Tensor:
        return torch.stack([runs[s]["losses"][stage][key][0] - runs[s]["losses"][stage][key][k] for s in seeds])

    def gain_cell(stage: str, first: str, second: str | None, k: int) -> str:
        difference = gain(stage, first, k) - (gain(stage, second, k) if second else 0)
        return common.seed_spread(difference, signed=True, tasks=tasks)

    rows = [(stage, key, None) for stage, keys in (("before", "abc"), ("after", "abcde")) for key in keys]
    rows += [("before", "a", "b"), ("after", "a", "b"), ("after", "a", "c"), ("after", "d", "e")]
    lines = [
        "| model | stage | " + " | ".join(f"gain {common.steps_label(k)}" for k in lm.EVAL_STEPS) + " |",
        "|" + "---|" * (len(lm.EVAL_STEPS) + 2),
    ]
    for stage, first, second in rows:
        name = METHODS[first] + (f" − {METHODS[second]}" if second else "")
        label = "after stage 2" if stage == "after" else "after stage 1"
        lines.append(
            f"| {name} | {label} | " + " | ".join(gain_cell(stage, first, second, k) for k in lm.EVAL_STEPS) + " |"
        )
    print(
        "\nAdaptation gain: loss before adaptation minus loss after k steps (larger: adapts more), and paired "
        f"differences of gains (positive: the first adapts more), mean ± 95% CI with the {units} as units "
        "[lowest, highest seed]:\n"
    )
    print("\n".join(lines))
    plot(runs, seeds, tasks, out / "handoff.png")
    print(f"\nSaved {out / 'handoff.png'}.")


def episode_tasks(run: dict) -> list[str]:
    """The held-out domain (the task) of each test episode: saved with the run, or, for runs saved before
    they were, read off the same fixed test episodes rebuilt (``lm.EVAL_DATA_SEED``; data only, no model)."""
    if "tasks" in run:
        return run["tasks"]
    episodes = len(run["losses"]["before"]["a"][0])
    return common.episode_tasks(lm.make_datamodule(lm.EVAL_DATA_SEED).eval_batches("test"))[:episodes]


def plot(runs: dict, seeds: list[int], tasks: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = {"a": "C0", "b": "C1", "c": "C2", "d": "C3", "e": "C4"}
    for ax, stage, keys, title in (
        (axes[0], "before", "abc", "After stage 1 (meta-training / LM training / none)"),
        (axes[1], "after", "abcde", "After stage 2 (pretraining), and (d) vs (e)"),
    ):
        for index, key in enumerate(keys):
            stats = [
                mean_and_ci95(
                    torch.cat([runs[s]["losses"][stage][key][k] for s in seeds]),
                    groups=tasks * len(seeds),
                    seeds=[s for s in seeds for _ in tasks],
                )
                for k in STEPS
            ]
            offset = (index - (len(keys) - 1) / 2) * 0.12
            ax.errorbar(
                [k + offset for k in STEPS],
                [m.item() for m, _ in stats],
                yerr=[c.item() for _, c in stats],
                marker="o",
                capsize=4,
                color=colors[key],
                label=METHODS[key],
                linestyle="--" if key in "de" else "-",
            )
        ax.set_xticks(STEPS)
        ax.set_xlabel("SGD adaptation steps on 4 support blocks")
        ax.set_ylabel("held-out query loss (nats/token)")
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    title = (
        f"Tiny GPT-2, {len(set(tasks))} held-out domains, mean over domains and seeds {seeds} ± 95% CI, "
        "domains and seeds as units"
    )
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="training seeds to run")
    parser.add_argument("--budget", type=int, default=7200, help="block passes of stage 1 and of (d)/(e)")
    parser.add_argument("--pretrain_steps", type=int, default=450, help="stage-2 steps of 16 blocks of 64 tokens")
    parser.add_argument("--step_size", type=float, default=0.1, help="SGD step size of test-time adaptation")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--test_batches", type=int, default=None, help="only the first N test batches (smoke test)")
    parser.add_argument("--report", action="store_true", help="only print the tables and plot the saved results")
    args = parser.parse_args(argv)
    common.quiet_benchmark_process()
    if not args.report:
        for seed in args.seeds:
            run_seed(seed, args.budget, args.pretrain_steps, args.step_size, args.out, args.test_batches)
    report(args.out)


if __name__ == "__main__":
    main()
