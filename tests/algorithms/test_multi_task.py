"""MultiTask: the joint-training baseline's gradient is the plain loss's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lightning_meta import TaskBatch
from lightning_meta.algorithms import MultiTask, get
from lightning_meta.algorithms.multi_task import joint_loss

from conftest import classification_batch, regression_batch


def _plain_gradient(learner, batch: TaskBatch, loss_of) -> list[torch.Tensor]:
    """∇ of the mean over tasks of the loss on all of a task's examples, computed from the model directly."""
    params = dict(learner.model.named_parameters())
    losses = []
    for index in range(len(batch)):
        x = torch.cat([batch.support["x"][index], batch.query["x"][index]])
        y = torch.cat([batch.support["y"][index], batch.query["y"][index]])
        losses.append(loss_of(functional_call(learner.model, params, (x,)), y))
    return torch.autograd.grad(torch.stack(losses).mean(), list(params.values()))


@pytest.mark.parametrize("meta_batch", ["task_by_task", "all_at_once", "vmap"])
@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_gradient_is_the_plain_loss_gradient_over_support_and_query(kind, meta_batch, mlp_learner, classifier):
    learner, batch, loss_of = {
        "regression": (mlp_learner, regression_batch(), F.mse_loss),
        "classification": (classifier, classification_batch(), F.cross_entropy),
    }[kind]
    expected = _plain_gradient(learner, batch, loss_of)

    out = MultiTask(inner_lr=0.1).meta_loss(learner, batch, meta_batch=meta_batch)
    out.loss.backward()

    for parameter, gradient in zip(learner.model.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, gradient, rtol=1e-12, atol=1e-12)
    query_losses = [learner.loss(episode.query)[0] for episode in batch.episodes()]
    torch.testing.assert_close(out.metrics["query_loss"], torch.stack(query_losses).mean().detach())
    assert ("query_acc" in out.metrics) == (kind == "classification")


def test_splits_that_cannot_be_concatenated_weigh_losses_by_example_count(mlp_learner):
    """Splits with different fields (here a query-only one): still the mean loss over all the examples."""
    episode = regression_batch(meta_batch_size=1, shots=2, queries=5).episode(0)
    query = episode.query | {"task_id": torch.zeros(5)}

    every_error = torch.cat([mlp_learner.predict(split) - split["y"] for split in (episode.support, query)])
    torch.testing.assert_close(joint_loss(mlp_learner, episode.support, query), every_error.pow(2).mean())


def test_adapts_with_sgd_steps_like_maml_and_is_found_by_name(mlp_learner):
    algorithm = get("multitask", inner_lr=0.05, eval_inner_steps=3)
    assert isinstance(algorithm, MultiTask) and algorithm.evaluation_steps() == 3
    episode = regression_batch().episode(0)
    weights = {name: weight.detach() for name, weight in mlp_learner.fast_parameters().items()}
    for _ in range(3):
        loss, _ = mlp_learner.loss(episode.support, {name: w.requires_grad_() for name, w in weights.items()})
        gradients = torch.autograd.grad(loss, list(weights.values()))
        weights = {name: (w - 0.05 * g).detach() for (name, w), g in zip(weights.items(), gradients, strict=True)}
    adapted = algorithm.adapt(mlp_learner, episode.support)
    for name, weight in weights.items():
        torch.testing.assert_close(adapted[name], weight)


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 1, got 0"):
        MultiTask(inner_steps=0)
