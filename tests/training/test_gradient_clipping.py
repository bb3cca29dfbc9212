"""Gradient clipping under FSDP2 and DDP's handling of unreached parameters equal one process (2 CPU ranks, gloo).

Under FSDP2 the backbone's gradients are DTensors and the replicated fast weights' plain tensors; the
clipped update must equal ``clip_grad_norm_`` over the full meta-gradient in one process. Under DDP,
parameters the meta-gradient does not reach (Reptile's backbone) must get no gradient, as in one
process, so that AdamW's weight decay leaves them alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_meta import TaskBatch

sys.path.insert(0, str(Path(__file__).parents[1] / "workers"))
import clipping_worker  # noqa: E402
import distributed_worker as worker  # noqa: E402


def launch(strategy: str, out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, clipping_worker.__file__, strategy, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def one_process(module, datamodule, optimizer, clip: float | None) -> dict[str, torch.Tensor]:
    """The same steps on both ranks' tasks (their mean meta-gradient), clipped as one whole."""
    datamodule.setup("fit")
    for step in range(worker.STEPS):
        episodes = [episode for rank in (0, 1) for episode in datamodule.train_batch(step, rank).episodes()]
        optimizer.zero_grad(set_to_none=True)
        batch = TaskBatch.stack(episodes)
        module.algorithm.meta_loss(module.learner, batch, meta_batch="all_at_once").loss.backward()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_([*module.learner.parameters(), *module.algorithm.parameters()], clip)
            assert norm > 2 * clip  # the clipping acts
        optimizer.step()
    return module.learner.state_dict()


@pytest.mark.slow
def test_fsdp2_clips_sharded_and_replicated_gradients_by_one_global_norm(tmp_path):
    launch("fsdp", tmp_path)
    for case in clipping_worker.FSDP_CASES:
        module, datamodule, _ = worker.build(case)
        parameters = [*module.learner.parameters(), *module.algorithm.parameters()]
        expected = one_process(module, datamodule, torch.optim.SGD(parameters, lr=worker.LR), clipping_worker.CLIP)
        found = torch.load(tmp_path / f"{case}.pt", weights_only=True)
        assert found.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(found[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{case} {name}")


@pytest.mark.slow
def test_ddp_leaves_unreached_parameters_without_gradient_like_one_process(tmp_path):
    launch("ddp", tmp_path)
    module, datamodule = clipping_worker.ddp_module()
    initial = {name: tensor.clone() for name, tensor in module.learner.state_dict().items()}
    expected = one_process(module, datamodule, clipping_worker.ADAMW(module.learner.parameters()), None)
    found = torch.load(tmp_path / f"{clipping_worker.DDP_CASE}.pt", weights_only=True)
    torch.testing.assert_close(found["model.embed.weight"], initial["model.embed.weight"], rtol=0, atol=0)
    for name, tensor in expected.items():
        torch.testing.assert_close(found[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
