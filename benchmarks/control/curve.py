"""MetaICL's learning curve on the control families past the 15-minute recipe (issue 27 section 2).

Trains ``configs/control_metaicl_tiny.yaml`` for ``--steps`` steps (its one-cycle schedule stretched to them,
everything else as shipped unless ``--words`` changes the word pools), keeps a checkpoint every ``--every``
steps, and tests each one in context at K = 8 on two sets of fixed test tasks: fresh mappings of the
training words, and mappings of words no training task used (``held_out_words``). Each point records
accuracy and control_gap with their 95% CIs (tasks as units) and the training CPU seconds so far.

The run is resumable: training restarts from the newest checkpoint, and tested checkpoints are skipped, so
the script can be stopped and run again; ``curve.json`` under ``--out`` is rewritten after every test.

    python benchmarks/control/curve.py --out benchmarks/control/results/curve-w16   # 2 CPU-hours (32,000 steps)
    python benchmarks/control/curve.py --out DIR --report                            # the table so far
    python benchmarks/control/curve.py --out DIR --test_only   # test the checkpoints so far (beside training)
    python benchmarks/control/curve.py --out DIR --smoke                             # end to end in a minute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "control_metaicl_tiny.yaml"
TEST_SETS = {"training words": False, "held-out words": True}  # name -> held_out_words


def curve_config(steps: int, every: int, words: int | None, smoke: bool) -> dict[str, Any]:
    """The shipped recipe, stretched to ``steps`` with a checkpoint every ``every`` steps."""
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"].update(
        max_steps=steps,
        val_check_interval=every,
        limit_val_batches=0 if smoke else None,
        callbacks=[
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"every_n_train_steps": every, "save_top_k": -1, "filename": "{step}", "save_last": True},
            }
        ],
    )
    config["model"]["lr_scheduler"]["init_args"]["total_steps"] = steps
    config["data"]["init_args"]["control"]["words"] = words
    if smoke:
        config["model"]["learner"]["init_args"]["model_config"].update(n_layer=1, n_embd=32, n_head=2)
        config["data"]["init_args"].update(meta_batch_size=4, num_val_tasks=4, num_test_tasks=4)
    return config


def run(command: list[str]) -> float:
    """Runs a CLI command on one thread; returns its CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    environment = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def checkpoints(out: Path) -> dict[int, Path]:
    """Saved checkpoints by step (``step=N.ckpt``)."""
    found = (out / "train").glob("lightning_logs/version_*/checkpoints/step=*.ckpt")
    return {int(path.stem.removeprefix("step=")): path for path in found}


def train(out: Path, config_path: Path, state: dict[str, Any]) -> None:
    """Fits to the configured steps, from the newest checkpoint when there is one (no test after it)."""
    command = ["lightning-meta", "fit", f"--config={config_path}", f"--trainer.default_root_dir={out / 'train'}"]
    last = sorted((out / "train").glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    if last:
        command.append(f"--ckpt_path={last[-1]}")
    state["train_cpu_s"] = state.get("train_cpu_s", 0.0) + run([*command, "--test_after_fit=false"])
    state["train_steps"] = max(checkpoints(out), default=0)


def test(out: Path, config_path: Path, step: int, checkpoint: Path, held_out_words: bool, tasks: int) -> dict:
    """Tests one checkpoint in context at K = 8; returns its accuracy and control_gap with CIs."""
    folder = out / "test" / f"step{step}-{'held' if held_out_words else 'train'}"
    run(
        [
            "lightning-meta",
            "test",
            f"--config={config_path}",
            f"--ckpt_path={checkpoint}",
            f"--trainer.default_root_dir={folder}",
            f"--data.init_args.num_test_tasks={tasks}",
            f"--data.init_args.control.held_out_words={str(held_out_words).lower()}",
        ]
    )
    results = json.loads(max(folder.glob("lightning_logs/version_*/results.json")).read_text())
    results = results.get("metrics") or results["figures"]  # "figures" before the vocabulary became "metrics"
    return {name: results[f"test/query_{name}_post"] for name in ("accuracy", "control_gap")}


def training_cpu(out: Path, curve: dict[str, Any]) -> tuple[float, int]:
    """(CPU seconds, steps) of training: as :func:`train` measured them, or else the last sample of
    ``train_cpu.log`` (lines ``unix-time cpu-seconds`` written every 20 s beside a training process whose parent
    was stopped) and the newest checkpoint's step."""
    if curve.get("train_cpu_s"):
        return curve["train_cpu_s"], curve["train_steps"]
    log = out / "train_cpu.log"
    samples = [line.split() for line in log.read_text().splitlines() if len(line.split()) == 2] if log.exists() else []
    return (float(samples[-1][1]), max(checkpoints(out), default=0)) if samples else (0.0, 0)


def report(curve: dict[str, Any], cpu_s: float = 0.0, trained: int = 0) -> str:
    """The curve as a markdown table (mean ± 95% CI over test tasks); ``cpu_s`` and ``trained``: training's CPU
    seconds and steps (:func:`training_cpu`)."""
    per_step = cpu_s / max(trained, 1)
    lines = [
        f"Training CPU: {cpu_s / 60:.0f} min for {trained:,} steps (one thread; {per_step:.3f} CPU s a step)",
        "",
        "| step | CPU min | "
        + " | ".join(f"control_gap, {name}" for name in TEST_SETS)
        + " | accuracy, training words |",
        "|---|---|" + "---|" * (len(TEST_SETS) + 1),
    ]
    for step in sorted(curve["points"], key=int):
        point = curve["points"][step]
        cells = [
            f"{point[name]['control_gap']['mean']:.2f} ± {point[name]['control_gap']['ci95']:.2f}"
            if name in point
            else "—"
            for name in TEST_SETS
        ]
        accuracy = point.get("training words", {}).get("accuracy")
        last = f"{accuracy['mean']:.2f} ± {accuracy['ci95']:.2f}" if accuracy else "—"
        lines.append(f"| {int(step):,} | {int(step) * per_step / 60:.0f} | {' | '.join(cells)} | {last} |")
    return "\n".join(lines)


def plot(curve: dict[str, Any], path: Path) -> None:
    """control_gap against training steps for both test sets, with 95% CIs, chance (0) and the ceiling (1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9.0, 4.0))
    steps = sorted(curve["points"], key=int)
    for name in TEST_SETS:
        shown = [step for step in steps if name in curve["points"][step]]
        gaps = [curve["points"][step][name]["control_gap"] for step in shown]
        axis.errorbar(
            [int(step) for step in shown],
            [gap["mean"] for gap in gaps],
            yerr=[gap["ci95"] for gap in gaps],
            marker="o",
            capsize=3,
            label=name,
        )
    axis.axhline(0.0, color="grey", linestyle=":", label="chance")
    axis.axhline(1.0, color="black", linestyle="--", label="ceiling (Bayes-optimal reader of K = 8)")
    axis.axhline(0.7, color="tab:green", linestyle="-.", linewidth=0.8, label="issue 27 target (0.7)")
    settings = curve["settings"]
    title = f"MetaICL on label_mapping, {settings['words']} words, one-cycle over {settings['steps']:,} steps"
    axis.set(xlabel="training steps (32 episodes each)", ylabel="control_gap (in context, K = 8)", title=title)
    axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)  # beside the data, not over it
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=32_000, help="training steps (0.22 CPU s each: 2 CPU-hours)")
    parser.add_argument("--every", type=int, default=2_000, help="steps between tested checkpoints")
    parser.add_argument("--words", type=int, default=16, help="input and label words per split (shipped: 16)")
    parser.add_argument("--test_tasks", type=int, default=256)
    parser.add_argument("--report", action="store_true", help="print the table so far and stop")
    parser.add_argument("--smoke", action="store_true", help="a 1-layer model, 8 steps: checks the pipeline")
    parser.add_argument("--test_only", action="store_true", help="test the checkpoints saved so far, train no further")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.every, args.test_tasks = 8, 4, 4
    args.out.mkdir(parents=True, exist_ok=True)
    curve_path = args.out / "curve.json"
    settings = {
        "steps": args.steps,
        "every": args.every,
        "words": args.words,
        "test_tasks": args.test_tasks,
        "smoke": args.smoke,
        "config": str(CONFIG.relative_to(ROOT)),
    }
    curve = json.loads(curve_path.read_text()) if curve_path.exists() else {"settings": settings, "points": {}}
    if curve["settings"] != settings:
        raise SystemExit(f"{curve_path} holds a curve of other settings ({curve['settings']}): use another --out.")
    if args.report:
        print(report(curve, *training_cpu(args.out, curve)))
        if curve["points"]:
            plot(curve, args.out / "curve.png")
        return
    config_path = args.out / "config.yaml"
    config = yaml.safe_dump(curve_config(args.steps, args.every, args.words, args.smoke))
    if not config_path.exists() or config_path.read_text() != config:  # a training run reads it: left alone
        config_path.write_text(config)
    if max(checkpoints(args.out), default=0) < args.steps and not args.test_only:
        train(args.out, config_path, curve)
        write_json(curve_path, curve)
    for step, checkpoint in sorted(checkpoints(args.out).items()):
        point = curve["points"].setdefault(str(step), {})
        for name, held_out in TEST_SETS.items():
            if name not in point:
                point[name] = test(args.out, config_path, step, checkpoint, held_out, args.test_tasks)
                write_json(curve_path, curve)
                print(f"step {step:,} {name}: control_gap {point[name]['control_gap']['mean']:.2f}", flush=True)
    print(report(curve, *training_cpu(args.out, curve)))


if __name__ == "__main__":
    main()
