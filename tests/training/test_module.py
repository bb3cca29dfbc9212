"""The host module: evaluation under Lightning's defaults, checkpoints, and embedding."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from lightning_meta import MLP, ClassificationLearner, Episode, MetaLearningModule, RegressionLearner
from lightning_meta.algorithms import FOMAML, MAML, MetaSGD, ProtoNet, Reptile
from lightning_meta.datamodules import EpisodicDataModule, SinusoidDataModule
from lightning_meta.learners.base import DataError
from lightning_meta.training.metrics import mean_and_ci95

from conftest import classification_batch, regression_batch


def trainer(**overrides) -> L.Trainer:
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**(options | overrides))


def sinusoid(**overrides) -> SinusoidDataModule:
    return SinusoidDataModule(
        **(
            {
                "meta_batch_size": 4,
                "batches_per_epoch": 5,
                "num_val_tasks": 6,
                "num_test_tasks": 10,
                "eval_meta_batch_size": 4,
            }
            | overrides
        )
    )


class GaussianClusters(EpisodicDataModule):
    """N-way K-shot episodes of Gaussian clusters: a classification datamodule written by a user."""

    def __init__(self, ways: int = 3, shots: int = 2, queries: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ways, self.shots, self.queries = ways, shots, queries

    def sample_episode(self, generator: torch.Generator, split: str) -> Episode:
        episode = classification_batch(
            1,
            self.ways,
            self.shots,
            self.queries,
            seed=int(torch.randint(0, 2**31, (), generator=generator)),
            dtype=torch.float32,
        ).episode(0)
        return episode


def test_validate_and_test_adapt_under_default_inference_mode():
    torch.manual_seed(0)
    module = MetaLearningModule(RegressionLearner(MLP(1, [16], 1)), MAML(inner_lr=0.01, eval_inner_steps=3))
    datamodule = sinusoid()
    assert trainer().validate(module, datamodule, verbose=False)  # Trainer(inference_mode=True) by default
    (results,) = trainer().test(module, datamodule, verbose=False)

    episodes = [episode for batch in datamodule.eval_batches("test") for episode in batch.episodes()]
    post = []
    for episode in episodes:
        adapted = module.algorithm.adapt(module.learner, episode.support, steps=3)
        post.append(module.learner.loss(episode.query, adapted)[0].detach())
    mean, ci95 = mean_and_ci95(torch.stack(post))
    assert results["test/query_loss_post"] == pytest.approx(mean.item(), rel=1e-5)
    assert results["test/query_loss_post_ci95"] == pytest.approx(ci95.item(), rel=1e-5)
    assert results["test/query_loss_post"] < results["test/query_loss_pre"]
    assert set(results) == {
        "test/query_loss_pre",
        "test/query_loss_pre_ci95",
        "test/query_loss_post",
        "test/query_loss_post_ci95",
    }


def test_ci95_is_196_sigma_over_sqrt_n():
    values = torch.tensor([0.2, 0.4, 0.9, 0.5])
    mean, ci95 = mean_and_ci95(values)
    sigma = (sum((v - 0.5) ** 2 for v in values.tolist()) / 3) ** 0.5
    assert mean.item() == pytest.approx(0.5)
    assert ci95.item() == pytest.approx(1.96 * sigma / 2)


def test_episodes_that_share_tasks_are_summarised_over_tasks():
    from lightning_meta.training.metrics import task_ids

    torch.manual_seed(0)
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)).double(), MAML(inner_lr=0.01))
    batch = regression_batch(meta_batch_size=6)
    names = ["a", "a", "b", "b", "c", "c"]
    batch.metadata["task"] = names
    module._evaluate(batch, "val")
    statistic = module.episode_stats["val_loss_post"]
    values, tasks = torch.cat(statistic.values), torch.cat(statistic.tasks)
    assert torch.equal(tasks, task_ids(names))
    mean, ci95, episodes, task_count = statistic.compute()
    assert (episodes, task_count) == (6, 3)
    torch.testing.assert_close((mean, ci95), mean_and_ci95(values, groups=names))
    assert ci95 != mean_and_ci95(values)[1]  # not the interval over episodes


def test_eval_inner_steps_override_on_module():
    torch.manual_seed(0)
    module = MetaLearningModule(RegressionLearner(MLP(1, [16], 1)), MAML(inner_lr=0.01), eval_inner_steps=10)
    one = MetaLearningModule(RegressionLearner(MLP(1, [16], 1)), MAML(inner_lr=0.01))
    one.load_state_dict(module.state_dict())
    (ten_steps,) = trainer().test(module, sinusoid(), verbose=False)
    (one_step,) = trainer().test(one, sinusoid(), verbose=False)
    assert ten_steps["test/query_loss_post"] < one_step["test/query_loss_post"]


@pytest.mark.parametrize("algorithm", [ProtoNet(), MAML(inner_lr=0.5, inner_steps=2), FOMAML(inner_lr=0.5)])
def test_classification_logs_accuracy(algorithm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    module = MetaLearningModule(ClassificationLearner(model), algorithm)
    datamodule = GaussianClusters(meta_batch_size=2, batches_per_epoch=5, num_val_tasks=4, num_test_tasks=8)
    trainer(max_steps=5, limit_val_batches=0).fit(module, datamodule)
    (results,) = trainer().test(module, datamodule, verbose=False)
    assert 0.0 <= results["test/query_accuracy_post"] <= 1.0 and "test/query_accuracy_post_ci95" in results
    assert ("test/query_accuracy_pre" in results) == (not isinstance(algorithm, ProtoNet))


def test_predict_returns_adapted_query_outputs():
    torch.manual_seed(0)
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), FOMAML(inner_lr=0.01, eval_inner_steps=2))
    datamodule = sinusoid(num_test_tasks=4)
    predictions = trainer().predict(module, datamodule)
    episode = datamodule.eval_batches("test")[0].episode(1)
    expected = module.learner.predict(episode.query, module.algorithm.adapt(module.learner, episode.support, 2))
    torch.testing.assert_close(predictions[0][1], expected)


def test_hyperparameters_round_trip_from_python(tmp_path):
    module = MetaLearningModule(
        RegressionLearner(MLP(1, [8, 4], 1), fast_weights="head"),
        Reptile(inner_lr=0.03, inner_steps=3, eval_inner_steps=7),
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2),
    )
    fit = trainer(max_steps=2, limit_val_batches=0)
    fit.fit(module, sinusoid())
    fit.save_checkpoint(tmp_path / "module.ckpt")

    loaded = MetaLearningModule.load_from_checkpoint(tmp_path / "module.ckpt")  # torch.load's weights_only default
    assert isinstance(loaded.algorithm, Reptile)
    assert (loaded.algorithm.inner_lr, loaded.algorithm.inner_steps, loaded.algorithm.eval_inner_steps) == (0.03, 3, 7)
    assert loaded.learner.fast_weight_names == ["net.4.weight", "net.4.bias"]
    assert loaded.learner.model.hidden_sizes == [8, 4]
    for name, tensor in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    optimizer = loaded.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.5


class _Opaque(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = nn.Linear(1, width)  # keeps no `width` attribute: cannot be described as a config
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.layer(x)))


def test_model_without_recoverable_arguments_warns_and_loads_with_learner(tmp_path):
    with pytest.warns(UserWarning, match="pass learner=.*load_from_checkpoint"):
        module = MetaLearningModule(RegressionLearner(_Opaque(4)))
    fit = trainer(max_steps=1, limit_val_batches=0)
    fit.fit(module, sinusoid())
    fit.save_checkpoint(tmp_path / "opaque.ckpt")
    loaded = MetaLearningModule.load_from_checkpoint(tmp_path / "opaque.ckpt", learner=RegressionLearner(_Opaque(4)))
    assert torch.equal(loaded.learner.model.out.weight, module.learner.model.out.weight)


@pytest.mark.parametrize(
    "options",
    [
        {"learner": RegressionLearner(nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)))},  # *modules
        {"learner": RegressionLearner(MLP(1, [8], 1)), "optimizer": lambda params: torch.optim.SGD(params, lr=0.1)},
    ],
    ids=["sequential", "lambda_optimizer"],
)
def test_components_a_config_cannot_rebuild_warn_instead_of_saving_a_config_that_fails_to_load(options):
    # Saved as {"class_path": "torch.nn...Sequential", "init_args": {}} (an empty model) or "builtins.function".
    with pytest.warns(UserWarning, match="Hyper-parameters not saved in full .*pass learner=.*load_from_checkpoint"):
        MetaLearningModule(**options)


def test_non_finite_meta_loss_stops_with_advice(tmp_path):
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1), fast_weights="head"), Reptile(inner_lr=1e30))
    with pytest.raises(FloatingPointError, match=r"before adaptation, so the inner loop diverged: lower inner_lr"):
        trainer(max_steps=2, limit_val_batches=0).fit(module, sinusoid())


def test_diverged_outer_step_blames_the_meta_parameters_not_inner_lr():
    torch.manual_seed(0)
    module = MetaLearningModule(
        RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01), optimizer=functools.partial(torch.optim.SGD, lr=1e38)
    )
    with pytest.raises(FloatingPointError, match=r"meta-parameters diverged .* meta learning rate") as error:
        trainer(max_steps=5, limit_val_batches=0).fit(module, sinusoid())
    assert "inner_lr" not in str(error.value)


def test_diverged_evaluation_adaptation_is_an_error_not_a_nan_average():
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01, eval_inner_lr=1e30))
    with pytest.raises(FloatingPointError, match=r"val: adaptation diverged on episode \d+ .*eval_inner_lr"):
        trainer(max_steps=1).validate(module, sinusoid())


def test_diverged_adaptation_with_learned_step_sizes_names_their_start_not_an_option_they_lack():
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MetaSGD(inner_lr=1e30, eval_inner_steps=3))
    with pytest.raises(FloatingPointError, match=r"Lower the learned step sizes' start .*inner_lr; MetaSGD") as error:
        trainer(max_steps=1).validate(module, sinusoid())
    assert "eval_inner_lr" not in str(error.value)


def test_diverged_adaptation_curve_names_the_first_step_that_diverged():
    module = MetaLearningModule(
        RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01, eval_inner_lr=1e30), eval_curve=[0, 1, 4]
    )
    with pytest.raises(FloatingPointError, match=r"adaptation diverged on episode \d+ .*not after 1 step\)"):
        trainer(max_steps=1).validate(module, sinusoid())


def test_non_finite_evaluation_data_names_split_and_episode():
    class NaNQueries(SinusoidDataModule):
        def sample_episode(self, generator, split):
            episode = super().sample_episode(generator, split)
            episode.query["y"][0] = float("nan")
            return episode

    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01))
    with pytest.raises(DataError, match=r"Episode 0 of the batch \(4 of 4 episodes\): query\['y'\] holds NaN"):
        trainer().test(module, NaNQueries(meta_batch_size=4, num_test_tasks=4))


def test_protonet_refuses_a_regression_learner_at_construction():
    with pytest.raises(ValueError, match="ProtoNet needs a classification task"):
        MetaLearningModule(RegressionLearner(MLP()), ProtoNet())


class UserModule(L.LightningModule):
    """A user's own LightningModule that calls an algorithm from its training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.learner = RegressionLearner(MLP(1, [16], 1))
        self.maml = FOMAML(inner_lr=0.01, inner_steps=2)

    def training_step(self, batch, batch_idx):
        out = self.maml.meta_loss(self.learner, batch)
        self.log("meta_loss", out.loss)
        return out.loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_algorithm_inside_a_users_own_module():
    torch.manual_seed(0)
    module = UserModule()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer(max_steps=3, limit_val_batches=0).fit(module, sinusoid())
    assert all(not torch.equal(before[n], p) for n, p in module.named_parameters())


def test_users_own_trainer_fits_the_module_and_it_learns():
    torch.manual_seed(0)
    module = MetaLearningModule(
        RegressionLearner(MLP(1, [40, 40], 1)),
        MAML(inner_lr=0.01, eval_inner_steps=5),
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
    )
    datamodule = sinusoid(meta_batch_size=10, num_test_tasks=40, eval_meta_batch_size=20)
    (before,) = trainer().test(module, datamodule, verbose=False)
    trainer(max_steps=150, limit_val_batches=0).fit(module, datamodule)
    (after,) = trainer().test(module, datamodule, verbose=False)
    assert after["test/query_loss_post"] < 0.7 * before["test/query_loss_post"]


def test_bf16_mixed_precision_meta_training_runs_and_learns():
    torch.manual_seed(0)
    module = MetaLearningModule(
        RegressionLearner(MLP(1, [40, 40], 1)),
        MAML(inner_lr=0.01, eval_inner_steps=5),
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
    )
    datamodule = sinusoid(meta_batch_size=10, num_test_tasks=40, eval_meta_batch_size=20)
    (before,) = trainer().test(module, datamodule, verbose=False)
    trainer(max_steps=100, limit_val_batches=0, precision="bf16-mixed").fit(module, datamodule)
    (after,) = trainer(precision="bf16-mixed").test(module, datamodule, verbose=False)
    assert after["test/query_loss_post"] < 0.8 * before["test/query_loss_post"]
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_adaptation_curve_points_are_adapt_then_query_loss_and_post_is_on_it():
    torch.manual_seed(0)
    module = MetaLearningModule(
        RegressionLearner(MLP(1, [16], 1)), MetaSGD(inner_lr=0.05), eval_inner_steps=2, eval_curve=[3, 0, 1, 2]
    )
    datamodule = sinusoid(num_test_tasks=6)
    (results,) = trainer().test(module, datamodule, verbose=False)

    episodes = [episode for batch in datamodule.eval_batches("test") for episode in batch.episodes()]
    for k in (0, 1, 2, 3):
        losses = []
        for episode in episodes:
            adapted = module.algorithm.adapt(module.learner, episode.support, steps=k)
            losses.append(module.learner.loss(episode.query, adapted)[0].detach())
        mean, ci95 = mean_and_ci95(torch.stack(losses))
        assert results[f"test/query_loss_step{k}"] == pytest.approx(mean.item(), rel=1e-6), k
        assert results[f"test/query_loss_step{k}_ci95"] == pytest.approx(ci95.item(), rel=1e-6), k
    assert results["test/query_loss_step0"] == results["test/query_loss_pre"]
    assert results["test/query_loss_step2"] == results["test/query_loss_post"]  # post: on the curve


def test_adaptation_curve_logs_accuracy_for_classification():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    module = MetaLearningModule(ClassificationLearner(model), MAML(inner_lr=0.5), eval_curve=[0, 2])
    (results,) = trainer().test(module, GaussianClusters(num_test_tasks=4, eval_meta_batch_size=4), verbose=False)
    assert {"test/query_accuracy_step0", "test/query_accuracy_step2_ci95", "test/query_loss_step2"} <= set(results)
    assert results["test/query_accuracy_step0"] == results["test/query_accuracy_pre"]


@pytest.mark.parametrize("steps", [0, 2.5, True, "3"])
def test_eval_inner_steps_must_be_a_whole_count(steps):
    with pytest.raises(ValueError, match=rf"eval_inner_steps must be an integer >= 1 or None .*got {steps!r}"):
        MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(), eval_inner_steps=steps)


def test_adaptation_curve_options_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"eval_curve must be a non-empty list of step counts >= 0.*got \[0, -1\]"):
        MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(), eval_curve=[0, -1])
    with pytest.raises(ValueError, match="ProtoNet has no adaptation steps"):
        MetaLearningModule(ClassificationLearner(nn.Linear(4, 3)), ProtoNet(), eval_curve=[0, 1])


def test_adaptation_curve_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from lightning_meta.training.plots import AdaptationCurvePlot

    torch.manual_seed(0)
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01), eval_curve=[0, 1, 3])
    plot = AdaptationCurvePlot()
    trainer(callbacks=[plot], default_root_dir=tmp_path).test(module, sinusoid(num_test_tasks=4), verbose=False)
    assert plot.path == tmp_path / "test_adaptation_curve.png"
    assert plot.path.read_bytes().startswith(b"\x89PNG")


def test_ranks_get_equal_evaluation_batch_counts_and_padding_is_not_counted():
    from lightning_meta.data.episodic import _PaddedBatches
    from lightning_meta.data.tasks import PADDING_KEY

    data = sinusoid(num_val_tasks=6, eval_meta_batch_size=2)
    batches = data.eval_batches("val")  # 3 batches, 2 ranks

    class FakeTrainer:
        world_size = 2

    samplers = []
    for FakeTrainer.global_rank in (0, 1):
        data.trainer = FakeTrainer()
        samplers.append(data.val_dataloader().sampler)
    assert [list(sampler) for sampler in samplers] == [[0, 2], [1, -1]]  # no batch twice
    assert all(isinstance(sampler, DistributedSampler) for sampler in samplers)  # so Lightning keeps them
    padding = _PaddedBatches(batches)[-1]
    assert padding.metadata[PADDING_KEY] == [True, True] and torch.equal(padding.query["y"], batches[0].query["y"])
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01))
    module._evaluate(padding, "val")
    assert all(statistic.update_count == 0 for statistic in module.episode_stats.values())
    module._evaluate(batches[0], "val")
    assert module.episode_stats["val_loss_post"].update_count == 2


def test_a_data_tokenizer_other_than_the_models_is_refused_before_training(tmp_path):
    # Another tokenizer's ids that fall inside the model's vocabulary: nothing else would notice.
    from lightning_meta import CausalLMLearner
    from lightning_meta.data.tokenization import load_tokenizer
    from lightning_meta.datamodules import LanguageModelingTasksDataModule

    other = load_tokenizer("embedded-bpe-4096")
    other.add_tokens(["<my-token>"])
    other.save_pretrained(tmp_path / "other")

    config = dict(model_type="gpt2", n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=4096)
    learner = CausalLMLearner(model_config=config, tokenizer="embedded-bpe-4096")
    data = LanguageModelingTasksDataModule(
        tokenizer=str(tmp_path / "other"),
        block_size=32,
        shots=2,
        queries=2,
        meta_batch_size=2,
        num_val_tasks=2,
        num_test_tasks=2,
        max_tokens_per_domain=3000,
    )
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"reads the token ids of tokenizer 'embedded-bpe-4096' .*tokenized with "):
        trainer.fit(MetaLearningModule(learner, FOMAML(inner_lr=0.1)), data)


def test_the_same_token_ids_under_another_name_pass():
    from lightning_meta.data import tokenization

    folder = tokenization._SHIPPED_DIR / "embedded-bpe-4096"
    tokenization.check_data_tokenizer("embedded-bpe-4096", str(folder))  # no error: one vocabulary, two names


@pytest.mark.parametrize(
    ("learner", "algorithm", "message"),
    [
        (
            nn.Linear(1, 1),
            MAML(),
            r"learner is a Linear, not a Learner: wrap the model in a learner: RegressionLearner",
        ),
        (None, "MAML", r"algorithm is 'MAML', not a MetaAlgorithm instance: .*get\('MAML', inner_lr=\.\.\.\)"),
        (None, MAML, r"not a MetaAlgorithm instance: call the class with its options: MAML\(\.\.\.\)"),
    ],
)
def test_components_of_the_wrong_kind_are_refused_with_the_call_that_makes_one(learner, algorithm, message):
    with pytest.raises(TypeError, match=message):
        MetaLearningModule(learner if learner is not None else RegressionLearner(MLP(1, [8], 1)), algorithm)
