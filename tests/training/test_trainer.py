"""``lightning_meta.Trainer``: the Python path looks like the command (its bar, no summary, no framework noise)."""

from __future__ import annotations

import logging

import lightning
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar

import lightning_meta
from lightning_meta.training.progress import MetaProgressBar
from lightning_meta.training.trainer import _drop_framework_lines


def test_trainer_has_the_commands_bar_no_summary_and_hides_framework_lines():
    trainer = lightning_meta.Trainer(max_steps=2, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, lightning.Trainer)
    assert isinstance(trainer.progress_bar_callback, MetaProgressBar)  # not Lightning's "Epoch 2/-2"
    assert not any(isinstance(callback, ModelSummary) for callback in trainer.callbacks)  # "Total FLOPs: 0"
    assert _drop_framework_lines in logging.getLogger("lightning.pytorch.utilities.rank_zero").filters
    gpu_line = logging.LogRecord(
        "x", logging.INFO, "/x/lightning/pytorch/trainer/setup.py", 1, "GPU available: False (cuda)", None, None
    )
    assert not _drop_framework_lines(gpu_line)
    tip = "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](...)"
    checkpoint_tip = logging.LogRecord(
        "x", logging.INFO, "/x/lightning/pytorch/trainer/connectors/callback_connector.py", 1, tip, None, None
    )
    assert not _drop_framework_lines(checkpoint_tip)


def test_trainer_keeps_the_users_choices():
    own = TQDMProgressBar()
    trainer = lightning_meta.Trainer(max_steps=2, callbacks=[own], enable_model_summary=True, logger=False)
    assert trainer.progress_bar_callback is own
    assert any(isinstance(callback, ModelSummary) for callback in trainer.callbacks)
    assert lightning_meta.Trainer(max_steps=2, enable_progress_bar=False, logger=False).progress_bar_callback is None
