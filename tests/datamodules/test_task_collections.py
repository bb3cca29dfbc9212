"""Task collections: BIG-bench JSON tasks (folder and source archive), Natural-Instructions files, presets,
the cache, bad data, and the two BIG-bench configs. Every file here is written by the test, in the
format, with made-up text: nothing of BIG-bench itself is used (its canary asks for that)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from lightning_meta.datamodules import TextToTextTasksDataModule, task_collections
from lightning_meta.datamodules.task_collections import BIGBENCH_LITE_TASKS, read_task_collection
from lightning_meta.datamodules.templates import template_parts

ROOT = Path(__file__).resolve().parents[2]
CANARY = "MADE-UP CANARY: this test data must not appear in training corpora. guid 0000"
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "cup", "box", "map", "key"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def logged(monkeypatch) -> list[str]:
    """The lines the readers log."""
    lines: list[str] = []
    monkeypatch.setattr(task_collections, "rank_zero_info", lines.append)
    return lines


def task_json(keywords: list[str], examples: list[dict] | None, **fields) -> str:
    data = {"canary": CANARY, "name": "made up", "description": "made up", "keywords": keywords, **fields}
    if examples is not None:
        data |= {"metrics": ["exact_str_match"], "preferred_score": "exact_str_match", "examples": examples}
    return json.dumps(data)


def generative(count: int, offset: int = 0) -> list[dict]:
    return [{"input": f"{WORDS[i % 12]} {i + offset}", "target": WORDS[(i + 1) % 12]} for i in range(count)]


def multiple_choice(count: int) -> list[dict]:
    """Options differ across examples; example 1 has two correct options."""
    examples = []
    for i in range(count):
        options = {WORDS[(i + k) % 12]: 0 for k in range(2 + i % 3)}
        options[WORDS[i % 12]] = 1
        if i == 1:
            options[WORDS[(i + 1) % 12]] = 1
        examples.append({"input": f"which is {WORDS[i % 12]}? {i}", "target_scores": options})
    return examples


def write_bigbench(root: Path) -> Path:
    """A source tree like ``bigbench-1.0.0/``: generative, multiple-choice and list-target tasks, a task with
    subtasks (and a helper folder), programmatic tasks, and BIG-bench Lite's list."""
    tasks = root / "bigbench" / "benchmark_tasks"
    files = {
        "gen_task/task.json": task_json(
            ["zero-shot", "arithmetic"],
            generative(10),
            task_prefix="Name the next.\n",
            example_input_prefix="In: ",
            example_output_prefix=" Out: ",
        ),
        "mc_task/task.json": task_json(["multiple choice", "common sense"], multiple_choice(10)),
        "list_task/task.json": task_json(
            ["logical reasoning"], [{"input": f"say {w}", "target": [w, w.upper()]} for w in WORDS[:8]]
        ),
        "parent/task.json": task_json(["translation", "common sense"], None),
        "parent/sub_a/task.json": task_json(["zero-shot"], generative(8)),
        "parent/sub_b/task.json": task_json(["zero-shot"], generative(8, offset=50), append_choices_to_input=False),
        "parent/sub_prog/task.py": "# a programmatic subtask\n",
        "parent/scripts/make_tasks.py": "# a helper, not a task\n",
        "prog_task/task.py": "# a programmatic task\n",
        "__init__.py": "",
    }
    for name, text in files.items():
        (tasks / name).parent.mkdir(parents=True, exist_ok=True)
        (tasks / name).write_text(text)
    lite = root / "bigbench" / "bbseqio" / "bigbench_lite.py"
    lite.parent.mkdir(parents=True)
    lite.write_text(
        '"""Names."""\n\nBIGBENCH_LITE_TASK_NAMES = {\n  "v1": ["old"],\n  "v2": ["mc_task", "parent", '
        '"absent_task"],\n}\n'
    )
    return root


def write_archive(tree: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="bigbench-1.0.0")
    return archive


def rows(collection) -> list[dict]:
    return list(collection.table)


def test_bigbench_rows_follow_bigbench_json_task_format(tmp_path):
    collection = read_task_collection(str(write_bigbench(tmp_path / "src")))
    by_task: dict[str, list[dict]] = {}
    for row in rows(collection):
        by_task.setdefault(row["task"], []).append(row)
    assert sorted(by_task) == ["gen_task", "list_task", "mc_task", "parent:sub_a", "parent:sub_b"]
    # Generative: the task's own prefixes, as given (the output follows the output prefix's space), and the task
    # fields it gives (BIG-bench's defaults for the others are the datamodule's).
    first = by_task["gen_task"][0]
    assert first | {"family": None} == {
        "task": "gen_task",
        "family": None,
        "input": "red 0",
        "output": ["blue"],
        "options": None,
        "template": "Name the next.\nIn: {input} Out: ",
        "scores": None,
        "task_prefix": "Name the next.\n",
        "few_shot_example_separator": None,
        "stop_string": None,
        "output_regex": None,
    }
    assert {row["family"] for row in by_task["gen_task"]} == {"arithmetic"}  # the first family keyword present
    # A list target: every target is correct, the first trains.
    assert by_task["list_task"][0]["output"] == ["red", "RED"]
    # Multiple choice: BIG-bench's default prefixes; options per example; correct = highest score.
    for index, (row, example) in enumerate(zip(by_task["mc_task"], multiple_choice(10), strict=True)):
        scores = example["target_scores"]
        assert row["template"] == "\nQ: {input}\nA: "
        assert row["options"] == list(scores) and row["scores"] == list(scores.values())
        assert row["output"] == [option for option, score in scores.items() if score == 1]
        question, *choices = row["input"].split("\n  choice: ")
        assert question == example["input"] and sorted(choices) == sorted(scores)
        assert row["family"] == "common sense"
        assert len(row["output"]) == (2 if index == 1 else 1)
    assert len({len(row["options"]) for row in by_task["mc_task"]}) == 3
    # Subtasks: NAME:SUBTASK, the family from the parent's keywords.
    assert {row["family"] for row in by_task["parent:sub_a"] + by_task["parent:sub_b"]} == {"translation"}
    assert collection.presets == {"bigbench_lite": ["mc_task", "parent", "absent_task"]}  # the last version
    assert not any(CANARY in str(value) for row in rows(collection) for value in row.values())


def test_family_keywords_are_configurable_first_listed_wins(tmp_path):
    source = str(write_bigbench(tmp_path / "src"))
    collection = read_task_collection(source, family_keywords=["common sense", "arithmetic"])
    families = {row["task"]: row["family"] for row in rows(collection)}
    assert families == {
        "gen_task": "arithmetic",
        "mc_task": "common sense",
        "list_task": "other",
        "parent:sub_a": "common sense",
        "parent:sub_b": "common sense",
    }


def test_the_archive_reads_like_the_folder_and_the_second_read_comes_from_the_cache(tmp_path, monkeypatch, logged):
    tree = write_bigbench(tmp_path / "src")
    archive = write_archive(tree, tmp_path / "bigbench-1.0.0.tar.gz")
    from_archive = read_task_collection(str(archive), max_examples_per_task=5, seed=3)
    assert "skipped 2 programmatic tasks (task.py, no task.json)" in "\n".join(logged)
    assert rows(from_archive) == rows(read_task_collection(str(tree), max_examples_per_task=5, seed=3))
    assert from_archive.presets == {"bigbench_lite": ["mc_task", "parent", "absent_task"]}

    def no_second_read(*args):
        raise AssertionError("read again")

    monkeypatch.setattr(task_collections.BigBenchReader, "read", no_second_read)
    assert rows(read_task_collection(str(archive), max_examples_per_task=5, seed=3)) == rows(from_archive)
    with pytest.raises(AssertionError, match="read again"):  # another cap is another read
        read_task_collection(str(archive), max_examples_per_task=4, seed=3)
    os.utime(archive, ns=(0, 0))  # a changed archive too
    with pytest.raises(AssertionError, match="read again"):
        read_task_collection(str(archive), max_examples_per_task=5, seed=3)


def test_the_cap_keeps_a_seeded_sample_in_order(tmp_path):
    source = str(write_bigbench(tmp_path / "src"))

    def inputs(seed: int) -> list[str]:
        return [row["input"] for row in rows(read_task_collection(source, 4, seed)) if row["task"] == "gen_task"]

    everything = [example["input"] for example in generative(10)]
    assert len(inputs(0)) == 4 and inputs(0) == inputs(0) != inputs(1)
    assert inputs(0) == sorted(inputs(0), key=everything.index)


def write_natural_instructions(folder: Path) -> Path:
    tasks = folder / "tasks"
    tasks.mkdir(parents=True)
    for number, category in [(1, "Sentiment Analysis"), (2, "Question Answering"), (3, "Sentiment Analysis")]:
        data = {
            "Contributors": ["made up"],
            "Categories": [category],
            "Domains": ["Fiction"],
            "Definition": [f"Answer task {number}.", "Be brief."],
            "Positive Examples": [
                {"input": "a cat", "output": "cat", "explanation": "x"},
                {"input": "a dog", "output": "dog", "explanation": "y"},
            ],
            "Negative Examples": [],
            "Instances": [
                {"id": f"task{number:03}-{i}", "input": f"{WORDS[i]} {i}", "output": [WORDS[i], "any"]}
                for i in range(9)
            ],
        }
        (tasks / f"task{number:03}_made_up.json").write_text(json.dumps(data))
    return folder


def test_natural_instructions_definition_and_positive_examples_form_the_prompt(tmp_path):
    collection = read_task_collection(str(write_natural_instructions(tmp_path / "ni")), positive_examples=1)
    first = rows(collection)[0]
    assert first == {
        "task": "task001_made_up",
        "family": "Sentiment Analysis",
        "input": "red 0",
        "output": ["red", "any"],
        "options": None,
        "scores": None,
        **dict.fromkeys(task_collections.TASK_FIELDS),
        "template": "Definition: Answer task 1. Be brief.\n\nPositive Example 1 -\nInput: a cat\nOutput: cat\n\n"
        "Now complete the following example -\nInput: {input}\nOutput:",
    }
    assert len(rows(collection)) == 27


def bad_bigbench(tree: Path, case: str) -> Path:
    tasks = tree / "bigbench" / "benchmark_tasks"
    if case == "invalid json":
        (tasks / "gen_task" / "task.json").write_text('{"examples": [')
    elif case == "no input":
        examples = generative(10)
        del examples[2]["input"]
        (tasks / "gen_task" / "task.json").write_text(task_json(["arithmetic"], examples))
    elif case == "no positive score":
        examples = multiple_choice(10)
        examples[3]["target_scores"] = dict.fromkeys(examples[3]["target_scores"], 0)
        (tasks / "mc_task" / "task.json").write_text(task_json(["common sense"], examples))
    elif case == "subtask without task.json":
        (tasks / "parent" / "sub_c").mkdir()
        (tasks / "parent" / "sub_c" / "README.md").write_text("made up")
    return tree


@pytest.mark.parametrize(
    "case, message, tasks",
    [
        ("invalid json", r"gen_task/task\.json: it is not valid JSON .*To use it, fix the file", 4),
        (
            "no input",
            r"gen_task/task\.json: skipped 1 of its 10 examples: example 2 has no text 'input'\. To use "
            r"it, give every example an \"input\" string",
            5,
        ),
        (
            "no positive score",
            r"mc_task/task\.json: skipped 1 of its 10 examples: example 3 has a 'target_scores' "
            r"with no option scored above the others.*give the correct options the highest score",
            5,
        ),
        ("subtask without task.json", r"parent/sub_c has no task\.json.*Add its task\.json, or move the folder", 5),
    ],
)
def test_bad_bigbench_data_is_named_with_the_fix_and_the_rest_loads(tmp_path, case, message, tasks, logged):
    tree = bad_bigbench(write_bigbench(tmp_path / "src"), case)
    with pytest.warns(UserWarning, match=message):
        collection = read_task_collection(str(tree))
    assert len(set(collection.table["task"])) == tasks
    assert "1 files with bad data" in "\n".join(logged)
    if case == "no positive score":
        assert len([task for task in collection.table["task"] if task == "mc_task"]) == 9
    with pytest.warns(UserWarning, match=message):  # from the cache as well: the data is still bad
        read_task_collection(str(tree))


def test_a_definition_that_is_not_text_skips_that_file_only(tmp_path):
    folder = write_natural_instructions(tmp_path / "ni")
    file = folder / "tasks" / "task002_made_up.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | {"Definition": {"text": "no"}}))
    with pytest.warns(UserWarning, match=r"task002_made_up\.json: its \"Definition\" is not text\. Make it a list"):
        collection = read_task_collection(str(folder))
    assert sorted(set(collection.table["task"])) == ["task001_made_up", "task003_made_up"]


def test_an_unreadable_archive_names_the_fix(tmp_path):
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    archive.write_bytes(b"not gzip at all")
    with pytest.raises(
        ValueError, match=r"Cannot read .*bigbench-1\.0\.0\.tar\.gz as a \.tar\.gz archive.*Download it again"
    ):
        read_task_collection(str(archive))


def datamodule(dataset: Path, **options) -> TextToTextTasksDataModule:
    options = {
        "tokenizer": "embedded-bpe-512",
        "dataset": str(dataset),
        "shots": 2,
        "queries": 2,
        "max_length": 48,
        "truncate_inputs": True,
    } | options
    module = TextToTextTasksDataModule(**options)
    module.setup("fit")
    return module


def test_bigbench_lite_preset_holds_out_its_tasks_and_their_subtasks(tmp_path, logged):
    archive = write_archive(write_bigbench(tmp_path / "src"), tmp_path / "bigbench-1.0.0.tar.gz")
    module = datamodule(archive, test_tasks="bigbench_lite", val_tasks=["list_task"])
    assert module.split_tasks == {
        "train": ["gen_task"],
        "val": ["list_task"],
        "test": ["mc_task", "parent:sub_a", "parent:sub_b"],
    }
    assert "1 of its tasks are not in the data: ['absent_task']" in "\n".join(logged)
    episode = next(module.eval_batches("test")[0].episodes())
    assert episode.metadata["task"] in module.split_tasks["test"]


def test_unknown_preset_names_the_presets(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"Unknown preset 'bigbench_full' in test_tasks; presets of this data: "
        r"\['bigbench_lite'\]",
    ):
        datamodule(write_bigbench(tmp_path / "src"), test_tasks="bigbench_full", val_tasks=["list_task"])


def test_natural_instructions_hold_out_by_family(tmp_path):
    module = datamodule(
        write_natural_instructions(tmp_path / "ni"),
        max_length=192,
        val_tasks=["task003_made_up"],
        test_families=["Question Answering"],
    )
    assert module.split_tasks == {"train": ["task001_made_up"], "val": ["task003_made_up"], "test": ["task002_made_up"]}


# The two BIG-bench configs, on the tiny archive, with a tiny GPT-2 in place of SmolLM2 (the data and
# the algorithm are the configs' own).
TINY_MODEL = [
    "--model.learner.init_args.pretrained=null",
    "--model.learner.init_args.gguf_file=null",
    "--model.learner.init_args.model_config={model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2, n_positions: 512}",
    "--model.learner.init_args.tokenizer=embedded-bpe-4096",
    "--data.init_args.tokenizer=embedded-bpe-4096",
    "--data.init_args.max_length=48",
    "--data.init_args.val_tasks=[list_task]",
]


@pytest.mark.parametrize("config", ["bigbench_metaicl_smollm2.yaml", "bigbench_fomaml_lora_smollm2.yaml"])
def test_bigbench_config_runs_on_a_tiny_archive(tmp_path, config):
    write_archive(write_bigbench(tmp_path / "src"), tmp_path / "bigbench-1.0.0.tar.gz")  # the config's path
    quick = [
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=1",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.num_val_tasks=2",
        "--data.init_args.num_test_tasks=2",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            "lightning-meta",
            "fit",
            "--config",
            str(ROOT / "configs" / config),
            f"--trainer.default_root_dir={tmp_path}",
            *quick,
            *TINY_MODEL,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held out by task (mc_task, parent:sub_a, parent:sub_b)" in result.stderr + result.stdout
    assert list(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))


# Issue 25: subtasks, near-duplicates, links, keywords, examples BIG-bench scores, braces, bad instances, archives.


def task_names(collection) -> list[str]:
    return sorted(set(collection.table["task"]))


def test_a_folder_named_like_a_subtask_is_skipped_not_merged_into_it(tmp_path):
    tree = write_bigbench(tmp_path / "src")
    clash = tree / "bigbench" / "benchmark_tasks" / "parent:sub_a" / "task.json"
    clash.parent.mkdir()
    clash.write_text(task_json(["arithmetic"], generative(6, offset=80)))
    with pytest.warns(UserWarning, match=r"parent:sub_a/task\.json: it is in a folder whose name holds ':'.*rename"):
        collection = read_task_collection(str(tree))
    sub_a = [row for row in rows(collection) if row["task"] == "parent:sub_a"]
    assert len(sub_a) == 8 and {row["family"] for row in sub_a} == {"translation"}  # the subtask's alone


def test_a_parent_with_examples_has_no_subtasks_and_holding_a_task_out_holds_out_its_subtasks(tmp_path):
    tree = write_bigbench(tmp_path / "src")
    parent = tree / "bigbench" / "benchmark_tasks" / "parent" / "task.json"
    parent.write_text(task_json(["translation"], generative(8, offset=20)))
    with pytest.warns(
        UserWarning,
        match=r"parent/task\.json has 'examples', so its subtask folders \['sub_a', "
        r"'sub_b'\] are left out, as BIG-bench leaves them",
    ):
        collection = read_task_collection(str(tree))
    assert task_names(collection) == ["gen_task", "list_task", "mc_task", "parent"]
    # A table that lists a task and its subtasks: naming the task holds out all of them (BIG-bench's NAME:*).
    table = tmp_path / "tasks.jsonl"
    table.write_text(
        "\n".join(
            json.dumps({"task": task, "input": f"{task} {i}", "output": WORDS[i % 12]})
            for task in ("p", "p:s", "q", "r")
            for i in range(6)
        )
    )
    module = datamodule(table, test_tasks=["p"], val_tasks=["q"])
    assert module.split_tasks == {"train": ["r"], "val": ["q"], "test": ["p", "p:s"]}


def misconception_tasks(tree: Path) -> Path:
    """A BIG-bench tree with a task and its made-up translation, as misconceptions and misconceptions_russian."""
    tasks = tree / "bigbench" / "benchmark_tasks"
    for name, word in (("misconceptions", "true"), ("misconceptions_russian", "pravda")):
        examples = [
            {"input": "", "target_scores": {f"{WORDS[i]} {i} is {word}": 1, f"{WORDS[i]} {i} is not": 0}}
            for i in range(8)
        ]
        (tasks / name).mkdir()
        (tasks / name / "task.json").write_text(task_json(["truthfulness"], examples, append_choices_to_input=False))
    return tree


def test_a_held_out_task_keeps_its_listed_near_duplicate_out_of_training(tmp_path, monkeypatch):
    from lightning_meta.datamodules import text_to_text

    logged: list[str] = []
    monkeypatch.setattr(text_to_text, "rank_zero_info", logged.append)
    tree = misconception_tasks(write_bigbench(tmp_path / "src"))
    module = datamodule(tree, test_tasks=["misconceptions_russian"], val_tasks=["list_task"])
    assert "misconceptions" not in module.split_tasks["train"]
    assert "left 1 tasks out of training, made from held-out ones: misconceptions (from misconceptions_russian)" in (
        "\n".join(logged)
    )
    assert "misconceptions" in task_collections.BIGBENCH_NEAR_DUPLICATES[0]


def test_training_inputs_that_a_held_out_task_has_are_counted_and_can_be_dropped(tmp_path, monkeypatch):
    from lightning_meta.datamodules import text_to_text

    logged: list[str] = []
    monkeypatch.setattr(text_to_text, "rank_zero_info", logged.append)
    table = tmp_path / "tasks.jsonl"
    held = [f"What is {WORDS[i]} number {i}?" for i in range(8)]
    copies = {
        "near": [text.upper().replace("?", " ?!") for text in held[:6]] + [f"other {i}" for i in range(4)],
        "few": held[:4] + ["few 1", "few 2"],
        "clean": [f"clean {i}" for i in range(8)],
    }
    lines = [{"task": "held", "input": text, "output": "x"} for text in held]
    lines += [{"task": task, "input": text, "output": "y"} for task, texts in copies.items() for text in texts]
    lines += [{"task": "val", "input": f"val {i}", "output": "z"} for i in range(6)]
    table.write_text("\n".join(map(json.dumps, lines)))
    with pytest.warns(
        UserWarning,
        match=r"10 examples of 2 training tasks \(near, few\) have the input of a "
        r"validation or test example .*Set drop_held_out_overlap=true",
    ):
        module = datamodule(table, test_tasks=["held"], val_tasks=["val"])
    assert module.split_tasks["train"] == ["clean", "few", "near"]
    module = datamodule(table, test_tasks=["held"], val_tasks=["val"], drop_held_out_overlap=True)
    assert module.split_tasks["train"] == ["clean", "near"]  # "few" keeps 2 examples, fewer than shots + queries
    assert module.tasks["near"].inputs == [f"other {i}" for i in range(4)] and len(module.tasks["near"]) == 4
    assert "left out of training 10 examples of 2 training tasks (near, few)" in "\n".join(logged)
    assert "1 tasks left with fewer than 4 examples: few" in "\n".join(logged)


def test_a_linked_task_file_reads_the_same_from_the_folder_and_the_archive(tmp_path):
    tree = write_bigbench(tmp_path / "src")
    shared = tree / "bigbench" / "shared" / "gen.json"
    shared.parent.mkdir()
    task_file = tree / "bigbench" / "benchmark_tasks" / "gen_task" / "task.json"
    task_file.rename(shared)
    task_file.symlink_to("../../shared/gen.json")  # the link comes after its target in the archive
    broken = tree / "bigbench" / "benchmark_tasks" / "list_task" / "task.json"
    broken.unlink()
    broken.symlink_to("../../shared/absent.json")
    archive = write_archive(tree, tmp_path / "bigbench-1.0.0.tar.gz")
    for source in (tree, archive):
        with pytest.warns(UserWarning, match=r"list_task/task\.json: it cannot be read .*replace the link by the file"):
            collection = read_task_collection(str(source))
        assert task_names(collection) == ["gen_task", "mc_task", "parent:sub_a", "parent:sub_b"]
        assert len([task for task in collection.table["task"] if task == "gen_task"]) == 10


@pytest.mark.parametrize("keywords, family", [("arithmetic", "arithmetic"), ("zero-shot, arithmetic", "arithmetic")])
def test_keywords_written_as_one_string_give_the_family(tmp_path, keywords, family):
    tree = write_bigbench(tmp_path / "src")
    (tree / "bigbench" / "benchmark_tasks" / "gen_task" / "task.json").write_text(task_json(keywords, generative(10)))
    families = {row["task"]: row["family"] for row in rows(read_task_collection(str(tree)))}
    assert families["gen_task"] == family


def test_keywords_that_are_not_a_list_are_named(tmp_path):
    tree = write_bigbench(tmp_path / "src")
    (tree / "bigbench" / "benchmark_tasks" / "gen_task" / "task.json").write_text(task_json(7, generative(10)))
    with pytest.warns(
        UserWarning,
        match=r"gen_task/task\.json: its 'keywords' \(7\) is not a list, so its family is "
        r"'other'\. To give it one, write \"keywords\": \[",
    ):
        collection = read_task_collection(str(tree))
    assert {row["family"] for row in rows(collection) if row["task"] == "gen_task"} == {"other"}


def test_negative_positive_examples_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"positive_examples must be 0 or more .*got -1"):
        read_task_collection(str(write_natural_instructions(tmp_path / "ni")), positive_examples=-1)


def test_examples_bigbench_scores_are_kept(tmp_path):
    """Empty inputs whose options are the question (misconceptions_russian), and scores whose highest is 0."""
    tree = misconception_tasks(write_bigbench(tmp_path / "src"))
    examples = [
        {"input": f"pick {WORDS[i]} {i}", "target_scores": {WORDS[i]: 0, WORDS[i + 1]: -1, WORDS[i + 2]: -1}}
        for i in range(8)
    ]
    (tree / "bigbench" / "benchmark_tasks" / "zero_best").mkdir()
    (tree / "bigbench" / "benchmark_tasks" / "zero_best" / "task.json").write_text(
        task_json(["common sense"], examples)
    )
    collection = read_task_collection(str(tree))
    by_task: dict[str, list[dict]] = {}
    for row in rows(collection):
        by_task.setdefault(row["task"], []).append(row)
    assert len(by_task["misconceptions_russian"]) == 8
    first = by_task["misconceptions_russian"][0]
    assert first["input"] == "" and first["options"] == ["red 0 is pravda", "red 0 is not"]
    assert first["output"] == ["red 0 is pravda"]
    assert [row["output"] for row in by_task["zero_best"]] == [[WORDS[i]] for i in range(8)]
    module = datamodule(tree, test_tasks=["misconceptions_russian"], val_tasks=["zero_best"])
    assert len(module.tasks["misconceptions_russian"]) == 8  # eight examples, though one (empty) input
    assert (module.tasks["misconceptions_russian"].answer == 0).all()


def test_braces_in_task_text_are_text(tmp_path):
    """A {word} (even {input}) in a BIG-bench prefix or a Natural-Instructions definition or example is text."""
    from lightning_meta.data.tokenization import load_tokenizer

    tree = write_bigbench(tmp_path / "src")
    (tree / "bigbench" / "benchmark_tasks" / "gen_task" / "task.json").write_text(
        task_json(["arithmetic"], generative(10), task_prefix="Fill {blank} and {input}.\n")
    )
    module = datamodule(tree, max_length=64, val_tasks=["list_task"], test_tasks=["mc_task"])
    task = module.tasks["gen_task"]
    prompt = load_tokenizer("embedded-bpe-512").decode(task.input_ids[0][task.attention_mask[0].bool()])
    assert prompt.startswith("Fill {blank} and {input}.\n\nQ: red 0\nA: blue")
    folder = write_natural_instructions(tmp_path / "ni")
    file = folder / "tasks" / "task001_made_up.json"
    data = json.loads(file.read_text())
    data["Definition"] = ["Replace {name} in the {input}."]
    data["Positive Examples"][0] |= {"input": "a {cat}", "output": "{cat}"}
    file.write_text(json.dumps(data))
    collection = read_task_collection(str(folder), positive_examples=1)
    from lightning_meta.datamodules.templates import template_parts

    prefix, suffix = template_parts(rows(collection)[0]["template"])
    assert prefix == (
        "Definition: Replace {name} in the {input}.\n\nPositive Example 1 -\nInput: a {cat}\n"
        "Output: {cat}\n\nNow complete the following example -\nInput: "
    )
    assert suffix == "\nOutput:"


def test_bad_natural_instructions_instances_are_dropped_and_counted(tmp_path, logged):
    folder = write_natural_instructions(tmp_path / "ni")
    file = folder / "tasks" / "task002_made_up.json"
    data = json.loads(file.read_text())
    data["Instances"][3]["output"] = [""]
    data["Instances"][4]["output"] = ["  ", "fine"]  # the blank output goes, the other stays
    del data["Instances"][5]["input"]
    file.write_text(json.dumps(data))
    module = datamodule(folder, max_length=192, val_tasks=["task003_made_up"], test_tasks=["task001_made_up"])
    assert len(module.tasks["task002_made_up"]) == 7
    assert "2 instances without a text input and output" in "\n".join(logged)


def test_a_repeated_natural_instructions_input_adds_its_outputs_as_in_a_task_table(tmp_path):
    folder = write_natural_instructions(tmp_path / "ni")
    file = folder / "tasks" / "task002_made_up.json"
    data = json.loads(file.read_text())
    repeated = dict(data["Instances"][0], output=["another answer"])
    data["Instances"].append(repeated)  # it was dropped without a word
    file.write_text(json.dumps(data))
    collection = read_task_collection(str(folder))
    first = [row for row in rows(collection) if row["task"] == "task002_made_up"][0]
    assert first["output"] == [*data["Instances"][0]["output"], "another answer"]
    assert sum(row["task"] == "task002_made_up" for row in rows(collection)) == len(data["Instances"]) - 1


def test_natural_instructions_are_recognised_with_the_definition_late_in_the_file(tmp_path):
    folder = write_natural_instructions(tmp_path / "ni")
    file = folder / "tasks" / "task001_made_up.json"
    data = json.loads(file.read_text())
    definition = data.pop("Definition")
    data["Instances"] += [{"id": f"x{i}", "input": f"long {i} " + "word " * 50, "output": ["w"]} for i in range(400)]
    file.write_text(json.dumps(data | {"Definition": definition}))  # past the first 64 KiB
    assert file.read_bytes().index(b'"Definition"') > 1 << 16
    assert task_names(read_task_collection(str(folder))) == ["task001_made_up", "task002_made_up", "task003_made_up"]


def test_a_truncated_archive_names_the_fix(tmp_path):
    archive = write_archive(write_bigbench(tmp_path / "src"), tmp_path / "bigbench-1.0.0.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(
        ValueError,
        match=r"Cannot read \S+bigbench-1\.0\.0\.tar\.gz as a \.tar\.gz archive \(.*a "
        r"download cut short\?\)\. Download it again",
    ):
        read_task_collection(str(archive))


def test_an_archive_without_benchmark_tasks_says_what_it_is(tmp_path):
    natural_instructions = write_natural_instructions(tmp_path / "ni")
    archive = tmp_path / "natural-instructions.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(natural_instructions, arcname="natural-instructions-2.8")
    with pytest.raises(
        ValueError,
        match=r"holds no benchmark_tasks/ folder, so it is not BIG-bench's source archive "
        r"\(it holds Natural-Instructions task files: extract it",
    ):
        read_task_collection(str(archive))
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        tar.add(write_tasks_readme(tmp_path / "x"), arcname="x/README.md")
    with pytest.raises(
        ValueError,
        match=r"holds no benchmark_tasks/ folder, so it is not BIG-bench's source archive\. "
        r"Give a BIG-bench source archive",
    ):
        read_task_collection(str(other))


def write_tasks_readme(path: Path) -> Path:
    path.write_text("made up")
    return path


def test_graded_target_scores_give_bigbench_partial_credit(tmp_path):
    """BIG-bench's multiple_choice_grade is target_scores[chosen]: the reader carries each option's score into the
    split (``credit``), and accuracy is the mean score of the option the model ranks first."""
    import torch

    from lightning_meta import CausalLMLearner
    from lightning_meta.data.tasks import CHOICE_FIELDS, CORRECT, CREDIT, Choices

    grades = {"right": 1, "nearly": 0.5, "wrong": 0, "far off": -0.25}
    graded = [{"input": f"how close is {WORDS[i % 12]} {i}?", "target_scores": grades} for i in range(8)]
    tasks = tmp_path / "benchmark_tasks"
    for name, examples in (("graded", graded), ("graded_too", graded), ("plain", multiple_choice(8))):
        (tasks / name).mkdir(parents=True)
        (tasks / name / "task.json").write_text(task_json(["multiple choice"], examples))
    collection = read_task_collection(str(tasks))
    row = next(row for row in rows(collection) if row["task"] == "graded")
    assert dict(zip(row["options"], row["scores"], strict=True)) == grades and row["output"] == ["right"]
    module = TextToTextTasksDataModule(
        tokenizer="embedded-bpe-512",
        dataset=str(tasks),
        shots=2,
        queries=6,
        max_length=96,
        val_tasks=["graded"],
        test_tasks=["graded_too"],
    )
    module.setup("fit")
    query = module.eval_batches("val")[0].episode(0).query
    assert query[CREDIT].shape == query[CORRECT].shape
    assert torch.equal(query[CREDIT] == 1, query[CORRECT])  # the correct option is the one scored highest
    torch.manual_seed(0)
    learner = CausalLMLearner(
        model_config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2},
        tokenizer="embedded-bpe-512",
        dtype="float64",
    ).eval()
    with torch.no_grad():
        scores, _ = learner.option_scores(*(query[name] for name in CHOICE_FIELDS))
        figures = learner.evaluation_metrics(query)
    options = module.examples["graded"]["options"]
    rows_asked = module.eval_batches("val")[0].episode(0).metadata["example_ids"][2:].tolist()
    expected = [grades[options[row][int(option)]] for row, option in zip(rows_asked, scores.argmax(1), strict=True)]
    assert Choices.read(query).multiple_choice.all()
    assert float(figures["accuracy"]) == pytest.approx(sum(expected) / len(expected))
    assert len(set(expected)) > 1 or expected[0] not in (0, 1)  # partial credit is exercised, not only 0 and 1


# Issue 30 item 7: the collections as their hub mirrors ship them (made-up rows in the mirrors' schemas).


def mirror_rows(examples: list[dict], task_prefix: str = "") -> list[dict]:
    """``examples`` (task.json's) as BIG-bench's mirrors write them: the whole zero-shot prompt in ``inputs`` (choices
    in their order, BIG-bench's default prefixes, stripped), the options and whole-number scores beside it."""
    rows = []
    for index, example in enumerate(examples):
        scores = example.get("target_scores", {})
        choices = "".join(f"\n  choice: {option}" for option in scores)
        prompt = f"{task_prefix}\nQ: {example['input']}{choices}\nA:".strip()
        target = example.get("target", [option for option, score in scores.items() if score == max(scores.values())])
        rows.append(
            {
                "idx": index,
                "inputs": prompt,
                "targets": target if isinstance(target, list) else [target],
                "multiple_choice_targets": list(scores),
                "multiple_choice_scores": list(scores.values()),
            }
        )
    return rows


def save_splits(folder: Path, rows: list[dict], layout: str) -> None:
    """One task's rows, split 80/20 into train and validation, in one of the mirrors' layouts."""
    from datasets import Dataset, DatasetDict

    cut = len(rows) * 4 // 5
    splits = {"train": Dataset.from_list(rows[:cut]), "validation": Dataset.from_list(rows[cut:])}
    if layout == "save_to_disk":  # load_dataset("tasksource/bigbench", NAME).save_to_disk(FOLDER / NAME)
        DatasetDict(splits).save_to_disk(str(folder))
    elif layout == "hub files":  # huggingface-cli download tasksource/bigbench: NAME/train-00000-of-00001.parquet
        folder.mkdir(parents=True)
        for split, table in splits.items():
            table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    elif layout == "split folders with default":  # google/bigbench's parquet: NAME/{default,train,validation}/
        for split, table in {"default": Dataset.from_list(rows), **splits}.items():
            (folder / split).mkdir(parents=True)
            table.to_parquet(str(folder / split / "0000.parquet"))


def write_bigbench_mirror(root: Path, layout: str = "hub files") -> Path:
    save_splits(root / "gen_task", mirror_rows(generative(10), task_prefix="Name the next."), layout)
    save_splits(root / "mc_task", mirror_rows(multiple_choice(10)), layout)
    save_splits(root / "parent" / "sub_a", mirror_rows(generative(8, offset=20)), layout)
    save_splits(root / "parent" / "sub_b", mirror_rows(generative(8, offset=50)), layout)
    root.mkdir(parents=True, exist_ok=True)
    (root / "list_task.jsonl").write_text(
        "\n".join(
            json.dumps(row) for row in mirror_rows([{"input": f"say {w}", "target": [w, w.upper()]} for w in WORDS[:8]])
        )
    )
    (root / "README.md").write_text("made up")
    (root / ".gitattributes").write_text("*.parquet filter=lfs")
    return root


@pytest.mark.parametrize("layout", ["hub files", "save_to_disk", "split folders with default"])
def test_bigbench_mirror_rows_match_the_json_tasks_and_rebuild_the_mirrors_prompts(tmp_path, layout):
    mirror = write_bigbench_mirror(tmp_path / "bigbench", layout)
    collection = read_task_collection(str(mirror))
    assert collection.kind == "bigbench" and collection.presets == {"bigbench_lite": list(BIGBENCH_LITE_TASKS)}
    by_task: dict[str, list[dict]] = {}
    for row in rows(collection):
        by_task.setdefault(row["task"], []).append(row)
    assert sorted(by_task) == ["gen_task", "list_task", "mc_task", "parent:sub_a", "parent:sub_b"]
    assert {row["family"] for row in rows(collection)} == {"other"}  # the mirrors carry no keywords
    # Every example once (google/bigbench's default split repeats train + validation), in the mirror's order.
    assert [row["input"] for row in by_task["gen_task"]] == [f"{WORDS[i % 12]} {i}" for i in range(10)]
    # The text every prompt starts and ends with is the template, so that a long input is cut between them;
    # the template around the input gives back the mirror's prompt exactly.
    assert by_task["gen_task"][0]["template"] == "Name the next.\nQ: {input}\nA:"
    assert by_task["gen_task"][0]["output"] == ["blue"]
    cases = [("mc_task", multiple_choice(10), ""), ("gen_task", generative(10), "Name the next.")]
    for task, examples, prefix in cases:
        for row, mirrored in zip(by_task[task], mirror_rows(examples, prefix), strict=True):
            before, after = template_parts(row["template"])
            assert before + row["input"] + after == mirrored["inputs"]
    for row, example in zip(by_task["mc_task"], multiple_choice(10), strict=True):
        scores = example["target_scores"]
        assert row["options"] == list(scores) and row["scores"] == [float(score) for score in scores.values()]
        assert row["output"] == [option for option, score in scores.items() if score == 1]
    assert by_task["list_task"][0]["output"] == ["red", "RED"]


def test_a_bigbench_mirror_trains_held_out_by_task_and_knows_bigbench_lite(tmp_path, logged):
    mirror = write_bigbench_mirror(tmp_path / "bigbench")
    save_splits(mirror / "emoji_movie", mirror_rows(generative(6, offset=80)), "save_to_disk")  # a Lite task's name
    module = datamodule(mirror, val_tasks=["list_task"], test_tasks="bigbench_lite")
    assert module.split_tasks["test"] == ["emoji_movie"]
    assert "bigbench_lite: 23 of its tasks are not in the data" in "\n".join(logged)
    module = datamodule(mirror, val_tasks=["list_task"], test_tasks=["parent"])
    assert module.split_tasks == {
        "train": ["emoji_movie", "gen_task", "mc_task"],
        "val": ["list_task"],
        "test": ["parent:sub_a", "parent:sub_b"],
    }
    batch = next(iter(module.train_dataloader()))
    assert batch.support["input_ids"].shape[0] == module.meta_batch_size


def test_bad_mirror_rows_and_tables_are_named_with_the_fix_and_the_rest_loads(tmp_path, logged):
    mirror = write_bigbench_mirror(tmp_path / "bigbench")
    bad = mirror_rows(multiple_choice(10))
    bad[3]["multiple_choice_scores"] = [1]
    (mirror / "mc_task" / "train-00000-of-00001.parquet").unlink()
    (mirror / "mc_task" / "validation-00000-of-00001.parquet").unlink()
    (mirror / "mc_task.jsonl").write_text("\n".join(map(json.dumps, bad)))
    (mirror / "notes.jsonl").write_text(json.dumps({"text": "not a task"}))
    (mirror / "parent" / "own.jsonl").write_text("\n".join(map(json.dumps, mirror_rows(generative(6)))))
    with pytest.warns(UserWarning) as warned:
        collection = read_task_collection(str(mirror))
    messages = "\n".join(str(warning.message) for warning in warned)
    assert re.search(
        r"mc_task: skipped 1 of its 10 examples: example 3 has 'multiple_choice_targets' and "
        r"'multiple_choice_scores' of different lengths\. To use it, give each option its score",
        messages,
    )
    assert re.search(r"notes\.jsonl: it lacks the column\(s\) \['inputs', .*To use it, give it", messages)
    assert re.search(r"parent holds tables of its own, so its folders \['sub_a', 'sub_b'\] are left out", messages)
    assert task_names(collection) == ["gen_task", "list_task", "mc_task", "parent"]
    assert len([task for task in collection.table["task"] if task == "mc_task"]) == 9


def test_one_saved_bigbench_task_is_refused_with_the_layout(tmp_path):
    save_splits(tmp_path / "emoji_task", mirror_rows(generative(10)), "save_to_disk")
    with pytest.raises(
        ValueError,
        match=r"emoji_task is one BIG-bench task as its mirrors ship it; give the folder "
        r"that holds one folder or file per task",
    ):
        read_task_collection(str(tmp_path / "emoji_task"))


def ni_mirror_rows() -> list[dict]:
    """Natural-Instructions' mirror: one row per instance and output; task 2's first input has two outputs."""
    found = []
    for number in (1, 2, 3):
        for i in range(6):
            outputs = [WORDS[i], "any"] if number == 2 and i == 0 else [WORDS[i]]
            found += [
                {
                    "task_name": f"task{number:03}_made_up",
                    "id": f"task{number:03}-{i}",
                    "definition": f"Answer task {number} {{briefly}}.",
                    "inputs": f"{WORDS[i]} {number}{i}",
                    "targets": output,
                }
                for output in outputs
            ]
    return found


@pytest.mark.parametrize("layout", ["jsonl files", "save_to_disk"])
def test_natural_instructions_mirror_gives_the_definition_prompt_and_every_output(tmp_path, layout):
    from datasets import Dataset, DatasetDict

    found = ni_mirror_rows()
    mirror = tmp_path / "natural-instructions"
    if layout == "jsonl files":  # huggingface-cli download Muennighoff/natural-instructions: train/, test/
        for split, tasks in {"train": ("task001_made_up", "task002_made_up"), "test": ("task003_made_up",)}.items():
            (mirror / split).mkdir(parents=True)
            for task in tasks:
                (mirror / split / f"{task}_{split}.jsonl").write_text(
                    "\n".join(json.dumps(row) for row in found if row["task_name"] == task)
                )
        (mirror / "get_ni.py").write_text("# made up\n")
    else:  # load_dataset("Muennighoff/natural-instructions").save_to_disk(FOLDER)
        DatasetDict({"train": Dataset.from_list(found[:12]), "test": Dataset.from_list(found[12:])}).save_to_disk(
            str(mirror)
        )
    collection = read_task_collection(str(mirror), positive_examples=2)
    assert collection.kind == "natural_instructions"
    assert task_names(collection) == ["task001_made_up", "task002_made_up", "task003_made_up"]
    first = [row for row in rows(collection) if row["task"] == "task002_made_up"][0]
    assert {column: first[column] for column in task_collections.COLUMNS[:7]} == {
        "task": "task002_made_up",
        "family": "other",
        "input": "red 20",
        "output": ["red", "any"],
        "options": None,
        "scores": None,
        "template": "Definition: Answer task 2 {{briefly}}.\n\nNow complete the following example -\n"
        "Input: {input}\nOutput:",
    }
    assert len(rows(collection)) == 18
    module = datamodule(mirror, max_length=96, val_tasks=["task002_made_up"], test_tasks=["task003_made_up"])
    assert module.split_tasks["train"] == ["task001_made_up"]


def test_a_bigbench_tasks_stop_string_and_output_regex_reach_its_evaluation_episodes(tmp_path):
    """BIG-bench's ``stop_string`` and ``output_regex`` (task.json fields) travel with the task's rows into its
    evaluation episodes' metadata, where evaluation cuts generated outputs with them."""
    from lightning_meta.data.tasks import GenerationRule, generation_rule

    tasks = tmp_path / "bigbench"
    for name, fields in {"cut": {"stop_string": "\n", "output_regex": "[a-z]+"}, "plain": {}, "other": {}}.items():
        (tasks / name).mkdir(parents=True)
        (tasks / name / "task.json").write_text(task_json(["arithmetic"], generative(8), **fields))
    module = datamodule(tasks, val_tasks=["cut"], test_tasks=["plain"])
    episode = next(module.eval_batches("val")[0].episodes())
    assert generation_rule(episode.metadata) == GenerationRule("\n", "[a-z]+")
    assert generation_rule(next(module.eval_batches("test")[0].episodes()).metadata) is None
