"""The host module's limits: a bounded adaptation curve, SIGTERM between inner steps, and older checkpoints."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

import lightning_meta.training.checkpoint_loading as migrations
from lightning_meta import MLP, MetaLearningModule, RegressionLearner
from lightning_meta.algorithms import MAML, SGD
from lightning_meta.datamodules import SinusoidDataModule
from lightning_meta.training.evaluation import MAX_EVAL_CURVE_STEPS


def sinusoid_module(**options) -> MetaLearningModule:
    torch.manual_seed(0)
    return MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01), **options)


def trainer(tmp_path, **options) -> L.Trainer:
    return L.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **options
    )


def test_an_adaptation_curve_beyond_the_stated_maximum_is_refused():
    sinusoid_module(eval_curve=[0, MAX_EVAL_CURVE_STEPS])
    message = rf"eval_curve=\[0, 100000\] asks for 100000 adaptation steps per .* more than {MAX_EVAL_CURVE_STEPS}"
    with pytest.raises(ValueError, match=message + r".*--model.eval_curve=\[0,1,5,10\]"):
        sinusoid_module(eval_curve=[0, 100000])


class CountingSGD(SGD):
    steps: list[int] = []

    def __call__(self, step, weights, gradients, parallel=False):
        CountingSGD.steps.append(step)
        return super().__call__(step, weights, gradients, parallel=parallel)


class CountingMAML(MAML):
    def inner_update(self, training: bool = True):
        return CountingSGD(self.inner_lr)


class SigtermAtFirstBatch(L.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler only sets a flag


@pytest.mark.parametrize("eval_curve", [None, [0, 1, 500]])
def test_sigterm_stops_evaluation_between_inner_steps(tmp_path, eval_curve):
    torch.manual_seed(0)
    module = MetaLearningModule(
        RegressionLearner(MLP(1, [8], 1)), CountingMAML(inner_lr=0.01), eval_inner_steps=500, eval_curve=eval_curve
    )
    data = SinusoidDataModule(meta_batch_size=2, num_val_tasks=4, eval_meta_batch_size=2)
    CountingSGD.steps = []
    with pytest.raises(SIGTERMException):
        trainer(tmp_path, callbacks=[SigtermAtFirstBatch()]).validate(module, data, verbose=False)
    assert CountingSGD.steps == [0]  # one inner step, then the flag; not 500 steps for each of 4 episodes


def test_a_checkpoint_with_the_old_task_by_task_option_loads_with_a_notice(tmp_path, monkeypatch):
    notices = []
    monkeypatch.setattr(migrations, "rank_zero_info", notices.append)
    module = sinusoid_module()
    run = trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False)
    run.fit(module, SinusoidDataModule(meta_batch_size=2, batches_per_epoch=2))
    run.save_checkpoint(tmp_path / "now.ckpt")
    checkpoint = torch.load(tmp_path / "now.ckpt", weights_only=True)
    for old, today in ((True, "task_by_task"), (False, "all_at_once")):
        hparams = dict(checkpoint["hyper_parameters"])
        del hparams["meta_batch"]
        hparams["task_by_task"] = old  # what versions before meta_batch saved
        torch.save(checkpoint | {"hyper_parameters": hparams}, tmp_path / "old.ckpt")
        loaded = MetaLearningModule.load_from_checkpoint(tmp_path / "old.ckpt")
        assert loaded.meta_batch == today
        notice = f"task_by_task={old!r} (an earlier version's option) is read as meta_batch={today!r}"
        assert len(notices) == 1 and notice in notices.pop()
        for name, value in module.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)
