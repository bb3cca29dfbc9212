"""Memory-flat meta-batches, the precision policy, and the strategies refused at setup."""

from __future__ import annotations

import functools
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_meta import MLP, CausalLMLearner, ClassificationLearner, LoraSettings, MetaLearningModule
from lightning_meta.algorithms import FOMAML, MAML, ProtoNet, Reptile
from lightning_meta.datamodules import SinusoidDataModule
from lightning_meta.learners.base import RegressionLearner
from lightning_meta.training import scaling
from lightning_meta.training.scaling import UnsupportedSetupError, check_precision, check_strategy

from conftest import Blocks, classification_batch, regression_batch


def _gradients(learner: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    learner.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad for name, p in learner.named_parameters()}


CASES = {
    "maml": (lambda: MAML(inner_lr=0.3, inner_steps=2), "all"),
    "maml_first_order": (lambda: MAML(inner_lr=0.3, inner_steps=2, first_order=True), "all"),
    "fomaml_head": (lambda: FOMAML(inner_lr=0.3, inner_steps=2), "head"),
    "reptile_head": (lambda: Reptile(inner_lr=0.3, inner_steps=3), "head"),
    "protonet": (ProtoNet, "all"),
}


@pytest.mark.parametrize("case", CASES)
def test_task_by_task_gives_the_all_at_once_gradient(case):
    make_algorithm, fast_weights = CASES[case]
    torch.manual_seed(0)
    learner = ClassificationLearner(Blocks(blocks=2), fast_weights).double()
    batch = classification_batch(meta_batch_size=4, ways=3, shots=2, queries=3, features=4)
    algorithm = make_algorithm()
    joint = algorithm.meta_loss(learner, batch, meta_batch="all_at_once")
    expected = _gradients(learner, joint.loss)
    flat = algorithm.meta_loss(learner, batch, meta_batch="task_by_task")
    found = _gradients(learner, flat.loss)
    torch.testing.assert_close(flat.loss, joint.loss.detach())  # the value too: the mean surrogate
    for name, gradient in expected.items():
        if gradient is None:  # not reached by the surrogate (Reptile's backbone): no gradient either way
            assert case == "reptile_head" and found[name] is None, name
        else:
            torch.testing.assert_close(found[name], gradient, rtol=1e-12, atol=1e-14, msg=name)
    assert flat.metrics.keys() == joint.metrics.keys()


def test_task_by_task_on_a_causal_lm_with_lora_second_order():
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
        meta_learn_base=True,
        attn_implementation="eager",
        dtype="float64",
    )
    ids = torch.randint(0, 500, (3, 4, 12), generator=torch.Generator().manual_seed(0))
    split = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    from lightning_meta import TaskBatch

    batch = TaskBatch(support=split, query={k: v.flip(1) for k, v in split.items()})
    algorithm = MAML(inner_lr=0.5)
    expected = _gradients(learner, algorithm.meta_loss(learner, batch, meta_batch="all_at_once").loss)
    found = _gradients(learner, algorithm.meta_loss(learner, batch, meta_batch="task_by_task").loss)
    for name, gradient in expected.items():
        if gradient is not None:
            torch.testing.assert_close(found[name], gradient, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("make_algorithm", [lambda: MAML(inner_lr=0.01), FOMAML, Reptile])
def test_bf16_mixed_keeps_fast_weights_and_updates_in_float32(make_algorithm):
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [16], 1))
    algorithm = make_algorithm()
    batch = regression_batch(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = algorithm.adapt(learner, batch.episode(0).support, steps=2)
        loss = algorithm.meta_loss(learner, batch).loss
    assert all(weight.dtype == torch.float32 for weight in adapted.values())
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in learner.parameters())


@pytest.mark.parametrize("meta_batch", ["task_by_task", "vmap"])
@pytest.mark.parametrize("make_algorithm", [lambda: MAML(inner_lr=0.01), FOMAML, Reptile])
def test_bf16_mixed_keeps_lora_fast_weights_inner_gradients_and_updates_in_float32(make_algorithm, meta_batch):
    config = {
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 32,
        "max_position_embeddings": 32,
    }
    torch.manual_seed(0)
    learner = CausalLMLearner(
        model_config=config, tokenizer="embedded-bpe-512", lora=LoraSettings(r=2, alpha=4), attn_implementation="eager"
    )
    algorithm = make_algorithm()
    rule, seen = algorithm.inner_update(), []

    def recording(step, weights, gradients, parallel=False):  # noqa: ANN001, ANN202 (passes the mode on to SGD)
        updated = rule(step, weights, gradients, parallel=parallel)
        seen.extend(tensor.dtype for tensor in (*weights.values(), *gradients.values(), *updated.values()))
        return updated

    algorithm.inner_update = lambda training=True: recording
    ids = torch.randint(0, 500, (2, 4, 10), generator=torch.Generator().manual_seed(0))
    split = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    from lightning_meta import TaskBatch

    batch = TaskBatch(support=split, query={name: tensor.flip(1) for name, tensor in split.items()})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = algorithm.meta_loss(learner, batch, meta_batch=meta_batch).loss
    assert seen and set(seen) == {torch.float32}  # fast weights, inner gradients, updated weights
    learner.zero_grad(set_to_none=True)
    loss.backward()
    lora = [p for name, p in learner.named_parameters() if "lora_" in name]
    assert lora and all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)


@pytest.mark.parametrize("make_algorithm", [lambda: MAML(inner_lr=0.01), FOMAML, Reptile, ProtoNet])
def test_bf16_mixed_trains_every_algorithm(make_algorithm):
    torch.manual_seed(0)
    algorithm = make_algorithm()
    if isinstance(algorithm, ProtoNet):
        learner = ClassificationLearner(Blocks(blocks=2))
        datamodule = _clusters()
    else:
        learner = RegressionLearner(MLP(1, [16], 1))
        datamodule = SinusoidDataModule(meta_batch_size=2, batches_per_epoch=5, num_val_tasks=2, num_test_tasks=2)
    module = MetaLearningModule(learner, algorithm, optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    trainer = L.Trainer(
        max_steps=2,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule)
    assert any(not torch.equal(before[name], p) for name, p in learner.named_parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in learner.parameters())


def _clusters():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "workers"))
    from distributed_worker import Clusters

    return Clusters(features=4)


@pytest.mark.parametrize(
    ("precision", "make_algorithm", "message"),
    [
        ("16-mixed", MAML, r"float16 inner-loop gradients are not loss-scaled .* --trainer.precision=bf16-mixed"),
        ("16-true", FOMAML, r"float16 inner-loop gradients"),
        ("bf16-true", Reptile, r"would be in low precision .* Use --trainer.precision=bf16-mixed"),
    ],
)
def test_precisions_that_lose_inner_updates_are_refused(precision, make_algorithm, message):
    with pytest.raises(UnsupportedSetupError, match=message):
        check_precision(precision, make_algorithm())


@pytest.mark.parametrize("precision", ["32-true", "64-true", "bf16-mixed"])
def test_precisions_the_inner_loop_runs_in(precision):
    check_precision(precision, MAML())
    for low in ("16-mixed", "bf16-true"):
        check_precision(low, ProtoNet())  # no inner loop: ordinary low-precision training


def test_protonet_trains_in_bf16_true():
    torch.manual_seed(0)
    learner = ClassificationLearner(Blocks(blocks=2))
    module = MetaLearningModule(learner, ProtoNet(), optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    trainer = L.Trainer(
        max_steps=2,
        precision="bf16-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, _clusters())
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in learner.parameters())


def test_bf16_true_is_refused_at_setup_before_any_step():
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01))
    trainer = L.Trainer(
        max_steps=1,
        precision="bf16-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(UnsupportedSetupError, match="bf16-true"):
        trainer.fit(module, SinusoidDataModule(meta_batch_size=2, num_val_tasks=2, num_test_tasks=2))
    assert trainer.global_step == 0


class _Mesh:
    def __init__(self, tensor_parallel: int) -> None:
        self.sizes = {"tensor_parallel": tensor_parallel, "data_parallel": 1}

    def __getitem__(self, name: str):  # noqa: ANN204
        return type("Dim", (), {"size": lambda _, size=self.sizes[name]: size})()


def test_strategies_that_would_shard_fast_weights_are_refused():
    learner = ClassificationLearner(Blocks(blocks=2), "head")
    with pytest.raises(UnsupportedSetupError, match=r"FSDPStrategy \(FSDP1\) is not supported.*ModelParallelStrategy"):
        check_strategy(FSDPStrategy(), learner, MAML())
    tensor_parallel = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    tensor_parallel._device_mesh = _Mesh(tensor_parallel=2)
    with pytest.raises(UnsupportedSetupError, match=r"tensor_parallel_size=2: tensor parallelism is not supported"):
        check_strategy(tensor_parallel, learner, MAML())
    fsdp = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    fsdp._device_mesh = _Mesh(tensor_parallel=1)
    check_strategy(fsdp, learner, MAML())  # head fast weights: replicated, the rest sharded
    check_strategy(fsdp, ClassificationLearner(Blocks(blocks=2)), ProtoNet())  # no inner loop: shard everything
    with pytest.raises(UnsupportedSetupError, match=r"fast_weights='all': every weight is a fast weight.*lora, head"):
        check_strategy(fsdp, ClassificationLearner(Blocks(blocks=2)), FOMAML())


def _lora_llama(**options) -> CausalLMLearner:
    config = {
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 32,
        "max_position_embeddings": 32,
    }
    torch.manual_seed(0)
    return CausalLMLearner(
        model_config=config,
        tokenizer="embedded-bpe-512",
        lora=LoraSettings(r=2, alpha=4),
        attn_implementation="eager",
        **options,
    )


def _token_task_batch():
    from lightning_meta import TaskBatch

    ids = torch.randint(0, 500, (2, 4, 10), generator=torch.Generator().manual_seed(0))
    split = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return TaskBatch(support=split, query={name: tensor.flip(1) for name, tensor in split.items()})


@pytest.mark.parametrize("meta_batch", ["task_by_task", "vmap"])
def test_a_frozen_base_kept_in_bf16_gives_the_adapters_the_float32_bases_gradients(meta_batch):
    from lightning_meta.training.scaling import keep_frozen_linear_weights_in, restore_dtypes

    learner, batch = _lora_llama(), _token_task_batch()
    lora = {name: p for name, p in learner.named_parameters() if p.requires_grad}

    def adapters_gradients():
        learner.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            FOMAML(inner_lr=0.1, inner_steps=2).meta_loss(learner, batch, meta_batch=meta_batch).loss.backward()
        return {name: p.grad.clone() for name, p in lora.items()}

    expected = adapters_gradients()  # the float32 base, cast by autocast at every use
    float32_bytes = sum(p.numel() * p.element_size() for p in learner.parameters())
    former = keep_frozen_linear_weights_in(learner, torch.bfloat16)
    found = adapters_gradients()

    frozen_linear = {
        name
        for name, module in learner.named_modules()
        if isinstance(module, nn.Linear)
        for weight, p in module.named_parameters(recurse=False)
        if not p.requires_grad
    }
    assert frozen_linear and set(former) == {f"{name}.weight" for name in frozen_linear}  # no float32 copy left
    weights = dict(learner.named_parameters())
    assert all(weights[name].dtype == torch.bfloat16 for name in former)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in lora.values())  # adapters
    assert sum(p.numel() * p.element_size() for p in learner.parameters()) < float32_bytes
    for name, gradient in expected.items():  # autocast cast the same weights to the same values
        torch.testing.assert_close(found[name], gradient, rtol=1.6e-2, atol=1e-5, msg=name)
    restore_dtypes(learner, former)
    assert all(p.dtype == torch.float32 for p in learner.parameters())


def test_the_host_keeps_a_frozen_base_in_bf16_under_bf16_mixed_and_saves_it_in_its_own_dtype(tmp_path):
    learner = _lora_llama()
    module = MetaLearningModule(learner, FOMAML(inner_lr=0.1, inner_steps=1), meta_batch="task_by_task")
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append({p.dtype for p in pl_module.learner.parameters() if not p.requires_grad})

    batch = _token_task_batch()
    trainer = L.Trainer(
        max_steps=2,
        precision="bf16-mixed",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[Spy()],
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch, batch], batch_size=None))
    assert seen and all(torch.bfloat16 in dtypes for dtypes in seen)  # the linear layers' frozen weights
    assert all(p.dtype == torch.float32 for p in learner.parameters())  # given back when fit ends
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert {tensor.dtype for tensor in checkpoint["state_dict"].values() if tensor.is_floating_point()} == {
        torch.float32
    }


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bfloat16_warns_with_the_fix_once_at_setup(native, monkeypatch):
    monkeypatch.setattr(scaling, "cpu_has_native_bf16", lambda: native)
    assert scaling.slow_bf16_message("32-true", "cpu") is None
    assert scaling.slow_bf16_message("bf16-mixed", "cuda") is None
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01))
    trainer = L.Trainer(
        max_steps=1,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, SinusoidDataModule(meta_batch_size=2, batches_per_epoch=2))
    slow = [str(w.message) for w in caught if "without native bfloat16" in str(w.message)]
    if native:
        assert slow == []
    else:
        assert len(slow) == 1 and "precision='bf16-mixed'" in slow[0] and "--trainer.precision=32-true" in slow[0]


def test_the_meta_batch_mode_a_strategy_or_precision_requires():
    from lightning_meta.training.scaling import required_meta_batch_mode

    assert required_meta_batch_mode(False, "32-true") is None  # the configured mode runs
    assert required_meta_batch_mode(False, "bf16-mixed") is None
    assert required_meta_batch_mode(False, "16-mixed") == "all_at_once"  # loss scaling needs the one backward
    assert required_meta_batch_mode(True, "32-true") == "all_at_once"  # autograd.grad cannot reach shards
    assert required_meta_batch_mode(True, "32-true", evaluation=True) == "task_by_task"
    assert required_meta_batch_mode(False, "16-mixed", evaluation=True) is None
