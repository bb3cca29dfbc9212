"""The shared inner loop: its mode is an argument, SGD is a component of the algorithms that adapt, user rules keep
the three-argument protocol."""

from __future__ import annotations

import pytest
import torch

from lightning_meta import MLP, RegressionLearner
from lightning_meta.algorithms import MAML, SGD, InnerLoopAlgorithm, MetaAlgorithm, MetaICL, MultiTask, ProtoNet
from lightning_meta.learners.base import Learner
from lightning_meta.training.inner_loop import check_step_count, check_step_size, inner_loop

from conftest import regression_batch


@pytest.mark.parametrize("algorithm", [ProtoNet(), MetaICL()])
def test_algorithms_without_an_inner_loop_carry_none_of_it(algorithm):
    assert not isinstance(algorithm, InnerLoopAlgorithm) and not algorithm.adapts_weights
    for name in ("inner_lr", "inner_steps", "inner_update", "evaluation_steps"):
        assert not hasattr(algorithm, name), name
    assert list(algorithm.adapt_steps(None, {})) == []


def test_multitask_adapts_at_evaluation_with_the_sgd_component():
    algorithm = MultiTask(inner_lr=0.2, inner_steps=2, eval_inner_lr=0.1)
    assert isinstance(algorithm, InnerLoopAlgorithm) and algorithm.adapts_weights
    assert algorithm.inner_update(training=False) == SGD(0.1) and algorithm.evaluation_steps() == 2


def test_sgd_gives_the_same_update_in_both_modes_second_order_included():
    torch.manual_seed(0)
    weights = {"a": torch.randn(3, dtype=torch.float64, requires_grad=True), "b": torch.randn(2, dtype=torch.float64)}
    gradients = {"a": (weights["a"] ** 2).sum() * weights["a"], "b": None}
    sequential = SGD(0.1)(0, weights, gradients)
    parallel = SGD(0.1)(0, weights, gradients, parallel=True)
    assert parallel["b"] is weights["b"] and sequential["b"] is weights["b"]
    torch.testing.assert_close(parallel["a"], sequential["a"], rtol=0, atol=1e-15)
    (first,) = torch.autograd.grad(sequential["a"].sum(), weights["a"], retain_graph=True)
    (second,) = torch.autograd.grad(parallel["a"].sum(), weights["a"])
    torch.testing.assert_close(first, second)


class ThreeArgumentMAML(MAML):
    """A user's rule in the documented three-argument form (no ``parallel``)."""

    def inner_update(self, training: bool = True):  # noqa: ANN201
        rate = self.inner_lr
        return lambda step, weights, grads: {n: w if grads[n] is None else w - rate * grads[n] for n, w in
                                             weights.items()}


def test_a_three_argument_rule_runs_under_vmap_with_the_loop_meta_gradient():
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [8], 1)).double()
    batch = regression_batch(meta_batch_size=3)
    gradients = {}
    for mode in ("vmap", "task_by_task"):
        learner.zero_grad(set_to_none=True)
        ThreeArgumentMAML(inner_lr=0.3, inner_steps=2).meta_loss(learner, batch, meta_batch=mode).loss.backward()
        gradients[mode] = [p.grad.clone() for p in learner.parameters()]
    for found, expected in zip(gradients["vmap"], gradients["task_by_task"], strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-13)


class NoModeMAML(MAML):
    """An algorithm written before task_loss took ``parallel``: its inner loop cannot run under vmap."""

    def task_loss(self, learner: Learner, episode):  # noqa: ANN001, ANN201
        adapted = inner_loop(learner, self.fast_weights(learner), episode.support, inner_lr=self.inner_lr,
                             steps=1, create_graph=True)  # fmt: skip
        loss, _ = learner.loss(episode.query, adapted)
        return loss, {"query_loss": loss.detach()}


def test_a_task_loss_without_the_mode_is_refused_vmap_by_name_and_auto_runs_it_task_by_task():
    learner = RegressionLearner(MLP(1, [8], 1)).double()
    algorithm = NoModeMAML(inner_lr=0.3)
    assert "NoModeMAML.task_loss takes no parallel argument" in algorithm.vmap_refusal(learner)
    with pytest.raises(ValueError, match="takes no parallel argument.*meta_batch='task_by_task'"):
        algorithm.meta_loss(learner, regression_batch(), meta_batch="vmap")
    assert torch.isfinite(algorithm.meta_loss(learner, regression_batch()).loss)


def test_a_custom_algorithm_without_an_inner_loop_subclasses_the_contract_alone():
    class Joint(MetaAlgorithm):
        def task_loss(self, learner, episode, *, parallel=False):  # noqa: ANN001, ANN201
            loss, metrics = learner.loss(episode.query)
            return loss, {f"query_{name}": value for name, value in metrics.items()}

    learner = RegressionLearner(MLP(1, [8], 1)).double()
    episode = next(regression_batch().episodes())
    figures = Joint().evaluate(learner, episode)
    assert figures["loss_pre"] == figures["loss_post"]  # no adaptation: the same weights before and after


@pytest.mark.parametrize(
    "check, name, value, default, message",
    [
        (check_step_size, "inner_lr", 0.0, None, "inner_lr must be a finite number > 0, got 0.0"),
        (check_step_size, "eval_inner_lr", float("nan"), "inner_lr",
         r"eval_inner_lr must be a finite number > 0 or None \(= inner_lr\), got nan"),
        (check_step_count, "eval_inner_steps", 2.5, "the algorithm's",
         r"eval_inner_steps must be an integer >= 1 or None \(= the algorithm's\), got 2.5"),
        (check_step_count, "inner_steps", True, None, "inner_steps must be an integer >= 1, got True"),
    ],
)  # fmt: skip
def test_each_inner_loop_option_has_one_check(check, name, value, default, message):
    with pytest.raises(ValueError, match=message):
        check(name, value, default)
    check(name, None, "x") if default else check(name, 1)
