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
    for name, figure in results["metrics"].items():
        assert figure["mean"] == pytest.approx(logged[name]) and figure["ci95"] == pytest.approx(logged[f"{name}_ci95"])
        assert figure["episodes"] == 4
    assert [point["steps"] for point in results["curve"]["loss"]] == [0, 1, 3]
    assert results["curve"]["loss"][2]["mean"] == pytest.approx(logged["test/query_loss_step3"])
    assert results["curve_png"] == "test_adaptation_curve.png"  # one file: the module's, reused by the callback
    assert (tmp_path / "lightning_logs/version_0/test_adaptation_curve.png").read_bytes().startswith(b"\x89PNG")

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
        trainer = L.Trainer(
            logger=TensorBoardLogger(tmp_path, version=0), enable_progress_bar=False, enable_model_summary=False
        )
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


def test_results_json_describes_the_run_and_test_ckpt_path_reports_the_checkpoints_step(tmp_path):
    """``results.json`` said ``global_step: 0`` after ``test --ckpt_path`` of a trained checkpoint, and named
    no algorithm, config, seed, checkpoint, time or version; no config wrote the curve PNG without a callback."""
    pytest.importorskip("matplotlib")
    L.seed_everything(3)

    def module() -> MetaLearningModule:
        return MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01), eval_curve=[0, 2])

    data = SinusoidDataModule(shots=5, meta_batch_size=2, num_val_tasks=2, num_test_tasks=4, eval_meta_batch_size=2)
    options = {"enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path}
    L.Trainer(max_steps=3, limit_val_batches=0, **options).fit(module(), data)
    (checkpoint,) = tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    tested = module()
    L.Trainer(**options).test(tested, data, ckpt_path=checkpoint, verbose=False)

    results = json.loads((tmp_path / "lightning_logs/version_1/results.json").read_text())
    assert results["global_step"] == 3 and results["checkpoint"] == str(checkpoint)
    assert results["algorithm"]["class_path"].endswith(".MAML")
    assert results["algorithm"]["init_args"]["inner_lr"] == 0.01
    assert results["data"]["class_path"] == "SinusoidDataModule" and results["data"]["init_args"]["shots"] == 5
    assert results["seed"] == 3 and results["time"]["evaluation_seconds"] >= 0
    assert results["versions"]["torch"] == torch.__version__
    assert results["metrics"]["test/query_loss_post"]["episodes"] == 4
    assert tested.curve_figure.get_suptitle() == "MAML, K = 5 shots, 3 steps trained, 4 test episodes"
    assert (tmp_path / "lightning_logs/version_1" / results["curve_png"]).is_file()
