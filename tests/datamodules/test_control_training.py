"""The positive control trains: the shipped MAML-on-the-head recipe (configs/control_maml_tiny.yaml), shortened,
meta-learns held-out control tasks, and a pipeline that does not cannot pass.

Held-out label mappings (words no training task used) are at chance before any support example is read (their rule
is in no weight), and SGD on the head of the *untrained* model already lifts them above chance (a linear read-out
of random features learns: 0.39 control_gap after one step, 0.87 after five). So the test asks for what only
meta-training gives: after one inner step, accuracy far above chance and above the untrained model's after the
same step on the same tasks, by more than both confidence intervals. A pipeline whose labels, options or support
do not reach the inner loop stays at chance; one whose meta-training does nothing stays at the untrained value.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from lightning import LightningDataModule

from lightning_meta import MetaLearningModule, cli

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "control_maml_tiny.yaml"
STEPS = 40  # one-step accuracy 0.53 -> 0.77 on these 64 tasks, about 50 CPU s in all (control README, Recipe)


def _built(*overrides: str) -> cli.MetaCLI:
    return cli.MetaCLI(
        MetaLearningModule,
        LightningDataModule,
        subclass_mode_data=True,
        run=False,
        parser_class=cli.MetaArgumentParser,
        auto_configure_optimizers=False,
        args=["--config", str(CONFIG), *overrides, "--trainer.logger=false"],
    )


def test_the_control_recipe_meta_learns_held_out_tasks(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    built = _built(
        "--model.eval_curve=[0, 1]",
        "--model.algorithm.init_args.eval_inner_steps=1",
        "--data.init_args.num_test_tasks=64",
        "--data.init_args.num_val_tasks=4",
    )
    module, data = built.model, built.datamodule
    options = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    (before,) = L.Trainer(**options).test(module, data, verbose=False)
    L.Trainer(max_steps=STEPS, limit_val_batches=0, gradient_clip_val=1.0, **options).fit(module, data)
    (after,) = L.Trainer(**options).test(module, data, verbose=False)

    def figure(results: dict[str, float], name: str) -> tuple[float, float]:
        return results[f"test/query_{name}"], results[f"test/query_{name}_ci95"]

    for results in (before, after):  # zero-shot: chance, with or without meta-training (256 queries)
        accuracy, ci95 = figure(results, "accuracy_step0")
        assert abs(accuracy - 0.25) < max(ci95, 0.05) + 0.05, results
        assert results["test/query_chance"] == 0.25 and results["test/query_ceiling"] == pytest.approx(0.994, abs=1e-3)
    (untrained, untrained_ci), (trained, trained_ci) = figure(before, "accuracy_step1"), figure(after, "accuracy_step1")
    assert trained - trained_ci > 0.25 + 0.3, after  # far from chance, CI included
    assert trained - trained_ci > untrained + untrained_ci, (before, after)  # and meta-training, not SGD, did it
    assert figure(after, "control_gap_step1")[0] > 0.5
