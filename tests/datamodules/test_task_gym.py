"""The offline task gym: enough tasks, well formed, deterministic, split by family, WordNet optional."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from lightning_meta.datamodules import task_gym
from lightning_meta.datamodules.task_gym import DEFAULT_SPLIT, GYM_FAMILIES, MIN_EXAMPLES, GymTask, gym_table, gym_tasks

HAS_WORDNET = all(Path(f"/usr/share/wordnet/data.{part}").is_file() for part in ("noun", "verb", "adj", "adv"))
RULE_FAMILIES = [name for name, family in GYM_FAMILIES.items() if family.kind == "rule induction"]


@pytest.fixture(scope="module")
def tasks() -> list[GymTask]:
    return gym_tasks(wordnet=None)


def fingerprint(tasks: list[GymTask]) -> str:
    rows = [[task.name, task.template, task.examples, task.options] for task in tasks]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


@pytest.mark.xdist_group("test_task_gym.tasks")
def test_enough_tasks_and_families_without_wordnet(tasks):
    families = {task.family for task in tasks}
    assert len(tasks) >= 30 and len(families) >= 6
    assert families == {name for name, family in GYM_FAMILIES.items() if not family.needs_wordnet}
    assert len({task.name for task in tasks}) == len(tasks)


@pytest.mark.xdist_group("test_task_gym.tasks")
def test_tasks_are_well_formed(tasks):
    for task in tasks:
        assert task.template.count("{input}") == 1 and task.name.startswith(task.family + "/")
        inputs = [text for text, _ in task.examples]
        assert len(set(inputs)) == len(inputs) >= MIN_EXAMPLES, task.name
        assert all(len(text) <= 200 and 0 < len(output) <= 80 for text, output in task.examples), task.name
        assert not any(output[0].isspace() for _, output in task.examples), task.name
        if task.options is not None:
            assert list(task.options) == sorted(set(task.options))
            assert {output for _, output in task.examples} == set(task.options), task.name


@pytest.mark.xdist_group("test_task_gym.tasks")
def test_natural_tasks_never_hold_their_output_in_the_input(tasks):
    for task in tasks:
        if task.family not in RULE_FAMILIES:
            for text, output in task.examples:
                assert not re.search(rf"(?i)(?<!\w){re.escape(output)}(?!\w)", text), (task.name, text, output)


def test_code_is_cut_at_a_line_and_limits_apply():
    for task in gym_tasks(["code_to_summary"], wordnet=None, max_input_chars=120, max_output_chars=50):
        for code, summary in task.examples:
            assert code.startswith(("def ", "async def ")) and len(code) <= 120 and len(summary) <= 50
            assert not code.endswith("\n") and "\n" in code


@pytest.mark.xdist_group("test_task_gym.tasks")
def test_builds_are_deterministic(tasks):
    task_gym._family_tasks.cache_clear()
    assert gym_tasks(wordnet=None) == tasks
    # Generated families depend on nothing but `random.Random(seed string)`: the same on every machine.
    assert fingerprint(gym_tasks(["word_map", "string_transform"], wordnet=None)) == "7c287f75a6176ef7"


@pytest.mark.xdist_group("test_task_gym.tasks")
def test_rule_tasks_need_their_support(tasks):
    """Two tasks of a rule family give different outputs for the same input."""
    for family in RULE_FAMILIES:
        first, second = [dict(task.examples) for task in tasks if task.family == family][:2]
        shared = first.keys() & second.keys()
        assert shared and any(first[text] != second[text] for text in shared), family


def test_default_split_holds_out_whole_families():
    splits = [set(names) for names in DEFAULT_SPLIT.values()]
    assert set(DEFAULT_SPLIT) == {"train", "val", "test"}
    assert sum(map(len, splits)) == len(set.union(*splits)) and set.union(*splits) == set(GYM_FAMILIES)
    for split in ("val", "test"):  # the same on machines without WordNet
        assert not any(GYM_FAMILIES[name].needs_wordnet for name in DEFAULT_SPLIT[split])
    test_kinds = {GYM_FAMILIES[name].kind == "rule induction" for name in DEFAULT_SPLIT["test"]}
    assert test_kinds == {True, False}


@pytest.mark.xdist_group("test_task_gym.tasks")
def test_default_split_skips_missing_wordnet(tasks):
    train = gym_tasks(DEFAULT_SPLIT["train"], wordnet=None)
    assert train and not any(GYM_FAMILIES[task.family].needs_wordnet for task in train)
    assert set(train) | set(gym_tasks(DEFAULT_SPLIT["val"] + DEFAULT_SPLIT["test"], wordnet=None)) == set(tasks)


def test_asking_for_wordnet_without_it_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        gym_tasks(["word_to_antonym"], wordnet=None)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        gym_tasks(["word_map", "gloss_to_word"], wordnet=tmp_path)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="known: code_to_summary, code_to_name"):
        gym_tasks(["code_to_sumary"], wordnet=None)
    with pytest.raises(TypeError, match=r"families=\['word_map'\]"):
        gym_tasks("word_map", wordnet=None)
    with pytest.raises(ValueError, match="max_examples_per_task=10"):
        gym_tasks(["word_map"], wordnet=None, max_examples_per_task=10)


def test_table_has_one_row_per_example():
    tasks = gym_tasks(["word_map", "topic_to_title"], wordnet=None)
    table = gym_table(["word_map", "topic_to_title"], wordnet=None)
    assert table.column_names == ["task", "family", "template", "input", "output", "options"]
    assert len(table) == sum(len(task.examples) for task in tasks)
    row = table["family"].index("topic_to_title")
    topic = next(task for task in tasks if task.family == "topic_to_title")
    assert table[0]["options"] is None and table[row]["options"] == list(topic.options)


@pytest.mark.skipif(not HAS_WORDNET, reason="WordNet is not installed (apt-get install wordnet-base)")
def test_wordnet_families_build():
    for name, family in GYM_FAMILIES.items():
        if family.needs_wordnet:
            built = gym_tasks([name])
            assert len(built) >= 5 and all(len(task.examples) >= MIN_EXAMPLES for task in built), name
    supersense = gym_tasks(["word_to_supersense"])[0]
    assert len(supersense.options) == 5 and all(option.startswith("noun.") for option in supersense.options)


@pytest.mark.skipif(
    not HAS_WORDNET or sys.version_info[:2] != (3, 11), reason="the table's counts are for Python 3.11 and WordNet"
)
def test_module_docstring_holds_the_current_table():
    assert task_gym.families_markdown() in task_gym.__doc__


def test_builds_are_cached_on_disk_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path))
    task_gym._family_tasks.cache_clear()
    built = gym_tasks(["word_map"], wordnet=None)
    (cached_file,) = (tmp_path / "task_gym").glob("word_map-*.json")
    task_gym._family_tasks.cache_clear()
    assert gym_tasks(["word_map"], wordnet=None) == built  # read back from the file
    cached_file.write_text("{not json")
    task_gym._family_tasks.cache_clear()
    assert gym_tasks(["word_map"], wordnet=None) == built
    assert json.loads(cached_file.read_text())[0]["name"] == built[0].name  # rewritten whole
    task_gym._family_tasks.cache_clear()


def test_held_out_tasks_share_no_input_with_training_tasks():
    """Validation and test measure transfer, not memory: no held-out input was a training input (WordNet where
    installed)."""
    tasks = gym_tasks()
    training_inputs = {text for task in tasks if task.family in DEFAULT_SPLIT["train"] for text, _ in task.examples}
    for task in tasks:
        if task.family not in DEFAULT_SPLIT["train"]:
            shared = [text for text, _ in task.examples if text in training_inputs]
            assert not shared, (task.name, len(shared), shared[:2])
    # Each docstring goes to one of the two docstring families, and both keep their tasks.
    counts = {
        family: sum(task.family == family for task in tasks) for family in ("docstring_to_module", "label_permutation")
    }
    assert counts == {"docstring_to_module": 9, "label_permutation": 12}
