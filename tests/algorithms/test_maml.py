"""MAML's meta-gradient against finite differences and a closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_meta import MLP, RegressionLearner
from lightning_meta.algorithms import FOMAML, MAML
from lightning_meta.data.tasks import TaskBatch

from conftest import regression_batch


def meta_gradient(algorithm, learner, batch: TaskBatch) -> dict[str, torch.Tensor]:
    learner.zero_grad()
    algorithm.meta_loss(learner, batch).loss.backward()
    return {name: p.grad.clone() for name, p in learner.named_parameters()}


def finite_difference_gradient(algorithm, learner, batch: TaskBatch, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    gradients = {}
    for name, parameter in learner.named_parameters():
        gradient = torch.zeros_like(parameter)
        flat = parameter.data.view(-1)
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + eps
            plus = algorithm.meta_loss(learner, batch).loss.item()
            flat[i] = original - eps
            minus = algorithm.meta_loss(learner, batch).loss.item()
            flat[i] = original
            gradient.view(-1)[i] = (plus - minus) / (2 * eps)
        gradients[name] = gradient
    return gradients


@pytest.mark.parametrize("fast_weights", ["all", "head"])
def test_second_order_gradient_matches_finite_differences(mlp_learner, fast_weights):
    learner = RegressionLearner(mlp_learner.model, fast_weights=fast_weights)
    maml = MAML(inner_lr=0.1, inner_steps=2)
    batch = regression_batch()
    analytic = meta_gradient(maml, learner, batch)
    numeric = finite_difference_gradient(maml, learner, batch)
    for name in analytic:
        torch.testing.assert_close(analytic[name], numeric[name], rtol=1e-5, atol=1e-7, msg=name)


def test_second_order_differs_from_first_order(mlp_learner):
    batch = regression_batch()
    second = meta_gradient(MAML(inner_lr=0.1, inner_steps=2), mlp_learner, batch)
    first = meta_gradient(MAML(inner_lr=0.1, inner_steps=2, first_order=True), mlp_learner, batch)
    assert max((second[n] - first[n]).abs().max() for n in second) > 1e-4


def test_one_step_linear_regression_closed_form():
    """f(x) = x·w, one inner step: ∇w L_q(w') = (I − 2α/n XsᵀXs) · 2/m Xqᵀ(Xq w' − yq)."""
    torch.manual_seed(1)
    features, alpha = 3, 0.05
    model = nn.Linear(features, 1, bias=False).double()
    learner = RegressionLearner(model)
    batch = regression_batch(meta_batch_size=1, shots=4, queries=5, features=features)
    xs, ys = batch.support["x"][0], batch.support["y"][0]
    xq, yq = batch.query["x"][0], batch.query["y"][0]
    w = model.weight.detach().T  # (features, 1)
    n, m = xs.shape[0], xq.shape[0]
    w_adapted = w - alpha * 2 / n * xs.T @ (xs @ w - ys)
    a = torch.eye(features, dtype=torch.float64) - 2 * alpha / n * xs.T @ xs
    expected = a.T @ (2 / m * xq.T @ (xq @ w_adapted - yq))
    gradient = meta_gradient(MAML(inner_lr=alpha, inner_steps=1), learner, batch)["model.weight"]
    torch.testing.assert_close(gradient, expected.T)


def test_first_order_flag_is_fomaml(mlp_learner):
    batch = regression_batch()
    flagged = meta_gradient(MAML(inner_lr=0.1, inner_steps=3, first_order=True), mlp_learner, batch)
    fomaml = meta_gradient(FOMAML(inner_lr=0.1, inner_steps=3), mlp_learner, batch)
    for name in flagged:
        torch.testing.assert_close(flagged[name], fomaml[name])


def test_meta_batch_averages_task_surrogates(mlp_learner):
    batch = regression_batch(meta_batch_size=3)
    maml = MAML(inner_lr=0.1)
    whole = maml.meta_loss(mlp_learner, batch).loss
    per_task = [maml.task_loss(mlp_learner, episode)[0] for episode in batch.episodes()]
    torch.testing.assert_close(whole, torch.stack(per_task).mean())


def test_backbone_gets_gradient_through_adapted_head():
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [8], 1), fast_weights="head").double()
    assert learner.fast_weight_names == ["net.2.weight", "net.2.bias"]
    gradient = meta_gradient(MAML(inner_lr=0.1), learner, regression_batch())
    assert gradient["model.net.0.weight"].abs().sum() > 0


def test_evaluation_adapts_longer_than_training(mlp_learner):
    batch = regression_batch()
    episode = batch.episode(0)
    maml = MAML(inner_lr=0.05, inner_steps=1, eval_inner_steps=10)
    figures = maml.evaluate(mlp_learner, episode)
    by_hand = maml.adapt(mlp_learner, episode.support, steps=10)
    expected, _ = mlp_learner.loss(episode.query, by_hand)
    torch.testing.assert_close(figures["loss_post"], expected.detach())
    assert figures["loss_post"] < figures["loss_pre"]


def test_evaluation_step_size_can_differ_from_training():
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [8], 1)).double()
    episode = regression_batch().episode(0)
    default = MAML(inner_lr=0.01).adapt(learner, episode.support, steps=1)
    larger = MAML(inner_lr=0.01, eval_inner_lr=0.03).adapt(learner, episode.support, steps=1)
    for name, start in learner.fast_parameters().items():
        torch.testing.assert_close(larger[name] - start, 3 * (default[name] - start))
