"""Fast-weight selection and functional calls."""

from __future__ import annotations

import pytest
import torch

from lightning_meta import MLP, RegressionLearner


def test_fast_weight_choices():
    model = MLP(1, [4, 4], 1)
    assert RegressionLearner(model).fast_weight_names == [n for n, _ in model.named_parameters()]
    assert RegressionLearner(model, "head").fast_weight_names == ["net.4.weight", "net.4.bias"]
    assert RegressionLearner(model, "head", head="net.2").fast_weight_names == ["net.2.weight", "net.2.bias"]
    assert RegressionLearner(model, ["*.bias"]).fast_weight_names == ["net.0.bias", "net.2.bias", "net.4.bias"]


def test_frozen_parameters_are_never_fast():
    model = MLP(1, [4], 1)
    model.net[0].weight.requires_grad_(False)
    assert "net.0.weight" not in RegressionLearner(model).fast_weight_names


@pytest.mark.parametrize(
    ("spec", "head", "message"),
    [
        (["nothing.*"], None, "matches no trainable parameter; parameters are"),
        ("last", None, "fast_weights='last' is not understood"),
        ("head", "decoder", "head='decoder' is not a submodule"),
    ],
)
def test_bad_fast_weights(spec, head, message):
    with pytest.raises(ValueError, match=message):
        RegressionLearner(MLP(1, [4], 1), spec, head=head)


def test_functional_call_uses_given_weights_and_leaves_module_alone():
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [4], 1), "head")
    x = torch.randn(5, 1)
    zero_head = {name: torch.zeros_like(w) for name, w in learner.fast_parameters().items()}
    assert torch.equal(learner(x, params=zero_head), torch.zeros(5, 1))
    assert not torch.equal(learner(x), torch.zeros(5, 1))
