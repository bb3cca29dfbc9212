"""The adaptation curve in TensorBoard, and the test results as ``results.json``."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_meta import MetaLearningModule, RegressionLearner
from lightning_meta.algorithms import MAML
from lightning_meta.datamodules import SinusoidDataModule
from lightning_meta.learners.models import MLP


def test_results_json_and_the_curve_image_in_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_meta.training.plots import AdaptationCurvePlot

    torch.manual_seed(0)
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01), eval_curve=[0, 1, 3])
    logger = TensorBoardLogger(tmp_path)
    trainer = L.Trainer(
        logger=logger, callbacks=[AdaptationCurvePlot()], enable_progress_bar=False, enable_model_summary=False
    )
    data = SinusoidDataModule(meta_batch_size=2, num_test_tasks=4, eval_meta_batch_size=2)
    (logged,) = trainer.test(module, data, verbose=False)

    results = json.loads((tmp_path / "lightning_logs/version_0/results.json").read_text())
    assert results["stage"] == "test"
    for name, figure in results["figures"].items():
        assert figure["mean"] == pytest.approx(logged[name]) and figure["ci95"] == pytest.approx(logged[f"{name}_ci95"])
        assert figure["episodes"] == 4
    assert [point["steps"] for point in results["curve"]["loss"]] == [0, 1, 3]
    assert results["curve"]["loss"][2]["mean"] == pytest.approx(logged["test/query_loss_step3"])

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["test/adaptation_curve"]
    assert events.Images("test/adaptation_curve")[0].encoded_image_string.startswith(b"\x89PNG")
    # TensorBoard's tag rule (tensorboardX renames, with a warning, anything outside it)
    assert all(all(c.isalnum() or c in "_-/." for c in tag) for tag in events.Tags()["scalars"])
    assert "test/query_loss_step3_ci95" in events.Tags()["scalars"]


def test_a_full_disk_leaves_the_earlier_results_json_whole_and_says_so(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    def test_once():
        torch.manual_seed(0)
        module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01))
        trainer = L.Trainer(logger=TensorBoardLogger(tmp_path, version=0), enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        trainer.test(module, SinusoidDataModule(meta_batch_size=2, num_test_tasks=2), verbose=False)

    test_once()
    path = tmp_path / "lightning_logs" / "version_0" / "results.json"
    earlier = path.read_text()
    write_text = Path.write_text

    def disk_fills_up(self, *args, **kwargs):
        if "results.json" not in self.name:
            return write_text(self, *args, **kwargs)
        open(self, "w").close()  # opened (emptied), then nothing more fits
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_fills_up)
    with pytest.raises(OSError, match=rf"The disk is full: the results file {path} was not saved"):
        test_once()
    assert path.read_text() == earlier and json.loads(earlier)["stage"] == "test"
    assert sorted(p.name for p in path.parent.iterdir() if "results" in p.name) == ["results.json"]
