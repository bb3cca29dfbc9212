"""Tasks' adapters batched: LoRA fast weights on a shared frozen base run every task of a meta-batch
through one forward per inner step (vmap over the adapters, the base unbatched), with the loop's
meta-gradient, first and second order."""

from __future__ import annotations

import pytest
import torch

import lightning_meta.training.meta_batch as execution
from lightning_meta import CausalLMLearner, TaskBatch
from lightning_meta.algorithms import FOMAML, MAML, MetaAlgorithm, Reptile
from lightning_meta.learners.language_models import LoraSettings
from lightning_meta.training.meta_batch import MetaBatchRunner

from conftest import tiny_language_models

CONFIGS = tiny_language_models(layers=2, positions=32)
ALGORITHMS = {
    "maml": lambda: MAML(inner_lr=0.5, inner_steps=2),
    "fomaml": lambda: FOMAML(inner_lr=0.5, inner_steps=2),
    "reptile": lambda: Reptile(inner_lr=0.5, inner_steps=2),
}


def _lora_learner(family: str, meta_learn_base: bool = False, dropout: float = 0.0) -> CausalLMLearner:
    torch.manual_seed(0)
    learner = CausalLMLearner(
        model_config=CONFIGS[family],
        tokenizer="embedded-bpe-512",
        dtype="float64",
        lora=LoraSettings(r=2, alpha=4, dropout=dropout),
        meta_learn_base=meta_learn_base,
        attn_implementation="eager",
    )
    with torch.no_grad():  # peft starts B at zero: make the adapters act, so their gradients are not trivial
        for name, parameter in learner.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return learner


def _padded_batch(tasks: int = 3) -> TaskBatch:
    ids = torch.randint(0, 500, (tasks, 6, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, 1, 9:] = 0  # real, varying lengths: right padding in some sequences of every task
    mask[1, 4, 5:] = 0
    split = {"input_ids": ids, "attention_mask": mask}
    return TaskBatch(support={k: v[:, :3] for k, v in split.items()}, query={k: v[:, 3:] for k, v in split.items()})


def _meta_gradient(learner: CausalLMLearner, algorithm: MetaAlgorithm, batch: TaskBatch, meta_batch: str):
    learner.zero_grad(set_to_none=True)
    out = algorithm.meta_loss(learner, batch, meta_batch=meta_batch)
    out.loss.backward()
    return out, {name: p.grad for name, p in learner.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_batched_adapters_give_the_loops_meta_gradient(family, name):
    learner, algorithm, batch = _lora_learner(family), ALGORITHMS[name](), _padded_batch()
    # Second order too: the norms belong to the shared base.
    assert MetaBatchRunner().refusal(algorithm, learner) is None
    expected_out, expected = _meta_gradient(learner, algorithm, batch, "task_by_task")
    found_out, found = _meta_gradient(learner, algorithm, batch, "vmap")
    torch.testing.assert_close(found_out.loss, expected_out.loss.detach(), rtol=1e-12, atol=1e-14)
    for metric, value in expected_out.metrics.items():
        torch.testing.assert_close(found_out.metrics[metric], value, rtol=1e-12, atol=1e-14, msg=metric)
    assert expected and all(gradient is not None for gradient in expected.values())
    for parameter, gradient in expected.items():
        torch.testing.assert_close(found[parameter], gradient, rtol=1e-10, atol=1e-13, msg=parameter)


def test_batched_adapters_meta_learn_the_unbatched_base_second_order():
    learner, algorithm, batch = _lora_learner("llama", meta_learn_base=True), MAML(inner_lr=0.5), _padded_batch()
    expected_out, expected = _meta_gradient(learner, algorithm, batch, "task_by_task")
    found_out, found = _meta_gradient(learner, algorithm, batch, "vmap")
    assert any("lora_" not in parameter for parameter in expected)
    for parameter, gradient in expected.items():
        torch.testing.assert_close(found[parameter], gradient, rtol=1e-10, atol=1e-13, msg=parameter)


def test_auto_batches_the_adapters_second_order(monkeypatch):
    logged, vmapped = [], []
    monkeypatch.setattr(execution, "rank_zero_debug", logged.append)
    vmap = torch.func.vmap
    monkeypatch.setattr(torch.func, "vmap", lambda *args, **kwargs: vmapped.append(1) or vmap(*args, **kwargs))
    learner, algorithm = _lora_learner("gpt2"), MAML(inner_lr=0.5)
    for _ in range(2):
        _meta_gradient(learner, algorithm, _padded_batch(), "auto")
    assert len(vmapped) == 2 and logged == []


def test_a_normalization_weight_as_fast_weight_is_still_refused_second_order():
    learner = _lora_learner("llama")
    learner.fast_weight_names = [*learner.fast_weight_names, "base_model.model.model.norm.weight"]
    learner.model.base_model.model.model.norm.weight.requires_grad_(True)
    assert MetaBatchRunner().refusal(FOMAML(), learner) is None
    with pytest.raises(ValueError, match=r"normalization layer's weight as a fast weight \(.*model\.norm\.weight\)"):
        MAML(inner_lr=0.5).meta_loss(learner, _padded_batch(), meta_batch="vmap")


def test_lora_dropout_is_refused_by_name_in_training_mode_only():
    learner = _lora_learner("gpt2", dropout=0.1)
    with pytest.raises(ValueError, match=r"lora_dropout.*Dropout, p=0\.1.*Use meta_batch='task_by_task'"):
        FOMAML().meta_loss(learner, _padded_batch(), meta_batch="vmap")
    learner.eval()
    assert MetaBatchRunner().refusal(FOMAML(), learner) is None
