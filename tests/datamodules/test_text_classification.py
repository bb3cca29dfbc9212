"""The embedded docstring dataset, local files, and the text configs through the `lightning-meta` CLI."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from lightning_meta.data.tables import read_table
from lightning_meta.datamodules import TextClassificationDataModule
from lightning_meta.datamodules.text_classification import STDLIB_DOCSTRING_CLASSES, stdlib_docstrings

ROOT = Path(__file__).resolve().parents[2]
QUICK = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.num_val_tasks=2",
    "--data.init_args.num_test_tasks=6",
    "--data.init_args.queries=2",
]
TINY_ENCODER = "--model.learner.init_args.encoder_config={hidden_size: 32, num_hidden_layers: 1, intermediate_size: 64}"


def run(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(["lightning-meta", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        pytest.fail(f"lightning-meta {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def test_embedded_dataset_has_fixed_classes_and_masks_module_names():
    dataset = stdlib_docstrings()
    modules = sorted(name for names in STDLIB_DOCSTRING_CLASSES.values() for name in names)
    assert dataset.features["label"].names == modules and len(modules) == 39
    assert set(dataset["label"]) == set(range(39)) and dataset.num_rows > 39 * 25
    for text, label in zip(dataset["text"], dataset["label"], strict=True):
        assert not re.search(rf"\b{modules[label]}\b", text, re.IGNORECASE), text
    assert any("[MASK]" in text for text in dataset["text"])
    splits = [set(names) for names in STDLIB_DOCSTRING_CLASSES.values()]
    assert sum(len(s) for s in splits) == len(set.union(*splits))  # class-disjoint


def test_embedded_default_uses_the_fixed_split():
    dm = TextClassificationDataModule(ways=5, shots=5, queries=15, num_eval_episodes=4)
    dm.prepare()
    for split, names in STDLIB_DOCSTRING_CLASSES.items():
        assert [dm.class_names[c] for c in dm.split_classes[split]] == list(names)
    episode = dm.eval_batches("test")[0].episode(0)
    assert episode.support["input_ids"].shape[0] == 25 and episode.query["labels"].shape == (75,)


@pytest.fixture
def intents(tmp_path) -> Dataset:
    verbs = ("open", "close", "move", "paint", "sell", "buy", "wash", "fold", "lift")
    rows = [
        (f"please {verb} the {thing} number {i}", verb) for verb in verbs for thing in ("door", "box") for i in range(3)
    ]
    return Dataset.from_dict({"utterance": [r[0] for r in rows], "intent": [r[1] for r in rows]})


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet", "save_to_disk", "save_to_disk_dict"])
def test_local_files_load(tmp_path, intents, kind):
    path = tmp_path / f"intents.{kind}"
    if kind in ("json", "jsonl"):
        intents.to_json(path)
    elif kind == "csv":
        intents.to_csv(path)
    elif kind == "parquet":
        intents.to_parquet(path)
    elif kind == "save_to_disk":
        intents.save_to_disk(path)
    else:
        DatasetDict(train=intents.select(range(30)), test=intents.select(range(30, 54))).save_to_disk(path)
    loaded = read_table(str(path))
    assert sorted(loaded["utterance"]) == sorted(intents["utterance"])
    dm = TextClassificationDataModule(
        str(path), text_column="utterance", label_column="intent", ways=2, shots=2, queries=2, num_eval_episodes=2
    )
    dm.prepare()
    assert dm.class_names == sorted(set(intents["intent"]))


def test_a_dataset_object_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"for a datasets\.Dataset object use EpisodicClassificationDataModule"):
        TextClassificationDataModule(Dataset.from_dict({"text": ["a"], "label": [0]}))


def test_csv_with_empty_cells_names_the_rows_or_drops_them(tmp_path, intents):
    number = {intent: index for index, intent in enumerate(sorted(set(intents["intent"])))}
    rows = [f"{text},{number[intent]}" for text, intent in zip(intents["utterance"], intents["intent"], strict=True)]
    rows[2], rows[7], rows[13] = "please open the box,", ",1", "please fold the door number 1,"  # empty cells
    (tmp_path / "intents.csv").write_text("utterance,intent\n" + "\n".join(rows) + "\n")
    options = dict(text_column="utterance", label_column="intent", ways=2, shots=1, queries=1, num_eval_episodes=2)
    message = (
        r"Missing values in the rows of '.*intents\.csv' \(counted from 0\): column 'utterance' has no value \(None, "
        r"NaN or empty\) in 1 of 54 rows: 7; column 'intent' has no value \(None, NaN or empty\) in 2 of 54 rows: 2, "
        r"13\. Pass drop_missing=True \(--data\.drop_missing=true\) to drop those rows"
    )
    with pytest.raises(ValueError, match=message):
        TextClassificationDataModule(str(tmp_path / "intents.csv"), **options).prepare()
    dropped = TextClassificationDataModule(str(tmp_path / "intents.csv"), drop_missing=True, **options)
    dropped.prepare()
    assert dropped.class_names == [str(i) for i in range(9)]  # not '0.0': a column with an empty cell reads as floats


def test_integer_labels_read_from_csv_as_text_keep_numeric_order(tmp_path):
    """CSV cells are text, so labels 0..11 arrive as '0'..'11': the classes still sort 2 before 10 (the seeded
    class split depends on this order), and labels that are not all integers sort as text."""
    rows = [f"utterance {label} {i},{label}" for label in range(12) for i in range(3)]
    (tmp_path / "numbers.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    module = TextClassificationDataModule(
        str(tmp_path / "numbers.csv"), ways=2, shots=1, queries=1, num_eval_episodes=2
    )
    module.prepare()
    assert module.class_names == [str(label) for label in range(12)]
    from lightning_meta.datamodules.episodic_classification import _class_names

    assert _class_names(["10", "2", "-1", 3]) == ["-1", "2", "3", "10"]
    assert _class_names(["10", "2", "b"]) == ["10", "2", "b"]


def test_own_data_file_through_the_cli_then_test_prints_accuracy_with_ci(tmp_path, intents):
    intents.to_json(tmp_path / "intents.jsonl")
    data = ["--data.dataset=intents.jsonl", "--data.text_column=utterance", "--data.label_column=intent"]
    config = ["--config", str(ROOT / "configs/text_protonet.yaml"), TINY_ENCODER, "--data.ways=2", "--data.shots=1"]
    run("fit", *config, *data, "--test_after_fit=false", *QUICK, cwd=tmp_path)
    checkpoint = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    result = run(
        "test",
        *config,
        *data,
        "--ckpt_path",
        str(checkpoint),
        "--data.num_test_tasks=6",
        "--data.queries=2",
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert re.search(r"test/query_accuracy_post = \d\.\d{4} ± \d\.\d{4} \(6 episodes\)", output), output[-2000:]


@pytest.mark.parametrize("algorithm", ["Reptile", "ProtoNet"])
def test_text_maml_config_swaps_algorithm(tmp_path, algorithm):
    config = ["--config", str(ROOT / "configs/text_maml.yaml"), TINY_ENCODER]
    result = run("fit", *config, f"--model.algorithm={algorithm}", *QUICK, cwd=tmp_path)
    assert "test/query_accuracy_post = " in result.stdout + result.stderr
    saved = (tmp_path / "lightning_logs/version_0/config.yaml").read_text()
    assert f"algorithm:\n    class_path: lightning_meta.algorithms.{algorithm}" in saved
