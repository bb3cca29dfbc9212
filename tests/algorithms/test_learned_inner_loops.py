"""Meta-SGD, MAML++ and ANIL, and the seams they stand on (update rule, owned meta-parameters, trajectory)."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch

from lightning_meta import MLP, MetaLearningModule, RegressionLearner
from lightning_meta.algorithms import ANIL, MAML, SGD, MAMLPlusPlus, MetaSGD, inner_loop, inner_steps
from lightning_meta.datamodules import SinusoidDataModule

from conftest import regression_batch


def _learner(fast_weights="all") -> RegressionLearner:
    torch.manual_seed(0)
    return RegressionLearner(MLP(1, [6, 6], 1), fast_weights=fast_weights).double()


def _finite_differences(loss_of, parameters, eps: float = 1e-6) -> list[torch.Tensor]:
    gradients = []
    for parameter in parameters:
        gradient = torch.zeros_like(parameter)
        flat = parameter.data.view(-1)
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + eps
            plus = loss_of().item()
            flat[i] = original - eps
            minus = loss_of().item()
            flat[i] = original
            gradient.view(-1)[i] = (plus - minus) / (2 * eps)
        gradients.append(gradient)
    return gradients


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_sgd_gradient_for_weights_and_learning_rates_matches_finite_differences(per_tensor, first_order):
    learner = _learner()
    algorithm = MetaSGD(inner_lr=0.1, inner_steps=2, per_tensor=per_tensor, first_order=first_order).double()
    algorithm.bind(learner)
    with torch.no_grad():  # rates that differ per element, so a wrong index would show
        for log_lr in algorithm.log_lrs.values():
            log_lr.add_(0.3 * torch.randn(log_lr.shape, generator=torch.Generator().manual_seed(1), dtype=log_lr.dtype))
    batch = regression_batch()
    parameters = [*learner.parameters(), *algorithm.parameters()]
    loss = algorithm.meta_loss(learner, batch).loss
    analytic = torch.autograd.grad(loss, parameters)
    if first_order:
        # First order: inner gradients g are constants; the reference treats them so explicitly.
        def reference():
            return _first_order_meta_sgd_loss(learner, algorithm, batch)
    else:

        def reference():
            return algorithm.meta_loss(learner, batch, meta_batch="all_at_once").loss

    numeric = _finite_differences(reference, parameters) if not first_order else None
    if first_order:
        expected = torch.autograd.grad(reference(), parameters)
        for got, want in zip(analytic, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    else:
        for got, want in zip(analytic, numeric, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in analytic[-len(list(algorithm.parameters())) :])  # the rates learn


def _first_order_meta_sgd_loss(learner, algorithm, batch):
    """An independent first-order Meta-SGD: θ' = θ − Σ α ⊙ sg(g_k), query loss at θ', averaged over tasks."""
    losses = []
    for episode in batch.episodes():
        weights = dict(learner.fast_parameters())
        for _ in range(algorithm.inner_steps):
            loss, _ = learner.loss(episode.support, weights)
            grads = torch.autograd.grad(loss, list(weights.values()))
            weights = {
                name: w - algorithm.learning_rates()[name] * g.detach()
                for (name, w), g in zip(weights.items(), grads, strict=True)
            }
        losses.append(learner.loss(episode.query, weights)[0])
    return torch.stack(losses).mean()


def test_learned_rates_stay_positive_and_start_at_inner_lr():
    learner = _learner()
    algorithm = MetaSGD(inner_lr=0.02).double()
    algorithm.bind(learner)
    rates = algorithm.learning_rates()
    assert rates.keys() == learner.fast_parameters().keys()
    assert all(torch.allclose(rate, torch.full_like(rate, 0.02)) for rate in rates.values())
    with torch.no_grad():
        next(iter(algorithm.log_lrs.values())).fill_(-50.0)  # an optimizer can push log α anywhere
    assert all((rate > 0).all() for rate in algorithm.learning_rates().values())
    with pytest.raises(RuntimeError, match=r"call algorithm\.bind\(learner\) first"):
        MetaSGD().meta_loss(learner, regression_batch())


def test_maml_plus_plus_with_its_additions_off_is_maml():
    batch = regression_batch()
    reference = _learner()
    torch.autograd.backward(MAML(inner_lr=0.05, inner_steps=3).meta_loss(reference, batch).loss)
    for learn_inner_lrs in (False, True):  # learned rates start at inner_lr: the same weight gradient
        learner = _learner()
        algorithm = MAMLPlusPlus(
            inner_lr=0.05, inner_steps=3, learn_inner_lrs=learn_inner_lrs, multi_step_loss=False
        ).double()
        algorithm.bind(learner)
        loss = algorithm.meta_loss(learner, batch).loss
        loss.backward()
        for (name, p), q in zip(learner.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in algorithm.parameters())


def test_msl_weights_follow_the_papers_schedule():
    algorithm = MAMLPlusPlus(inner_steps=5, msl_anneal_steps=100)
    expected = {
        0: [0.2] * 5,
        50: [0.1] * 4 + [0.6],
        100: [0.006] * 4 + [0.976],
        10_000: [0.006] * 4 + [0.976],
    }
    for step, weights in expected.items():
        algorithm.outer_step = step
        torch.testing.assert_close(algorithm.msl_weights(), torch.tensor(weights, dtype=torch.float64))
        assert math.isclose(float(algorithm.msl_weights().sum()), 1.0)


def test_multi_step_loss_is_the_weighted_sum_of_every_steps_query_loss():
    learner = _learner()
    algorithm = MAMLPlusPlus(inner_lr=0.05, inner_steps=3, learn_inner_lrs=False, msl_anneal_steps=10).double()
    algorithm.outer_step = 4
    batch = regression_batch()
    episode = batch.episode(0)
    trajectory = list(
        inner_steps(learner, learner.fast_parameters(), episode.support, inner_lr=0.05, steps=3, create_graph=True)
    )
    expected = sum(
        w * learner.loss(episode.query, weights)[0]
        for w, weights in zip(algorithm.msl_weights(), trajectory, strict=True)
    )
    loss, metrics = algorithm.task_loss(learner, episode)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["query_loss"], learner.loss(episode.query, trajectory[-1])[0].detach())


def test_derivative_order_annealing_switches_at_the_stated_step():
    batch = regression_batch()

    def gradient(algorithm):
        learner = _learner()
        algorithm.double().bind(learner)
        algorithm.meta_loss(learner, batch).loss.backward()
        return torch.cat([p.grad.flatten() for p in learner.parameters()])

    first = gradient(MAML(inner_lr=0.05, inner_steps=2, first_order=True))
    second = gradient(MAML(inner_lr=0.05, inner_steps=2))
    annealed = MAMLPlusPlus(
        inner_lr=0.05, inner_steps=2, learn_inner_lrs=False, multi_step_loss=False, first_order_steps=10
    )
    for step, expected in ((0, first), (9, first), (10, second), (500, second)):
        annealed.outer_step = step
        torch.testing.assert_close(gradient(annealed), expected, rtol=1e-12, atol=1e-14, msg=f"outer step {step}")


def test_anil_adapts_only_the_head_whatever_the_learner_says():
    batch = regression_batch()
    anil_learner, maml_learner = _learner("all"), _learner("head")
    ANIL(inner_lr=0.1, inner_steps=2).meta_loss(anil_learner, batch).loss.backward()
    MAML(inner_lr=0.1, inner_steps=2).meta_loss(maml_learner, batch).loss.backward()
    for p, q in zip(anil_learner.parameters(), maml_learner.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    adapted = ANIL(inner_lr=0.1).adapt(anil_learner, batch.episode(0).support, steps=3)
    assert sorted(adapted) == ["net.4.bias", "net.4.weight"]


def test_the_trajectory_is_the_inner_loop_and_adapt_is_its_end():
    learner = _learner()
    algorithm = MAML(inner_lr=0.05, eval_inner_lr=0.1, eval_inner_steps=4)
    support = regression_batch().episode(0).support
    trajectory = list(algorithm.adapt_steps(learner, support))
    assert len(trajectory) == 4
    for steps in (1, 4):
        expected = inner_loop(
            learner, learner.fast_parameters(), support, update=SGD(0.1), steps=steps, create_graph=False
        )
        for name, weight in trajectory[steps - 1].items():
            torch.testing.assert_close(weight, expected[name].detach())
    assert all(not w.requires_grad for step in trajectory for w in step.values())
    final = algorithm.adapt(learner, support)
    assert all(torch.equal(final[name], trajectory[-1][name]) for name in final)
    with torch.inference_mode():  # as Lightning evaluates
        assert len(list(algorithm.adapt_steps(learner, support, steps=2))) == 2


@pytest.mark.parametrize("make_algorithm", [lambda: MetaSGD(inner_lr=0.01), lambda: MAMLPlusPlus(inner_steps=2)])
def test_learned_rates_round_trip_through_checkpoints_and_resume_exactly(tmp_path, make_algorithm):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(steps: int, ckpt_path=None, save_at=None) -> tuple[MetaLearningModule, L.Trainer]:
        torch.manual_seed(0)
        module = MetaLearningModule(
            RegressionLearner(MLP(1, [8], 1)),
            make_algorithm(),
            algorithm_lr=0.01,
            optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        )
        callbacks = [ModelCheckpoint(tmp_path, "step{step}", every_n_train_steps=save_at, save_top_k=-1)]
        callbacks = callbacks if save_at else []
        trainer = L.Trainer(
            max_steps=steps,
            logger=False,
            enable_checkpointing=bool(callbacks),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(
            module,
            SinusoidDataModule(meta_batch_size=2, batches_per_epoch=10, num_val_tasks=2, num_test_tasks=2),
            ckpt_path=ckpt_path,
        )
        return module, trainer

    straight, trainer = fit(6, save_at=3)
    assert trainer.optimizers[0].param_groups[1]["lr"] == 0.01  # the rates' own parameter group
    start = {name: torch.full_like(v, math.log(0.01)) for name, v in straight.algorithm.log_lrs.items()}
    assert any(not torch.equal(v, start[name]) for name, v in straight.algorithm.log_lrs.items())  # learned
    (checkpoint,) = tmp_path.glob("step*3.ckpt")
    loaded = MetaLearningModule.load_from_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, value in loaded.algorithm.log_lrs.items():
        assert torch.equal(value, saved[f"algorithm.log_lrs.{name}"])
    resumed, _ = fit(6, ckpt_path=checkpoint)
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_meta_sgd_learns_rates_for_lora_adapters():
    from lightning_meta import CausalLMLearner, LoraSettings, TaskBatch

    config = {
        "model_type": "gpt2",
        "n_layer": 1,
        "n_embd": 16,
        "n_head": 2,
        "n_positions": 32,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }
    torch.manual_seed(0)
    learner = CausalLMLearner(
        model_config=config,
        tokenizer="embedded-bpe-512",
        lora=LoraSettings(r=2, alpha=4),
        attn_implementation="eager",
        dtype="float64",
    )
    algorithm = MetaSGD(inner_lr=0.5, per_tensor=True).double()
    algorithm.bind(learner)
    assert sorted(algorithm.learning_rates()) == sorted(learner.fast_parameters())  # one rate per adapter tensor
    ids = torch.randint(0, 500, (2, 3, 12), generator=torch.Generator().manual_seed(0))
    split = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch = TaskBatch(support=split, query={k: v.flip(1) for k, v in split.items()})
    algorithm.meta_loss(learner, batch).loss.backward()
    # LoRA's B starts at zero, so A's support gradient (and its rate's meta-gradient) is zero at first; B's is not.
    assert all(rate.grad is not None for rate in algorithm.log_lrs.values())
    assert all(rate.grad.abs() > 0 for name, rate in algorithm.log_lrs.items() if "lora_B" in name)


def test_the_outer_step_is_an_argument_of_the_meta_loss():
    # MAML++'s derivative-order schedule reads the step meta_loss is given, not one the caller set beforehand.
    batch = regression_batch()

    def gradient(algorithm, **step):
        learner = _learner()
        algorithm.double().bind(learner)
        algorithm.meta_loss(learner, batch, **step).loss.backward()
        return torch.cat([p.grad.flatten() for p in learner.parameters()])

    first = gradient(MAML(inner_lr=0.05, inner_steps=2, first_order=True))
    second = gradient(MAML(inner_lr=0.05, inner_steps=2))
    annealed = MAMLPlusPlus(
        inner_lr=0.05, inner_steps=2, learn_inner_lrs=False, multi_step_loss=False, first_order_steps=10
    )
    torch.testing.assert_close(gradient(annealed, outer_step=9), first, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gradient(annealed, outer_step=10), second, rtol=1e-12, atol=1e-14)
    assert annealed.outer_step == 10
    torch.testing.assert_close(gradient(annealed), second, rtol=1e-12, atol=1e-14)  # None keeps the step given last
