"""SMLMT tasks: balanced labels, the masked word never visible, disjoint splits, word sampling."""

from __future__ import annotations

import collections
import random

import lightning as L
import pytest
import torch

from lightning_meta import EncoderLearner, MetaLearningModule
from lightning_meta.algorithms import ProtoNet
from lightning_meta.data.tokenization import load_tokenizer
from lightning_meta.datamodules import MaskedWordTasksDataModule
from lightning_meta.datamodules.masked_words import PLACEHOLDER, mask_word

WORDS = [
    f"{stem}{suffix}"
    for stem in ("alpha", "bravo", "delta", "omega", "sigma", "kappa", "theta", "gamma")
    for suffix in ("", "x", "ine", "ora")
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Sentences of six to twelve made-up words, a few words much more frequent than others."""
    rng = random.Random(0)
    weights = [1 + 8 * (i % 4 == 0) for i in range(len(WORDS))]
    sentences = [" ".join(rng.choices(WORDS, weights, k=rng.randint(6, 12))).capitalize() + "." for _ in range(3000)]
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "text.txt").write_text(" ".join(sentences))
    return str(folder)


def datamodule(corpus, **options) -> MaskedWordTasksDataModule:
    defaults = dict(
        corpus=corpus,
        tokenizer="embedded-wordpiece-512",
        ways=3,
        shots=2,
        queries=3,
        max_length=24,
        max_word_frequency=1.0,
        num_val_tasks=8,
        num_test_tasks=8,
        class_split=(0.5, 0.25, 0.25),
    )
    module = MaskedWordTasksDataModule(**(defaults | options))
    module.setup("fit")
    return module


@pytest.mark.xdist_group("test_masked_words.corpus")
def test_episodes_are_balanced_and_the_word_is_never_visible(corpus):
    dm = datamodule(corpus)
    tokenizer = load_tokenizer("embedded-wordpiece-512")
    for batch in [dm.train_batch(0), dm.eval_batches("test")[0]]:
        for episode in batch.episodes():
            words = [dm.class_names[c] for c in episode.metadata["classes"].tolist()]
            assert len(set(words)) == 3
            for split, per_class in ((episode.support, 2), (episode.query, 3)):
                assert torch.bincount(split["labels"], minlength=3).tolist() == [per_class] * 3
                for ids, label in zip(split["input_ids"], split["labels"], strict=True):
                    text = tokenizer.decode(ids, skip_special_tokens=False).replace(" ", "").lower()
                    assert "[mask]" in text
                    assert words[int(label)] not in text.replace("[mask]", " ")
            support_rows = {tuple(r) for r in episode.support["input_ids"].tolist()}
            assert not support_rows & {tuple(r) for r in episode.query["input_ids"].tolist()}


def test_mask_hides_longer_words_and_any_case():
    assert (
        mask_word("Alpha met alphax and ALPHA, not bravo.", "alpha", "[MASK]")
        == "[MASK] met [MASK] and [MASK], not bravo."
    )


@pytest.mark.xdist_group("test_masked_words.corpus")
def test_train_val_test_words_are_disjoint(corpus):
    splits = {
        name: {datamodule(corpus).class_names[c] for c in ids} for name, ids in datamodule(corpus).split_classes.items()
    }
    assert (
        not splits["train"] & splits["val"]
        and not splits["train"] & splits["test"]
        and not splits["val"] & splits["test"]
    )


@pytest.mark.xdist_group("test_masked_words.corpus")
def test_word_sampling_power_follows_frequency(corpus):
    def frequent_share(power: float) -> float:
        dm = datamodule(corpus, word_sampling_power=power, meta_batch_size=16)
        frequent = {w for i, w in enumerate(WORDS) if i % 4 == 0}
        drawn = collections.Counter(
            dm.class_names[c] for i in range(20) for c in dm.train_batch(i).metadata["classes"].flatten().tolist()
        )
        return sum(n for w, n in drawn.items() if w in frequent) / sum(drawn.values())

    assert frequent_share(1.0) > frequent_share(0.0) + 0.15


@pytest.mark.xdist_group("test_masked_words.corpus")
def test_causal_lm_tokenizer_and_prototype_head(corpus):
    dm = datamodule(corpus, tokenizer="embedded-bpe-512", meta_batch_size=2, num_test_tasks=4)
    assert load_tokenizer("embedded-bpe-512").mask_token is None
    assert PLACEHOLDER in load_tokenizer("embedded-bpe-512").decode(dm.train_batch(0).support["input_ids"][0, 0])
    torch.manual_seed(0)
    gpt2 = {"model_type": "gpt2", "vocab_size": 512, "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}
    module = MetaLearningModule(EncoderLearner(encoder_config=gpt2, pooling="mean"), ProtoNet())
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    (results,) = trainer.test(module, dm, verbose=False)
    assert 0 <= results["test/query_accuracy_post"] <= 1


def test_too_small_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "t.txt").write_text("One short sentence with words. Another short sentence with words.")
    with pytest.raises(ValueError, match=r"Only \d+ words occur in at least shots \+ queries = 5 sentences"):
        datamodule(str(tmp_path))
