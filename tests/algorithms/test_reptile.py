"""Reptile's meta-gradient is θ − θ', and SGD(lr=ε) performs Nichol et al.'s update exactly."""

from __future__ import annotations

import torch

from lightning_meta.algorithms import Reptile

from conftest import regression_batch


def adapted_by_hand(learner, support, alpha, steps):
    weights = {name: p.detach().clone() for name, p in learner.model.named_parameters()}
    for _ in range(steps):
        weights = {n: w.requires_grad_() for n, w in weights.items()}
        loss, _ = learner.loss(support, weights)
        grads = torch.autograd.grad(loss, list(weights.values()))
        weights = {n: (w - alpha * g).detach() for (n, w), g in zip(weights.items(), grads, strict=True)}
    return weights


def test_gradient_is_theta_minus_adapted(mlp_learner):
    batch = regression_batch(meta_batch_size=3)
    reptile = Reptile(inner_lr=0.05, inner_steps=4)
    mlp_learner.zero_grad()
    reptile.meta_loss(mlp_learner, batch).loss.backward()
    adapted = [adapted_by_hand(mlp_learner, e.support, 0.05, 4) for e in batch.episodes()]
    for name, parameter in mlp_learner.model.named_parameters():
        expected = torch.stack([parameter.detach() - a[name] for a in adapted]).mean(0)
        torch.testing.assert_close(parameter.grad, expected, msg=name)


def test_sgd_step_is_nichol_update(mlp_learner):
    epsilon = 0.3
    batch = regression_batch(meta_batch_size=2)
    before = {name: p.detach().clone() for name, p in mlp_learner.model.named_parameters()}
    adapted = [adapted_by_hand(mlp_learner, e.support, 0.05, 3) for e in batch.episodes()]
    optimizer = torch.optim.SGD(mlp_learner.parameters(), lr=epsilon)
    Reptile(inner_lr=0.05, inner_steps=3).meta_loss(mlp_learner, batch).loss.backward()
    optimizer.step()
    for name, parameter in mlp_learner.model.named_parameters():
        mean_adapted = torch.stack([a[name] for a in adapted]).mean(0)
        torch.testing.assert_close(parameter.detach(), before[name] + epsilon * (mean_adapted - before[name]))


def test_reports_post_adaptation_query_loss(mlp_learner):
    episode = regression_batch(meta_batch_size=1).episode(0)
    reptile = Reptile(inner_lr=0.05, inner_steps=3)
    assert reptile.task_loss(mlp_learner, episode)[1] == {}  # off unless asked: no query forward
    reptile.report_query = True  # as the host sets it on the steps it logs
    _, metrics = reptile.task_loss(mlp_learner, episode)
    expected, _ = mlp_learner.loss(episode.query, adapted_by_hand(mlp_learner, episode.support, 0.05, 3))
    torch.testing.assert_close(metrics["query_loss"], expected.detach())
