"""FOMAML's gradient is ∇L_query(θ') at the adapted weights, computed here independently."""

from __future__ import annotations

import torch
from torch.func import functional_call

from lightning_meta.algorithms import FOMAML

from conftest import regression_batch


def test_gradient_is_query_gradient_at_adapted_weights(mlp_learner):
    alpha, steps = 0.1, 3
    batch = regression_batch(meta_batch_size=2)
    mlp_learner.zero_grad()
    FOMAML(inner_lr=alpha, inner_steps=steps).meta_loss(mlp_learner, batch).loss.backward()

    model = mlp_learner.model
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for episode in batch.episodes():
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        for _ in range(steps):  # plain SGD on the support, no graph kept
            weights = {n: w.requires_grad_() for n, w in weights.items()}
            loss = torch.mean((functional_call(model, weights, (episode.support["x"],)) - episode.support["y"]) ** 2)
            grads = torch.autograd.grad(loss, list(weights.values()))
            weights = {n: (w - alpha * g).detach() for (n, w), g in zip(weights.items(), grads, strict=True)}
        weights = {n: w.requires_grad_() for n, w in weights.items()}
        query_loss = torch.mean((functional_call(model, weights, (episode.query["x"],)) - episode.query["y"]) ** 2)
        for (name, _), grad in zip(
            weights.items(), torch.autograd.grad(query_loss, list(weights.values())), strict=True
        ):
            expected[name] += grad / len(batch)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], msg=name)
