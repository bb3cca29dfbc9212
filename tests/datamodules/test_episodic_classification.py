"""Episodic classification over a datasets.Dataset: well-formed, fixed, seeded, resumable episodes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_meta import EncoderLearner, MetaLearningModule
from lightning_meta.algorithms import ProtoNet
from lightning_meta.data.tasks import TaskBatch
from lightning_meta.datamodules import EpisodicClassificationDataModule, episodic_classification

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "piano",
    "tiger",
    "lemon",
    "candle",
    "forest",
    "window",
    "rocket",
    "garden",
    "silver",
    "bridge",
    "planet",
]
#: A 1-layer width-32 BERT without dropout: fast, and deterministic in training mode.
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def word_dataset(classes: int = 15, per_class: int = 6) -> Dataset:
    """Class c's texts all start with WORDS[c]; every text is unique."""
    rows = [(f"{WORDS[c]} example number {i} of {c}", WORDS[c]) for c in range(classes) for i in range(per_class)]
    return Dataset.from_dict({"text": [t for t, _ in rows], "label": [label for _, label in rows]})


def datamodule(dataset: Dataset | None = None, **overrides) -> EpisodicClassificationDataModule:
    options = dict(ways=3, shots=2, queries=3, max_length=16, meta_batch_size=2, num_eval_episodes=6, seed=0)
    return EpisodicClassificationDataModule(
        dataset=word_dataset() if dataset is None else dataset, **(options | overrides)
    )


def digest(batches: list[TaskBatch]) -> str:
    """A fingerprint of every tensor of the batches."""
    hasher = hashlib.sha1()
    for batch in batches:
        for split in (batch.support, batch.query):
            for name in sorted(split):
                hasher.update(split[name].numpy().tobytes())
        hasher.update(batch.metadata["classes"].numpy().tobytes())
    return hasher.hexdigest()


def first_words(dm: EpisodicClassificationDataModule, input_ids: torch.Tensor) -> list[str]:
    tokenizer = dm.load_tokenizer()
    return [tokenizer.decode(row, skip_special_tokens=True).replace(" ", "").split("example")[0] for row in input_ids]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_episodes_are_well_formed(split):
    dm = datamodule(ways=3, shots=2, queries=3)
    batches = [dm.train_batch(i) for i in range(3)] if split == "train" else dm.eval_batches(split)
    for episode in (e for batch in batches for e in batch.episodes()):
        support, query = episode.support, episode.query
        assert (
            support["labels"].tolist() == [0, 0, 1, 1, 2, 2] and query["labels"].tolist() == [0] * 3 + [1] * 3 + [2] * 3
        )
        classes = episode.metadata["classes"].tolist()
        assert len(set(classes)) == 3 and set(classes) <= set(dm.split_classes[split])
        # Each example belongs to the class its label stands for.
        for name in ("support", "query"):
            words = first_words(dm, getattr(episode, name)["input_ids"])
            labels = getattr(episode, name)["labels"].tolist()
            assert words == [dm.class_names[classes[label]] for label in labels]
        rows = {tuple(r) for r in support["input_ids"].tolist()} | {tuple(r) for r in query["input_ids"].tolist()}
        assert len(rows) == 6 + 9  # support and query disjoint, no example twice
        assert support["attention_mask"].shape == support["input_ids"].shape and support["input_ids"].shape[1] <= 16


def test_classes_split_disjointly_by_seed_or_by_list():
    dm = datamodule()
    dm.prepare()
    splits = [set(dm.split_classes[s]) for s in ("train", "val", "test")]
    assert [len(s) for s in splits] == [9, 3, 3] and set.union(*splits) == set(range(15))
    other = datamodule(seed=1)
    other.prepare()
    assert other.split_classes != dm.split_classes
    listed = datamodule(test_classes=["apple", "river", "stone"], val_classes=["cloud", "piano", "tiger"])
    listed.prepare()
    assert [listed.class_names[c] for c in listed.split_classes["test"]] == ["apple", "river", "stone"]
    assert len(listed.split_classes["train"]) == 9
    with pytest.raises(ValueError, match=r"classes the dataset does not have: \['banana'\]"):
        datamodule(test_classes=["banana"]).prepare()
    with pytest.raises(ValueError, match=r"\['apple'\] are listed in more than one split"):
        datamodule(test_classes=["apple", "river", "stone"], val_classes=["apple", "tiger", "lemon"]).prepare()


def test_num_eval_episodes_maps_onto_val_and_test_counts():
    dm = datamodule(num_eval_episodes=5, meta_batch_size=2)
    assert (dm.num_val_tasks, dm.num_test_tasks) == (5, 5)
    assert sum(len(batch) for batch in dm.eval_batches("test")) == 5
    dm = datamodule(num_eval_episodes=5, num_val_tasks=2)
    assert (dm.num_val_tasks, dm.num_test_tasks) == (2, 5)


def test_evaluation_episodes_identical_across_instances_and_processes(tmp_path):
    dataset = word_dataset()
    dataset.to_json(tmp_path / "words.jsonl")
    here = {split: digest(datamodule(dataset).eval_batches(split)) for split in ("val", "test")}
    assert here == {split: digest(datamodule(dataset).eval_batches(split)) for split in ("val", "test")}
    assert here["val"] != here["test"]
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_episodic_classification import datamodule, digest
        from lightning_meta.data.tables import read_table
        dm = datamodule(read_table({str(tmp_path / "words.jsonl")!r}))
        print(digest(dm.eval_batches("val")), digest(dm.eval_batches("test")))
    """)
    env = dict(os.environ, PYTHONHASHSEED="123", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [here["val"], here["test"]]


def test_training_stream_same_for_any_worker_count_and_differs_by_rank():
    def stream(workers: int, rank: int = 0) -> list[TaskBatch]:
        dm = datamodule(batches_per_epoch=4, num_workers=workers)
        dm.prepare()
        # What a DDP rank's Trainer gives the datamodule before the first step.
        dm.trainer = SimpleNamespace(
            global_rank=rank, world_size=2, current_epoch=0, fit_loop=SimpleNamespace(total_batch_idx=-1)
        )
        return list(dm.train_dataloader())

    single = stream(0)
    assert digest(single) == digest(stream(2))
    assert digest(single) == digest([datamodule().train_batch(i) for i in range(4)])
    rank_one = stream(0, rank=1)
    assert digest(rank_one) == digest([datamodule().train_batch(i, rank=1) for i in range(4)])
    assert all(digest([a]) != digest([b]) for a, b in zip(single, rank_one, strict=True))
    assert digest(single) != digest([datamodule(seed=1).train_batch(i) for i in range(4)])


class _Record(Callback):
    def __init__(self) -> None:
        self.batches: dict[int, tuple[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches[trainer.global_step] = (digest([batch]), outputs["loss"].item())


def _fit(tmp_path, max_steps: int, ckpt_path=None) -> dict[int, tuple[str, float]]:
    L.seed_everything(0)
    module = MetaLearningModule(EncoderLearner(encoder_config=TINY), ProtoNet())
    recorder = _Record()
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[
            recorder,
            ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}"),
        ],
    )
    trainer.fit(module, datamodule(batches_per_epoch=4), ckpt_path=ckpt_path)
    return recorder.batches


def test_resume_continues_the_episode_stream_exactly(tmp_path):
    uninterrupted = _fit(tmp_path, max_steps=7)  # 4 batches per epoch: step 3 is mid-epoch
    resumed = _fit(tmp_path / "resumed", max_steps=7, ckpt_path=tmp_path / "step=3.ckpt")
    assert sorted(resumed) == [4, 5, 6, 7]
    for step, (episodes, loss) in resumed.items():
        assert episodes == uninterrupted[step][0], f"step {step} drew other episodes"
        assert loss == uninterrupted[step][1]


def test_padding_is_cut_to_the_longest_text_rounded_up_to_a_multiple_of_8():
    dm = datamodule(max_length=64)
    batch = dm.train_batch(0)
    for split in (batch.support, batch.query):
        width = split["input_ids"].shape[-1]
        longest = int(split["attention_mask"].sum(-1).max())
        assert width < 64 and width % 8 == 0 and width - 8 < longest <= width


def test_class_label_feature_names_the_classes():
    features = Features({"text": Value("string"), "label": ClassLabel(names=WORDS[:6])})
    dataset = Dataset.from_dict(
        {
            "text": [f"{WORDS[c]} example {i}" for c in range(6) for i in range(5)],
            "label": [c for c in range(6) for _ in range(5)],
        },
        features=features,
    )
    dm = datamodule(dataset, ways=2, shots=1, queries=1, class_split=(1, 1, 1))
    dm.prepare()
    assert dm.class_names == WORDS[:6]


def test_bad_inputs_name_the_problem_and_the_fix():
    with pytest.raises(ValueError, match=r"val split has 3 classes .* but ways=4\. Lower ways"):
        datamodule(ways=4).prepare()
    small = Dataset.from_dict(
        {
            "text": [f"{w} x {i}" for w in WORDS[:9] for i in range(6 if w != "cloud" else 2)],
            "label": [w for w in WORDS[:9] for i in range(6 if w != "cloud" else 2)],
        }
    )
    with pytest.raises(ValueError, match=r"shots \+ queries = 5 examples; these have fewer: 'cloud' \(2\).*drop_small"):
        datamodule(small, ways=2, queries=3).prepare()
    dropped = datamodule(small, ways=2, queries=3, drop_small_classes=True)
    dropped.prepare()
    assert dropped.class_names.index("cloud") not in sum(dropped.split_classes.values(), [])
    with pytest.raises(ValueError, match=r"no column 'sentence' \(text_column\); its columns are \['text', 'label'\]"):
        datamodule(text_column="sentence").prepare()
    with pytest.raises(ValueError, match=r"no column 'intent' \(label_column\)"):
        datamodule(label_column="intent").prepare()
    with pytest.raises(ValueError, match="The dataset is empty"):
        datamodule(word_dataset().select([])).prepare()
    numbers = Dataset.from_dict({"text": list(range(20)), "label": [i % 4 for i in range(20)]})
    with pytest.raises(TypeError, match=r"Column 'text' holds Value\('int64'\).*not text.*cast_column"):
        datamodule(numbers).prepare()
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train'\]; give one Dataset"):
        datamodule(DatasetDict(train=word_dataset())).prepare()
    with pytest.raises(ValueError, match="No dataset given"):
        EpisodicClassificationDataModule().prepare()
    with pytest.raises(ValueError, match="ways must be >= 2"):
        datamodule(ways=1)
    with pytest.raises(ValueError, match="shots and queries must be >= 1"):
        datamodule(shots=0)


def test_labels_that_are_not_one_class_or_differ_only_by_spaces_are_refused():
    texts = [f"{WORDS[c]} example {i}" for c in range(9) for i in range(6)]
    labels = [WORDS[c] for c in range(9) for _ in range(6)]
    spaced = Dataset.from_dict(
        {"text": texts, "label": [f"{label} " if i % 2 else label for i, label in enumerate(labels)]}
    )
    with pytest.raises(
        ValueError, match=r"differ only by spaces at their ends, .*: 'apple' and 'apple ', .*Strip the labels"
    ):
        datamodule(spaced).prepare()
    listed = Dataset.from_dict({"text": texts, "label": [[label, "other"] for label in labels]})
    with pytest.raises(ValueError, match=r"holds lists, not one class per row \(row 0: \["):
        datamodule(listed).prepare()


def test_missing_labels_and_texts_are_an_error_or_dropped_by_option(monkeypatch):
    """NaN labels used to become classes named 'nan' (and drop_small_classes a class of unrelated rows)."""
    texts = [f"{WORDS[c]} example number {i}" for c in range(9) for i in range(5)]
    labels = [float(c) for c in range(9) for _ in range(5)]
    for row in (3, 11, 12, 30, 31, 32, 40):
        labels[row] = float("nan")
    texts[7], texts[8], texts[9] = None, "", "   "
    dataset = Dataset.from_dict({"text": texts, "label": labels})
    message = (
        r"Missing values in the rows \(counted from 0\): column 'text' has no value \(None, NaN or empty\) in 3 "
        r"of 45 rows: 7, 8, 9; column 'label' has no value \(None, NaN or empty\) in 7 of 45 rows: 3, 11, 12, 30, "
        r"31 and 2 more\. Pass drop_missing=True \(--data.drop_missing=true\) to drop those rows, or filter them out"
    )
    with pytest.raises(ValueError, match=message):
        datamodule(dataset, ways=2, shots=1, queries=1).prepare()
    logged = []
    monkeypatch.setattr(episodic_classification, "rank_zero_info", logged.append)
    dropped = datamodule(dataset, ways=2, shots=1, queries=1, drop_missing=True)
    dropped.prepare()
    assert logged[0].startswith("Dropping 10 of 45 rows (drop_missing=True): column 'text' has no value")
    assert dropped.class_names == [str(c) for c in range(9)]  # no 'nan' class; 3.0 is class '3' again
    for name, values in (("text", [None] * 3), ("label", [None, "", " "])):
        every = Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 2]} | {name: values})
        with pytest.raises(ValueError, match=rf"Every row misses its text or its label: column '{name}'"):
            datamodule(every, drop_missing=True).prepare()


def test_class_label_minus_one_is_a_missing_label():
    features = Features({"text": Value("string"), "label": ClassLabel(names=WORDS[:6])})
    labels = [c for c in range(6) for _ in range(5)]
    labels[4] = -1
    dataset = Dataset.from_dict(
        {"text": [f"{WORDS[c]} example {i}" for c in range(6) for i in range(5)], "label": labels}, features=features
    )
    with pytest.raises(ValueError, match=r"column 'label' has no value \(None, NaN or empty\) in 1 of 30 rows: 4\."):
        datamodule(dataset, ways=2, shots=1, queries=1, class_split=(1, 1, 1)).prepare()
