"""Sinusoid tasks: the paper's distribution, fixed evaluation tasks, a seeded resumable stream."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_meta import MLP, MetaLearningModule, RegressionLearner
from lightning_meta.algorithms import MAML
from lightning_meta.datamodules import SinusoidDataModule


def test_tasks_follow_the_maml_distribution():
    datamodule = SinusoidDataModule(shots=10, queries=15, meta_batch_size=200)
    batch = datamodule.train_batch(0)
    amplitude, phase = batch.metadata["amplitude"], batch.metadata["phase"]
    assert batch.support["x"].shape == (200, 10, 1) and batch.query["x"].shape == (200, 15, 1)
    assert amplitude.min() >= 0.1 and amplitude.max() <= 5.0 and amplitude.std() > 1.0
    assert phase.min() >= 0 and phase.max() <= math.pi
    for split in (batch.support, batch.query):
        assert split["x"].min() >= -5 and split["x"].max() <= 5
        expected = amplitude.view(-1, 1, 1) * torch.sin(split["x"] - phase.view(-1, 1, 1))
        torch.testing.assert_close(split["y"], expected)


def test_evaluation_tasks_are_fixed_across_instances_and_differ_between_splits():
    first = SinusoidDataModule(num_val_tasks=30, num_test_tasks=40, eval_meta_batch_size=8)
    second = SinusoidDataModule(num_val_tasks=30, num_test_tasks=40, eval_meta_batch_size=8)
    val = first.eval_batches("val")
    assert sum(len(b) for b in val) == 30 and sum(len(b) for b in first.eval_batches("test")) == 40
    for a, b in zip(val, second.eval_batches("val"), strict=True):
        assert torch.equal(a.support["x"], b.support["x"]) and torch.equal(a.query["y"], b.query["y"])
    assert not torch.equal(val[0].support["x"], first.eval_batches("test")[0].support["x"])
    loader_batches = list(first.val_dataloader())
    assert all(
        torch.equal(a.query["x"], b.query["x"])
        for a, b in zip(loader_batches, list(first.val_dataloader()), strict=True)
    )


def test_training_stream_is_seeded_and_rank_dependent():
    datamodule = SinusoidDataModule(meta_batch_size=3)
    assert torch.equal(
        datamodule.train_batch(5).support["x"], SinusoidDataModule(meta_batch_size=3).train_batch(5).support["x"]
    )
    assert not torch.equal(datamodule.train_batch(5).support["x"], datamodule.train_batch(6).support["x"])
    assert not torch.equal(
        datamodule.train_batch(5, rank=0).support["x"], datamodule.train_batch(5, rank=1).support["x"]
    )
    assert not torch.equal(
        datamodule.train_batch(5).support["x"],
        SinusoidDataModule(meta_batch_size=3, seed=1).train_batch(5).support["x"],
    )


def test_worker_count_does_not_change_the_stream():
    def first_batches(workers: int) -> list[torch.Tensor]:
        datamodule = SinusoidDataModule(meta_batch_size=2, batches_per_epoch=4, num_workers=workers)
        return [batch.support["x"] for batch in datamodule.train_dataloader()]

    assert all(torch.equal(a, b) for a, b in zip(first_batches(0), first_batches(2), strict=True))


def test_bad_arguments():
    with pytest.raises(ValueError, match="shots and queries must be >= 1"):
        SinusoidDataModule(shots=0)
    with pytest.raises(ValueError, match="meta_batch_size must be >= 1"):
        SinusoidDataModule(meta_batch_size=0)
    with pytest.raises(ValueError, match="amplitude_range must be"):
        SinusoidDataModule(amplitude_range=(5.0, 0.1))


class _RecordLosses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()


def _run(tmp_path, max_steps: int, ckpt_path=None, every_n: int | None = None) -> dict[int, float]:
    L.seed_everything(0)
    module = MetaLearningModule(RegressionLearner(MLP(1, [16], 1)), MAML(inner_lr=0.01))
    datamodule = SinusoidDataModule(meta_batch_size=4, batches_per_epoch=5, num_val_tasks=4, num_test_tasks=4)
    recorder = _RecordLosses()
    callbacks = [recorder]
    if every_n:
        callbacks.append(
            ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every_n, save_top_k=-1, filename="{step}")
        )
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every_n),
        callbacks=callbacks,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    return recorder.losses


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tmp_path):
    uninterrupted = _run(tmp_path, max_steps=13, every_n=7)  # 5 batches per epoch: step 7 is mid-epoch
    resumed = _run(tmp_path / "resumed", max_steps=13, ckpt_path=tmp_path / "step=7.ckpt")
    assert sorted(resumed) == list(range(8, 14))
    for step, loss in resumed.items():
        assert loss == uninterrupted[step], f"step {step}: {loss} != {uninterrupted[step]}"
