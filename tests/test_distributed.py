"""Meta-training under DDP (two processes, gloo on CPU) equals the single-process computation."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from lightning_meta import MLP, MetaLearningModule, RegressionLearner, TaskBatch
from lightning_meta.algorithms import MAML
from lightning_meta.datamodules import SinusoidDataModule


@pytest.mark.slow
def test_second_order_maml_under_ddp_matches_one_process_on_both_ranks_tasks():
    torch.manual_seed(0)
    module = MetaLearningModule(RegressionLearner(MLP(1, [16], 1)), MAML(inner_lr=0.05, inner_steps=2),
                                optimizer=functools.partial(torch.optim.SGD, lr=0.05))  # fmt: skip
    initial = {name: tensor.clone() for name, tensor in module.learner.state_dict().items()}
    datamodule = SinusoidDataModule(meta_batch_size=3, batches_per_epoch=10, num_val_tasks=2, num_test_tasks=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule)

    reference = RegressionLearner(MLP(1, [16], 1))
    reference.load_state_dict(initial)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    for step in range(4):
        # Each rank draws its own tasks; DDP averages the two ranks' mean surrogates.
        episodes = [e for rank in (0, 1) for e in datamodule.train_batch(step, rank).episodes()]
        optimizer.zero_grad()
        MAML(inner_lr=0.05, inner_steps=2).meta_loss(reference, TaskBatch.stack(episodes)).loss.backward()
        optimizer.step()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(module.learner.state_dict()[name], tensor, msg=name)
    assert any(not torch.equal(initial[n], t) for n, t in reference.state_dict().items())
