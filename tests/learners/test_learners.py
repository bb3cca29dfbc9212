"""Fast-weight selection and functional calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_meta import MLP, CausalLMLearner, ClassificationLearner, EncoderLearner, RegressionLearner, TaskBatch
from lightning_meta.algorithms import inner_loop
from lightning_meta.learners.base import DataError, Learner, resolve_fast_weights

from conftest import Blocks, classification_batch, host_syncs_from_the_package


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


def _plain() -> Learner:
    return ClassificationLearner(Blocks())


def _causal_lm() -> Learner:
    config = {"model_type": "gpt2", "n_layer": 3, "n_embd": 16, "n_head": 2, "n_positions": 32}
    return CausalLMLearner(model_config=config, tokenizer="embedded-bpe-512")


def _encoder() -> Learner:
    config = {
        "vocab_size": 64,
        "hidden_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    }
    return EncoderLearner(encoder_config=config, ways=3)


LEARNERS = {"plain": _plain, "causal_lm": _causal_lm, "encoder": _encoder}
LAST_BLOCK = {"plain": "blocks.2.", "causal_lm": "transformer.h.2.", "encoder": "encoder.encoder.layer.2."}


@pytest.mark.parametrize("kind", LEARNERS)
def test_fast_weight_options_mean_the_same_on_every_learner(kind):
    """One rule (resolve_fast_weights), whatever the learner: last_blocks:N is the blocks, never the head."""
    learner = LEARNERS[kind]()
    model = learner.model
    assert learner.fast_weight_names == [name for name, p in model.named_parameters() if p.requires_grad]
    blocks = resolve_fast_weights(model, "last_blocks:1")
    assert blocks == [name for name, _ in model.named_parameters() if name.startswith(LAST_BLOCK[kind])]
    head = resolve_fast_weights(model, "head")
    assert not set(head) & set(blocks)
    together = resolve_fast_weights(model, ["last_blocks:1", "head"])
    assert set(together) == set(blocks) | set(head)
    assert resolve_fast_weights(model, ["last_blocks:1", "*nothing*"]) == blocks
    with pytest.raises(ValueError, match=r"'last-N' is now spelled 'last_blocks:N'"):
        resolve_fast_weights(model, "last-1")
    with pytest.raises(ValueError, match=r"the model has 3 blocks; use last_blocks:1 \.\. last_blocks:3"):
        resolve_fast_weights(model, "last_blocks:4")


def _episode_for(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if kind == "plain":
        return {"x": torch.randn(6, 4, generator=generator), "y": torch.arange(6) % 3}
    ids = torch.randint(1, 60, (6, 8), generator=generator)
    labels = torch.arange(6) % 3 if kind == "encoder" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("kind", LEARNERS)
def test_inner_loop_and_losses_make_no_host_sync(kind):
    """Data are checked once per batch; the per-step path never waits for the device."""
    torch.manual_seed(0)
    learner = LEARNERS[kind]()
    support = _episode_for(kind)
    with host_syncs_from_the_package() as syncs:
        adapted = inner_loop(learner, learner.fast_parameters(), support, inner_lr=0.1, steps=3, create_graph=True)
        learner.loss(support, adapted)
    assert syncs == []
    with host_syncs_from_the_package() as syncs:  # the once-per-batch check: exactly one sync
        learner.check_data(
            TaskBatch(support={k: v[None] for k, v in support.items()}, query={k: v[None] for k, v in support.items()})
        )
    assert len(syncs) == 1, syncs


def test_the_last_blocks_are_the_blocks_fsdp_shards_one_by_one():
    from lightning_meta.learners.base import blocks_of
    from lightning_meta.training.scaling import default_units

    class TwoLists(nn.Module):  # the longest ModuleList holds the blocks, whatever comes first
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2)])
            self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    model = TwoLists()
    assert list(blocks_of(model)) == list(model.layers) == default_units(model)
    fast = RegressionLearner(model, "last_blocks:2").fast_weight_names
    assert fast == ["layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias"]
    assert len(blocks_of(nn.Linear(2, 2))) == 0 and default_units(nn.Linear(2, 2)) == []


def test_batch_norms_are_normalizations_and_refuse_vmap_by_public_class():
    from lightning_meta.learners.base import is_normalization

    assert all(is_normalization(norm) for norm in (nn.BatchNorm1d(2), nn.SyncBatchNorm(2), nn.LazyBatchNorm2d()))
    learner = RegressionLearner(nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2), nn.Linear(2, 1)))
    assert "updates its running statistics in place" in learner.vmap_refusal()


@pytest.mark.parametrize("label", [-100, -1])
def test_a_classification_learner_refuses_negative_labels_naming_the_episode(label):
    # cross_entropy skips a label of -100 without a word: the batch check says so before any loss.
    batch = classification_batch(meta_batch_size=3)
    batch.query["y"][2, 1] = label
    learner = ClassificationLearner(nn.Linear(4, 3)).double()
    with pytest.raises(DataError, match=r"Episode 2 of the batch .*query\['y'\] holds class labels that are not"):
        learner.check_data(batch)
    learner.check_data(classification_batch(meta_batch_size=3))  # integer labels 0..ways-1 pass
    floats = classification_batch()
    floats.support["y"] = floats.support["y"].double()
    with pytest.raises(DataError, match="not integers >= 0"):
        learner.check_data(floats)
