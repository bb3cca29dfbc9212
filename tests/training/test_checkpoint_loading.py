"""Checkpoints of the flat layout (``lightning_meta.models.MLP``, ...) load under today's sub-packages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_meta import MetaLearningModule, cli
from lightning_meta.learners.models import MLP
from lightning_meta.training.checkpoint_loading import MOVED_MODULES, current_class_path, upgrade_hyperparameters

CONFIG = str(Path(__file__).parents[2] / "configs" / "sinusoid.yaml")


def test_every_moved_module_resolves_to_an_importable_one():
    import importlib

    for old, new in MOVED_MODULES.items():
        importlib.import_module(new)
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
    assert current_class_path("lightning_meta.models.MLP") == "lightning_meta.learners.models.MLP"
    assert current_class_path("lightning_meta.MLP") == "lightning_meta.MLP"  # the facade never moves
    nested = {
        "learner": {
            "class_path": "lightning_meta.learners.RegressionLearner",
            "init_args": {"model": {"class_path": "lightning_meta.models.MLP"}},
        }
    }
    upgraded = upgrade_hyperparameters(nested, "old.ckpt")
    assert upgraded["learner"]["init_args"]["model"]["class_path"] == "lightning_meta.learners.models.MLP"


@pytest.fixture
def old_layout_checkpoint(tmp_path) -> str:
    """A sinusoid checkpoint from the CLI whose hyper-parameters name the model by its old module."""
    cli.main(
        [
            "fit",
            "--config",
            CONFIG,
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            "--test_after_fit=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    path = next(tmp_path.rglob("last.ckpt"))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["learner"]["init_args"]["model"]["class_path"] = "lightning_meta.models.MLP"
    torch.save(checkpoint, path)
    return str(path)


def test_a_checkpoint_naming_old_modules_loads_from_python_and_the_cli(old_layout_checkpoint, tmp_path):
    module = MetaLearningModule.load_from_checkpoint(old_layout_checkpoint)
    assert isinstance(module.learner.model, MLP)
    cli.main(
        [
            "test",
            "--ckpt_path",
            old_layout_checkpoint,
            "--data=SinusoidDataModule",
            "--data.num_test_tasks=2",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path / 'test'}",
            "--trainer.enable_progress_bar=false",
        ]
    )
