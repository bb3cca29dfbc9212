"""Control task families: single-token words, exact ceilings (against a Bayes-optimal reader of the support),
fresh deterministic tasks, held-out words, a table's ceiling column, and the control figures."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import pytest
import torch

from lightning_meta.data.tasks import CEILING, CHANCE, CHOICE_LABELS, IGNORE_INDEX, Choices
from lightning_meta.data.tokenization import load_tokenizer
from lightning_meta.datamodules import TextToTextTasksDataModule
from lightning_meta.datamodules.control_tasks import (
    CONTROL_WORDS,
    ControlSettings,
    label_mapping_ceiling,
    word_pools,
)
from lightning_meta.training.metrics import control_metrics

TOKENIZER = "embedded-bpe-4096"


def control(families: list[str], **options) -> TextToTextTasksDataModule:
    options = {"shots": 8, "queries": 4, "max_length": 16} | options
    module = TextToTextTasksDataModule(TOKENIZER, "control", control=ControlSettings(families), **options)
    module.setup("fit")
    return module


def test_every_control_word_is_one_token_at_the_start_and_after_a_space():
    tokenizer = load_tokenizer(TOKENIZER)
    assert len(set(CONTROL_WORDS)) == len(CONTROL_WORDS) == 559
    lengths = {
        len(tokenizer(text, add_special_tokens=False)["input_ids"])
        for word in CONTROL_WORDS
        for text in (word, " " + word)
    }
    assert lengths == {1}
    pools = [set(pool) for split in ("train", "test") for pool in (word_pools(split).inputs, word_pools(split).labels)]
    assert all(not a & b for a, b in itertools.combinations(pools, 2))  # held-out words are no training word


def exact_ceiling(classes: int, shots: int) -> Fraction:
    """The Bayes-optimal reader's accuracy by enumerating every support and query (inputs 0..classes-1)."""
    total = Fraction(0)
    for support in itertools.product(range(classes), repeat=shots):
        seen = len(set(support))
        for query in range(classes):
            total += 1 if query in support else Fraction(1, classes - seen)
    return total / classes ** (shots + 1)


@pytest.mark.parametrize(("classes", "shots"), [(2, 0), (2, 3), (3, 1), (3, 4), (4, 5), (5, 2)])
def test_label_mapping_ceiling_is_exact(classes, shots):
    assert label_mapping_ceiling(classes, shots) == pytest.approx(float(exact_ceiling(classes, shots)), abs=1e-12)


def right_options(query) -> list[int]:
    """Each query example's one right option (a control task marks exactly one)."""
    choices = Choices.read(query)
    assert choices.multiple_choice.all() and (choices.correct.sum(-1) == 1).all()
    return choices.correct.float().argmax(-1).tolist()


def bayes_reader(support, query) -> list[float]:
    """Each query's probability of being right for the Bayes-optimal reader of the support (token level): the
    label the support gives a seen input, else a uniform guess among the options no support example shows."""
    label_of = {}
    for ids, labels, mask in zip(support["input_ids"], support["labels"], support["attention_mask"], strict=True):
        labelled = labels != IGNORE_INDEX
        label_of[tuple(ids[~labelled & mask.bool()].tolist())] = int(labels[labelled][0])
    chances = []
    for ids, labels, mask, choices, answer in zip(
        query["input_ids"],
        query["labels"],
        query["attention_mask"],
        query[CHOICE_LABELS],
        right_options(query),
        strict=True,
    ):
        labelled = labels != IGNORE_INDEX
        options = [int(row[row != IGNORE_INDEX][0]) for row in choices if (row != IGNORE_INDEX).any()]
        key = tuple(ids[~labelled & mask.bool()].tolist())
        if key in label_of:
            chances.append(float(label_of[key] == options[int(answer)]))
        else:
            left = [option for option in options if option not in label_of.values()]
            chances.append(float(options[int(answer)] in left) / len(left))
    return chances


def test_the_ceiling_is_what_a_bayes_optimal_reader_of_the_episodes_gets():
    module = control(["label_mapping"], shots=6, queries=8)
    generator = torch.Generator().manual_seed(0)
    chances = [value for _ in range(600) for value in bayes_reader(*_splits(module.sample_episode(generator, "val")))]
    episode = module.sample_episode(generator, "val")
    assert float(episode.metadata[CEILING]) == pytest.approx(label_mapping_ceiling(4, 6))
    assert float(episode.metadata[CHANCE]) == 0.25
    # 4,800 queries: the Monte-Carlo mean is within 0.01 of the exact ceiling (its standard error is ~0.002).
    assert sum(chances) / len(chances) == pytest.approx(label_mapping_ceiling(4, 6), abs=0.01)


def _splits(episode):
    return episode.support, episode.query


@pytest.mark.parametrize("family", ["arithmetic", "selection"])
def test_one_support_example_determines_every_answer_of_arithmetic_and_selection(family):
    module = control([family], shots=1, queries=6)
    tokenizer = load_tokenizer(TOKENIZER)
    generator = torch.Generator().manual_seed(1)
    for _ in range(40):
        episode = module.sample_episode(generator, "test")
        assert float(episode.metadata[CEILING]) == 1.0
        assert float(episode.metadata[CHANCE]) == pytest.approx(1 / (8 if family == "arithmetic" else 3))
        (x, y), queries = _texts(tokenizer, episode.support)[0], _texts(tokenizer, episode.query)
        for query_input, query_output in queries:
            if family == "arithmetic":  # c = y - x, from the one support example
                assert int(query_output) == (int(query_input) + int(y) - int(x)) % 8
            else:  # the support's output names the position (an input's words differ)
                assert query_output == query_input.split()[x.split().index(y)]


def _texts(tokenizer, split) -> list[tuple[str, str]]:
    pairs = []
    for ids, labels, mask in zip(split["input_ids"], split["labels"], split["attention_mask"], strict=True):
        labelled = labels != IGNORE_INDEX
        prompt = tokenizer.decode(ids[~labelled & mask.bool()])
        pairs.append((prompt, tokenizer.decode(labels[labelled][:-1]).strip()))  # without the end token
    return pairs


def test_control_tasks_are_fresh_deterministic_and_evaluation_uses_held_out_words():
    one, two = control(["label_mapping", "arithmetic", "selection"]), control(["label_mapping", "selection"])
    again = control(["label_mapping", "arithmetic", "selection"])
    assert torch.equal(one.train_batch(3).support["input_ids"], again.train_batch(3).support["input_ids"])
    assert all(
        torch.equal(a.query["input_ids"], b.query["input_ids"])
        for a, b in zip(one.eval_batches("test"), again.eval_batches("test"), strict=True)
    )
    names = [name for index in range(10) for name in one.train_batch(index).metadata["task"]]
    assert len(set(names)) == len(names)  # a fresh task per episode
    assert {name.split("/")[0] for name in names} == {"label_mapping", "arithmetic", "selection"}
    tokenizer = load_tokenizer(TOKENIZER)
    train_words, held_out = (set(word_pools(split).inputs + word_pools(split).labels) for split in ("train", "test"))
    for split, words in (("train", train_words), ("test", held_out)):
        batch = two.train_batch(0) if split == "train" else two.eval_batches("test")[0]
        used = {
            word
            for episode in batch.episodes()
            for pair in _texts(tokenizer, episode.support)
            for text in pair
            for word in text.split()
        }
        assert used and used <= words


def test_control_settings_reach_the_checkpoint_as_plain_data(tmp_path):
    # A ControlSettings object in the datamodule's hyper-parameters made every checkpoint of a control run
    # unloadable with weights_only=True, so `lightning-meta export` refused it.
    module = control(["arithmetic"], meta_batch_size=2)
    torch.save({"datamodule_hyper_parameters": dict(module.hparams)}, tmp_path / "x.ckpt")
    saved = torch.load(tmp_path / "x.ckpt", weights_only=True)["datamodule_hyper_parameters"]
    assert saved["control"]["families"] == ["arithmetic"]
    again = TextToTextTasksDataModule(**saved)  # what Lightning does with them
    again.setup("fit")
    assert again.control == module.control
    assert torch.equal(again.train_batch(0).support["input_ids"], module.train_batch(0).support["input_ids"])


def test_a_tables_ceiling_column_is_reported_with_chance_and_tasks_may_be_drawn_with_replacement(tmp_path):
    rows = [
        {
            "task": f"t{task}",
            "family": f"f{task % 3}",
            "input": word,
            "output": label,
            "options": labels,
            "ceiling": 0.9,
        }
        for task in range(6)
        for labels in [["kiki", "bouba"] if task % 2 else ["lug", "mib"]]
        for word, label in zip(["red", "blue"], labels, strict=True)
    ]
    path = tmp_path / "control.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    module = TextToTextTasksDataModule(
        TOKENIZER,
        str(path),
        shots=4,
        queries=3,
        max_length=16,
        replacement=True,
        val_families=["f1"],
        test_families=["f2"],
    )
    module.setup("fit")  # 2 examples per task are enough: drawn with replacement
    episode = module.sample_episode(torch.Generator().manual_seed(0), "train")
    assert float(episode.metadata[CEILING]) == pytest.approx(0.9) and float(episode.metadata[CHANCE]) == 0.5
    assert len(episode.metadata["example_ids"]) == 7 and set(episode.metadata["example_ids"].tolist()) <= {0, 1}
    for change, message in [
        (0.5, "an example has only 2 options: chance there is 0.5"),
        ("high", "is not an accuracy in"),
    ]:
        path.write_text("\n".join(json.dumps(row | {"ceiling": change}) for row in rows))
        bad = TextToTextTasksDataModule(TOKENIZER, str(path), shots=4, queries=3, max_length=16, replacement=True)
        with pytest.raises(ValueError, match=message):
            bad.setup("fit")


def test_control_metrics_put_chance_at_zero_and_the_ceiling_at_one():
    figures = {
        "accuracy_pre": torch.tensor([0.25, 0.25]),
        "accuracy_post": torch.tensor([1.0, 0.625]),
        "accuracy_per_token_post": torch.tensor([1.0, 1.0]),
        "loss_post": torch.tensor([1.0, 2.0]),
    }
    metadata = {CEILING: torch.tensor([1.0, 1.0]), CHANCE: torch.tensor([0.25, 0.25])}
    result = control_metrics(figures, metadata)
    assert set(result) == {"ceiling", "chance", "control_gap_pre", "control_gap_post"}
    assert result["control_gap_pre"].tolist() == [0.0, 0.0] and result["control_gap_post"].tolist() == [1.0, 0.5]
    assert control_metrics(figures, {}) == {}
