"""The meta-loss as a figure, without autograd: under ``torch.no_grad`` (the documented all-at-once path) and under
``torch.inference_mode`` (a user's own LightningModule's validation step), equal to the training value."""

from __future__ import annotations

import pytest
import torch

from lightning_meta import MLP, RegressionLearner
from lightning_meta.algorithms import ANIL, FOMAML, MAML, MAMLPlusPlus, MetaSGD, MultiTask, Reptile

from conftest import regression_batch

ALGORITHMS = [MAML, FOMAML, MetaSGD, MAMLPlusPlus, Reptile, MultiTask]


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_the_meta_loss_without_autograd_equals_its_training_value(algorithm, context):
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [8], 1)).double()
    batch = regression_batch(meta_batch_size=2)
    if context is torch.inference_mode:
        with torch.inference_mode():  # as Lightning builds evaluation batches: inference tensors
            batch = regression_batch(meta_batch_size=2)
    # MAML++'s multi-step loss is a training objective; without autograd it reports the final step's query loss.
    options = {"multi_step_loss": False} if algorithm is MAMLPlusPlus else {}
    method = algorithm(inner_lr=0.1, inner_steps=2, **options)
    if hasattr(method, "bind"):  # learned step sizes, one per fast weight
        method.bind(learner)
    expected = method.meta_loss(learner, regression_batch(meta_batch_size=2), meta_batch="all_at_once").loss
    with context():
        found = method.meta_loss(learner, batch, meta_batch="all_at_once").loss
    torch.testing.assert_close(found.detach(), expected.detach(), rtol=1e-12, atol=1e-12)


def test_anil_without_autograd_too():
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [8], 1)).double()
    with torch.no_grad():
        assert torch.isfinite(ANIL(inner_lr=0.1).meta_loss(learner, regression_batch(), meta_batch="all_at_once").loss)
