"""Meta-training and evaluation under DDP and FSDP2 (two CPU processes, gloo) equal one process.

Each case of ``tests/workers/distributed_worker.py`` (MAML second order on a head and on LoRA adapters,
FOMAML, Reptile on the last block and head, ProtoNet) is trained for a few SGD steps on two
ranks; the reference trains the same initial weights in this process on both ranks' tasks
(DDP and FSDP average the two ranks' meta-gradients: the mean over all four tasks). Then the
fixed validation episodes, split between the ranks, must give the single-process mean and CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_meta import TaskBatch
from lightning_meta.algorithms import MetaAlgorithm

sys.path.insert(0, str(Path(__file__).parents[1] / "workers"))
import distributed_worker as worker  # noqa: E402

# float32, summed in another order across ranks.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def distributed_run(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(Path(worker.__file__)), request.param, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return request.param, out


def reference(case: str) -> tuple[dict[str, torch.Tensor], dict[str, float], MetaAlgorithm]:
    """The same steps in one process on both ranks' tasks, then single-process validation."""
    module, datamodule, _ = worker.build(case)
    algorithm = module.algorithm
    datamodule.setup("fit")
    optimizer = torch.optim.SGD([*module.learner.parameters(), *algorithm.parameters()], lr=worker.LR)
    for step in range(worker.STEPS):
        episodes = [episode for rank in (0, 1) for episode in datamodule.train_batch(step, rank).episodes()]
        optimizer.zero_grad()
        algorithm.meta_loss(module.learner, TaskBatch.stack(episodes), meta_batch="all_at_once").loss.backward()
        optimizer.step()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, datamodule, verbose=False)
    figures = {name: value.item() for name, value in trainer.callback_metrics.items()}
    return module.learner.state_dict(), figures, module.algorithm


@pytest.mark.slow
@pytest.mark.parametrize("case", list(worker.CASES))
@pytest.mark.xdist_group("test_distributed.distributed_run")
def test_weights_and_evaluation_equal_one_process(distributed_run, case):
    strategy, out = distributed_run
    if strategy == "fsdp" and case in worker.DDP_ONLY:
        pytest.skip("refused under FSDP at setup (tests/training/test_scaling.py checks the refusal)")
    result = torch.load(out / f"{case}.pt", weights_only=True)
    weights, figures, algorithm = reference(case)
    if len(list(algorithm.parameters())):  # learned inner learning rates: the same on every rank, and equal
        for name, value in algorithm.state_dict().items():
            torch.testing.assert_close(result["algorithm"][name], value, **TOLERANCE, msg=f"{strategy} {case} {name}")
    assert result["weights"].keys() == weights.keys()
    initial = worker.build(case)[0].learner.state_dict()
    assert any(not torch.equal(initial[name], tensor) for name, tensor in weights.items())  # it trained
    for name, tensor in weights.items():
        torch.testing.assert_close(result["weights"][name], tensor, **TOLERANCE, msg=f"{strategy} {case} {name}")
    assert figures.keys() == result["figures"].keys() and figures
    for name, value in figures.items():
        # A CI half-width is a spread of the values (over a few task means, with LM tasks): its rounding error is
        # the values' own, so it is compared relative to the mean, not to itself.
        scale = abs(figures[name.removesuffix("_ci95")]) if name.endswith("_ci95") else abs(value)
        assert result["figures"][name] == pytest.approx(value, abs=1e-5 * scale + 1e-6), f"{strategy} {case} {name}"
    if "val/query_loss_pre" in figures:
        # The guard against sharded fast weights being silently ignored: adaptation changes the loss here
        # as in one process (an ignored adaptation would leave post equal to pre).
        assert abs(figures["val/query_loss_post"] - figures["val/query_loss_pre"]) > 1e-5


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumes_exactly_and_consolidates(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(Path(worker.__file__)), "fsdp-resume", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert (tmp_path / "step2.ckpt").is_dir()  # sharded: one folder of distributed-checkpoint files
    for name, tensor in runs["straight"].items():
        torch.testing.assert_close(runs["resumed"][name], tensor, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(runs["first"][n], t) for n, t in runs["straight"].items())
    # Lightning's own utility turns the sharded folder into one file.
    consolidate = [sys.executable, "-m", "lightning.fabric.utilities.consolidate_checkpoint"]
    subprocess.run([*consolidate, str(tmp_path / "step2.ckpt")], check=True, capture_output=True, env=env, timeout=300)
    consolidated = torch.load(tmp_path / "step2.ckpt.consolidated", weights_only=True)
    weights = consolidated["state_dict"]
    for name, tensor in runs["first"].items():
        torch.testing.assert_close(weights[f"learner.{name}"], tensor, rtol=0, atol=0, msg=name)
