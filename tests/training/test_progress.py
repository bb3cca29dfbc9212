"""The progress bar: steps out of ``max_steps``, and the MAML family's support figures on logging steps."""

from __future__ import annotations

import logging
import re
import sys
from unittest import mock

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_meta import MLP, RegressionLearner
from lightning_meta.algorithms import FOMAML, MAML
from lightning_meta.datamodules import SinusoidDataModule
from lightning_meta.training.progress import LOGGER, MetaProgressBar

CASES = [
    (300, mock.Mock(spec=[]), "Meta-training"),
    (-1, mock.Mock(spec=[]), "Epoch 0"),
    (300, mock.Mock(progress_label="Pretraining"), "Pretraining"),
]


@pytest.mark.parametrize("steps, module, expected", CASES)
def test_progress_bar_counts_steps_out_of_max_steps(steps, module, expected):
    bar = MetaProgressBar()
    trainer = mock.Mock(max_steps=steps, global_step=120, current_epoch=0, lightning_module=module)
    bar._trainer = trainer
    with mock.patch.object(MetaProgressBar, "total_train_batches", 100):
        bar.on_train_start(trainer)
        bar.on_train_epoch_start(trainer)
    assert bar.train_progress_bar.desc.startswith(expected)
    assert bar.train_progress_bar.total == (300 if steps > 0 else 100)


@pytest.mark.parametrize("algorithm", [MAML(inner_lr=0.05, inner_steps=2), FOMAML(inner_lr=0.05, inner_steps=2)])
def test_support_loss_before_and_after_the_inner_loop_on_logging_steps(algorithm):
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [8], 1))
    batch = SinusoidDataModule(meta_batch_size=3).eval_batches("val")[0]
    forwards = []
    learner.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    # Off unless asked (a caller outside the host): per task the 2 inner steps and the query, nothing more.
    assert set(algorithm.meta_loss(learner, batch, meta_batch="task_by_task").metrics) == {"query_loss"}
    assert len(forwards) == 3 * 3
    algorithm.report_query = True  # the host's logging steps
    forwards.clear()
    figures = algorithm.meta_loss(learner, batch, meta_batch="task_by_task").metrics
    assert len(forwards) == 3 * 4  # support_loss_pre is the inner loop's first step; support_loss_post one forward
    before = [learner.loss(episode.support)[0] for episode in batch.episodes()]
    after = [
        learner.loss(episode.support, algorithm.adapt(learner, episode.support, steps=2))[0]
        for episode in batch.episodes()
    ]
    assert figures["support_loss_pre"] == pytest.approx(torch.stack(before).mean().item(), rel=1e-5)
    assert figures["support_loss_post"] == pytest.approx(torch.stack(after).mean().item(), rel=1e-5)
    vmapped = algorithm.meta_loss(learner, batch, meta_batch="vmap").metrics  # the first step's loss under vmap too
    assert vmapped["support_loss_pre"] == pytest.approx(figures["support_loss_pre"].item(), rel=1e-5)


def test_one_bar_for_the_whole_run_across_epochs():
    bar = MetaProgressBar()
    trainer = mock.Mock(max_steps=300, global_step=0, current_epoch=0, lightning_module=mock.Mock(spec=[]))
    bar._trainer = trainer
    with mock.patch.object(MetaProgressBar, "total_train_batches", 100):
        bar.on_train_start(trainer)
        bar.on_train_epoch_start(trainer)
        first = bar.train_progress_bar
        started = first.start_t
        trainer.global_step, trainer.current_epoch = 100, 1  # after the first epoch and its validation
        first.n = 100
        bar.on_train_epoch_start(trainer)
    assert bar.train_progress_bar is first and first.start_t == started and first.n == 100  # no restart


def test_pretraining_names_its_run_on_the_bar():
    from lightning_meta.handoff.pretraining import CausalLMPretraining

    assert CausalLMPretraining.progress_label == "Pretraining"


class _Noting(BoringModel):
    def training_step(self, batch, batch_idx):
        if batch_idx == 1:  # on the bars' logger itself: no rank or parent-logger state of other tests in between
            logging.getLogger(LOGGER).info("a note written while the bar is open")
        return super().training_step(batch, batch_idx)


def test_lines_logged_while_the_bar_is_open_are_not_glued_to_it(capsys, monkeypatch):
    handler = logging.StreamHandler(sys.stdout)  # where Lightning's own handler writes, as on a terminal
    logger = logging.getLogger(LOGGER)
    # Process-wide logging state an earlier test of the same worker may have changed (twice in full runs, never
    # alone: no line at all): whether the logger lets INFO through.
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logging.root.manager, "disable", logging.NOTSET)
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(handler)
    try:
        trainer = Trainer(
            max_steps=3,
            callbacks=[MetaProgressBar()],
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(_Noting())
    finally:
        logger.removeHandler(handler)
    captured = capsys.readouterr()
    output = captured.out
    state = {"handlers": logger.handlers, "filters": logger.filters, "stderr": captured.err[-2000:]}
    notes = [part for part in re.split(r"[\r\n]", output) if "a note" in part]
    assert len(notes) == 1, (output[-2000:], state)
    (segment,) = notes
    assert segment.strip() == "a note written while the bar is open", repr(segment)
    assert handler in logger.handlers or not any(type(h).__name__ == "_ThroughTheBars" for h in logger.handlers)
