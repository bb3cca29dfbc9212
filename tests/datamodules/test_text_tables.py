"""Reading a user's task table (``tasks_from_table``, ``tasks_from_folder``): what a row means, and the rows refused
with the row and the fix."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from lightning_meta.datamodules import TextToTextTasksDataModule
from lightning_meta.datamodules.text_tables import TableColumns, parse_scores, tasks_from_folder, tasks_from_table

TEMPLATE = "{input} ->"


def read(rows: list[dict], max_examples: int | None = None) -> dict:
    return tasks_from_table(Dataset.from_list(rows), "t.jsonl", TableColumns(), TEMPLATE, max_examples)


def test_scores_that_contradict_the_outputs_are_refused():
    # Accuracy grades by the scores, the correct-option probability by the outputs: "no" was graded right.
    rows = [{"task": "t", "input": "a", "output": "yes", "options": ["yes", "no"], "scores": [0, 1]}]
    with pytest.raises(
        ValueError, match=r"has the outputs \['yes'\], but its scores \[0\.0, 1\.0\] rank highest \['no'"
    ):
        read(rows)
    graded = [{"task": "t", "input": "a", "output": "yes", "options": ["yes", "so-so", "no"], "scores": [1, 0.5, 0]}]
    assert read(graded)["t"]["scores"] == [(1.0, 0.5, 0.0)]  # partial credit below the correct option's


@pytest.mark.parametrize(("cell", "scores"), [("1|0.5|0", (1.0, 0.5, 0.0)), ("[1, 0.5, 0]", (1.0, 0.5, 0.0))])
def test_scores_in_a_csv_cell(cell, scores):
    assert parse_scores(cell, ("a", "b", "c"), "row 0") == scores


def test_a_csv_cell_of_digits_is_not_one_score_per_character():
    with pytest.raises(ValueError, match=r"the scores '10' do not give one number per option .*in a CSV cell 1\|0"):
        parse_scores("10", ("yes", "no"), "row 0")


def test_the_same_input_under_another_template_is_another_example():
    rows = [
        {"task": "t", "input": "cat", "output": "chat", "template": "French: {input} ->"},
        {"task": "t", "input": "cat", "output": "Katze", "template": "German: {input} ->"},
        {"task": "t", "input": "cat", "output": "chat ", "template": "French: {input} ->"},  # another output: merged
    ]
    task = read(rows)["t"]
    assert task["templates"] == ["French: {input} ->", "German: {input} ->"]
    assert task["outputs"] == [["chat", "chat "], ["Katze"]]


def test_a_task_in_two_families_is_refused_naming_both():
    rows = [{"task": "t0", "family": "f0", "input": f"x{i}", "output": "y"} for i in range(3)]
    rows += [{"task": "t0", "family": "other", "input": "z", "output": "y"}]
    with pytest.raises(
        ValueError, match=r"task 't0' is in family 'f0' \(row 0\) and 'other' \(row 3\); a task has one"
    ):
        read(rows)


def test_a_task_folder_skips_files_that_are_not_tables(tmp_path):
    for name in ("one", "two"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    (tmp_path / "README.md").write_text("# my tasks\n")
    with pytest.warns(UserWarning, match=r"skipped 1 files that are not tables \(README\.md\)"):
        tasks = tasks_from_folder(tmp_path, TableColumns(), TEMPLATE)
    assert sorted(tasks) == ["one", "two"]


@pytest.mark.parametrize("value", [0, -1])
def test_max_examples_per_task_below_one_is_refused_for_tables_too(value):
    # A slice read -1 as "all but the last example" of a table's every task, and 0 failed deep inside.
    with pytest.raises(ValueError, match=rf"max_examples_per_task must be at least 1 or null .*got {value}\."):
        TextToTextTasksDataModule(dataset="t.jsonl", tokenizer="embedded-bpe-4096", max_examples_per_task=value)
