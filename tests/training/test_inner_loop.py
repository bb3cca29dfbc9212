"""The shared inner loop: its mode is an argument, SGD and LearnedRates are the components of the algorithms that
adapt, every rule is given the mode (the InnerUpdate protocol), and rules of the earlier three-argument form still
run, with a DeprecationWarning."""

from __future__ import annotations

import pytest
import torch

from lightning_meta import MLP, RegressionLearner
from lightning_meta.algorithms import (
    MAML,
    SGD,
    InnerLoopAlgorithm,
    LearnedRates,
    MAMLPlusPlus,
    MetaAlgorithm,
    MetaICL,
    MetaSGD,
    MultiTask,
    ProtoNet,
)
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
        return lambda step, weights, grads: {
            n: w if grads[n] is None else w - rate * grads[n] for n, w in weights.items()
        }


def test_a_three_argument_rule_runs_under_vmap_with_the_loop_meta_gradient():
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [8], 1)).double()
    batch = regression_batch(meta_batch_size=3)
    gradients = {}
    for mode in ("vmap", "task_by_task"):
        learner.zero_grad(set_to_none=True)
        with pytest.warns(DeprecationWarning, match="takes no `parallel` keyword.*InnerUpdate protocol"):
            ThreeArgumentMAML(inner_lr=0.3, inner_steps=2).meta_loss(learner, batch, meta_batch=mode).loss.backward()
        gradients[mode] = [p.grad.clone() for p in learner.parameters()]
    for found, expected in zip(gradients["vmap"], gradients["task_by_task"], strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-13)


class ModeRecordingMAML(MAML):
    """A rule in the protocol's form, ``parallel`` keyword-only and without a default: it must always be given."""

    seen: list[bool] = []

    def inner_update(self, training: bool = True):  # noqa: ANN201
        sgd = SGD(self.inner_lr)

        def rule(step, weights, gradients, *, parallel):  # noqa: ANN001, ANN202
            ModeRecordingMAML.seen.append(parallel)
            return sgd(step, weights, gradients, parallel=parallel)

        return rule


def test_every_rule_is_given_the_mode_in_training_and_evaluation_without_a_warning(recwarn):
    learner = RegressionLearner(MLP(1, [8], 1)).double()
    algorithm = ModeRecordingMAML(inner_lr=0.3, inner_steps=2)
    for mode, parallel in (("vmap", True), ("task_by_task", False)):
        ModeRecordingMAML.seen.clear()
        algorithm.meta_loss(learner, regression_batch(meta_batch_size=3), meta_batch=mode)
        assert ModeRecordingMAML.seen and set(ModeRecordingMAML.seen) == {parallel}, mode
    ModeRecordingMAML.seen.clear()
    algorithm.evaluate(learner, regression_batch().episode(0))
    assert ModeRecordingMAML.seen == [False, False]
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "parallel" in str(w.message)]


def test_learned_rates_shared_per_weight_and_per_step_against_hand_updates():
    torch.manual_seed(0)
    weights = {"a": torch.randn(3, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    gradients = {"a": torch.randn(3, dtype=torch.float64), "b": None}
    shared = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    for parallel in (False, True):
        updated = LearnedRates(shared)(0, weights, gradients, parallel=parallel)
        torch.testing.assert_close(updated["a"], weights["a"] - shared.exp() * gradients["a"])
        assert updated["b"] is weights["b"]
    (gradient,) = torch.autograd.grad(LearnedRates(shared)(0, weights, gradients)["a"].sum(), shared)
    torch.testing.assert_close(gradient, -(shared.exp() * gradients["a"]).sum())  # the meta-gradient reaches log α
    per_element = {"a": torch.randn(3, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    updated = LearnedRates(per_element)(4, weights, gradients)
    torch.testing.assert_close(updated["a"], weights["a"] - per_element["a"].exp() * gradients["a"])
    per_step = {"a": torch.tensor([-1.0, -2.0], dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    for step, index in ((0, 0), (1, 1), (5, 1)):  # past the last entry, the last rate
        updated = LearnedRates(per_step, per_step=True)(step, weights, gradients)
        torch.testing.assert_close(updated["a"], weights["a"] - per_step["a"][index].exp() * gradients["a"])


def test_meta_sgd_and_maml_plus_plus_adapt_with_the_one_learned_rates_rule():
    learner = RegressionLearner(MLP(1, [8], 1)).double()
    meta_sgd, maml_plus_plus = MetaSGD(inner_lr=0.05), MAMLPlusPlus(inner_lr=0.05, inner_steps=3)
    for algorithm in (meta_sgd, maml_plus_plus):
        algorithm.bind(learner)
        rule = algorithm.inner_update()
        assert isinstance(rule, LearnedRates) and set(rule.log_rates) == set(learner.fast_parameters())
    assert maml_plus_plus.inner_update().per_step and not meta_sgd.inner_update().per_step


class NoModeMAML(MAML):
    """An algorithm written before task_loss took ``parallel``: its inner loop cannot run under vmap."""

    def task_loss(self, learner: Learner, episode):  # noqa: ANN001, ANN201
        adapted = inner_loop(
            learner, self.fast_weights(learner), episode.support, inner_lr=self.inner_lr, steps=1, create_graph=True
        )
        loss, _ = learner.loss(episode.query, adapted)
        return loss, {"query_loss": loss.detach()}


def test_a_task_loss_without_the_mode_is_refused_vmap_by_name_and_auto_runs_it_task_by_task():
    learner = RegressionLearner(MLP(1, [8], 1)).double()
    algorithm = NoModeMAML(inner_lr=0.3)
    with pytest.raises(ValueError, match="takes no parallel argument.*meta_batch='task_by_task'"):
        algorithm.meta_loss(learner, regression_batch(), meta_batch="vmap")
    assert torch.isfinite(algorithm.meta_loss(learner, regression_batch()).loss)
    (verdict,) = algorithm._runners["auto"].verdicts.values()
    assert "unexpected keyword argument 'parallel'" in verdict


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
        (
            check_step_size,
            "eval_inner_lr",
            float("nan"),
            "inner_lr",
            r"eval_inner_lr must be a finite number > 0 or None \(= inner_lr\), got nan",
        ),
        (
            check_step_count,
            "eval_inner_steps",
            2.5,
            "the algorithm's",
            r"eval_inner_steps must be an integer >= 1 or None \(= the algorithm's\), got 2.5",
        ),
        (check_step_count, "inner_steps", True, None, "inner_steps must be an integer >= 1, got True"),
    ],
)
def test_each_inner_loop_option_has_one_check(check, name, value, default, message):
    with pytest.raises(ValueError, match=message):
        check(name, value, default)
    check(name, None, "x") if default else check(name, 1)


def test_the_inner_loop_runs_one_forward_per_step_and_none_for_zero_steps():
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [8], 1)).double()
    support = {key: value[0] for key, value in regression_batch(meta_batch_size=1).support.items()}
    calls = []
    original = learner.loss
    learner.loss = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    weights = learner.fast_parameters()
    assert inner_loop(learner, weights, support, steps=0, create_graph=False, inner_lr=0.1) == weights
    assert calls == []
    adapted = inner_loop(learner, weights, support, steps=2, create_graph=False, inner_lr=0.1)
    assert len(calls) == 2 and all(not torch.equal(adapted[name], weights[name]) for name in weights)


@pytest.mark.parametrize("steps", [-1, 2.5, True])
def test_adaptation_steps_that_are_not_a_count_are_refused(steps):
    learner = RegressionLearner(MLP(1, [8], 1)).double()
    support = {key: value[0] for key, value in regression_batch(meta_batch_size=1).support.items()}
    with pytest.raises(ValueError, match=rf"steps must be an integer >= 0 .*got {steps!r}"):
        MAML(inner_lr=0.1).adapt(learner, support, steps)
