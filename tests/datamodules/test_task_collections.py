"""Task collections: BIG-bench JSON tasks (folder and source archive), Natural-Instructions files, presets,
the cache, bad data, and the two BIG-bench configs. Every file here is written by the test, in the
format, with made-up text: nothing of BIG-bench itself is used (its canary asks for that)."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from lightning_meta.datamodules import TextToTextTasksDataModule, task_collections
from lightning_meta.datamodules.task_collections import read_task_collection

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
        "gen_task/task.json": task_json(["zero-shot", "arithmetic"], generative(10), task_prefix="Name the next.\n",
                                        example_input_prefix="In: ", example_output_prefix=" Out: "),
        "mc_task/task.json": task_json(["multiple choice", "common sense"], multiple_choice(10)),
        "list_task/task.json": task_json(["logical reasoning"], [
            {"input": f"say {w}", "target": [w, w.upper()]} for w in WORDS[:8]]),
        "parent/task.json": task_json(["translation", "common sense"], None),
        "parent/sub_a/task.json": task_json(["zero-shot"], generative(8)),
        "parent/sub_b/task.json": task_json(["zero-shot"], generative(8, offset=50), append_choices_to_input=False),
        "parent/sub_prog/task.py": "# a programmatic subtask\n",
        "parent/scripts/make_tasks.py": "# a helper, not a task\n",
        "prog_task/task.py": "# a programmatic task\n",
        "__init__.py": "",
    }  # fmt: skip
    for name, text in files.items():
        (tasks / name).parent.mkdir(parents=True, exist_ok=True)
        (tasks / name).write_text(text)
    lite = root / "bigbench" / "bbseqio" / "bigbench_lite.py"
    lite.parent.mkdir(parents=True)
    lite.write_text('"""Names."""\n\nBIGBENCH_LITE_TASK_NAMES = {\n  "v1": ["old"],\n  "v2": ["mc_task", "parent", '
                    '"absent_task"],\n}\n')  # fmt: skip
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
    # Generative: the task's own prefixes; the datamodule writes the space before the output.
    first = by_task["gen_task"][0]
    assert first | {"family": None} == {"task": "gen_task", "family": None, "input": "red 0", "output": ["blue"],
                                        "options": None, "template": "Name the next.\nIn: {input} Out:"}  # fmt: skip
    assert {row["family"] for row in by_task["gen_task"]} == {"arithmetic"}  # the first family keyword present
    # A list target: every target is correct, the first trains.
    assert by_task["list_task"][0]["output"] == ["red", "RED"]
    # Multiple choice: BIG-bench's default prefixes; options per example; correct = highest score.
    for index, (row, example) in enumerate(zip(by_task["mc_task"], multiple_choice(10), strict=True)):
        scores = example["target_scores"]
        assert row["template"] == "\nQ: {input}\nA:"
        assert row["options"] == list(scores)
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
    assert families == {"gen_task": "arithmetic", "mc_task": "common sense", "list_task": "other",
                        "parent:sub_a": "common sense", "parent:sub_b": "common sense"}  # fmt: skip


def test_the_archive_reads_like_the_folder_and_the_second_read_comes_from_the_cache(tmp_path, monkeypatch, logged):
    tree = write_bigbench(tmp_path / "src")
    archive = write_archive(tree, tmp_path / "bigbench-1.0.0.tar.gz")
    from_archive = read_task_collection(str(archive), max_examples_per_task=5, seed=3)
    assert "skipped 2 programmatic tasks (task.py, no task.json)" in "\n".join(logged)
    assert rows(from_archive) == rows(read_task_collection(str(tree), max_examples_per_task=5, seed=3))
    assert from_archive.presets == {"bigbench_lite": ["mc_task", "parent", "absent_task"]}

    def no_second_read(*args):
        raise AssertionError("read again")

    monkeypatch.setattr(task_collections._BigBenchReader, "read", no_second_read)
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
            "Contributors": ["made up"], "Categories": [category], "Domains": ["Fiction"],
            "Definition": [f"Answer task {number}.", "Be brief."],
            "Positive Examples": [{"input": "a cat", "output": "cat", "explanation": "x"},
                                  {"input": "a dog", "output": "dog", "explanation": "y"}],
            "Negative Examples": [],
            "Instances": [{"id": f"task{number:03}-{i}", "input": f"{WORDS[i]} {i}", "output": [WORDS[i], "any"]}
                          for i in range(9)],
        }  # fmt: skip
        (tasks / f"task{number:03}_made_up.json").write_text(json.dumps(data))
    return folder


def test_natural_instructions_definition_and_positive_examples_form_the_prompt(tmp_path):
    collection = read_task_collection(str(write_natural_instructions(tmp_path / "ni")), positive_examples=1)
    first = rows(collection)[0]
    assert first == {
        "task": "task001_made_up", "family": "Sentiment Analysis", "input": "red 0", "output": ["red", "any"],
        "options": None,
        "template": "Definition: Answer task 1. Be brief.\n\nPositive Example 1 -\nInput: a cat\nOutput: cat\n\n"
                    "Now complete the following example -\nInput: {input}\nOutput:",
    }  # fmt: skip
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
        ("no input", r"gen_task/task\.json: skipped 1 of its 10 examples: example 2 has no text 'input'\. To use "
                     r"it, give every example an \"input\" string", 5),
        ("no positive score", r"mc_task/task\.json: skipped 1 of its 10 examples: example 3 has a 'target_scores' "
                              r"with no positive score.*give the correct options the highest score", 5),
        ("subtask without task.json", r"parent/sub_c has no task\.json.*Add its task\.json, or move the folder", 5),
    ],
)  # fmt: skip
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
        ValueError, match=r"Cannot read .*bigbench-1\.0\.0\.tar\.gz as a \.tar\.gz archive.*pip download"
    ):
        read_task_collection(str(archive))


def datamodule(dataset: Path, **options) -> TextToTextTasksDataModule:
    options = {"tokenizer": "embedded-bpe-512", "dataset": str(dataset), "shots": 2, "queries": 2,
               "max_length": 48, "truncate_inputs": True} | options  # fmt: skip
    module = TextToTextTasksDataModule(**options)
    module.setup("fit")
    return module


def test_bigbench_lite_preset_holds_out_its_tasks_and_their_subtasks(tmp_path, logged):
    archive = write_archive(write_bigbench(tmp_path / "src"), tmp_path / "bigbench-1.0.0.tar.gz")
    module = datamodule(archive, test_tasks="bigbench_lite", val_tasks=["list_task"])
    assert module.split_tasks == {
        "train": ["gen_task"], "val": ["list_task"], "test": ["mc_task", "parent:sub_a", "parent:sub_b"],
    }  # fmt: skip
    assert "1 of its tasks are not in the data: ['absent_task']" in "\n".join(logged)
    episode = next(module.eval_batches("test")[0].episodes())
    assert episode.metadata["task"] in module.split_tasks["test"]


def test_unknown_preset_names_the_presets(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown preset 'bigbench_full' in test_tasks; presets of this data: "
                                         r"\['bigbench_lite'\]"):  # fmt: skip
        datamodule(write_bigbench(tmp_path / "src"), test_tasks="bigbench_full", val_tasks=["list_task"])


def test_natural_instructions_hold_out_by_family(tmp_path):
    module = datamodule(write_natural_instructions(tmp_path / "ni"), max_length=192, val_tasks=["task003_made_up"],
                        test_families=["Question Answering"])  # fmt: skip
    assert module.split_tasks == {"train": ["task001_made_up"], "val": ["task003_made_up"],
                                  "test": ["task002_made_up"]}  # fmt: skip


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
    quick = ["--trainer.max_steps=2", "--trainer.val_check_interval=1", "--trainer.enable_progress_bar=false",
             "--data.init_args.num_val_tasks=2", "--data.init_args.num_test_tasks=2"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        ["lightning-meta", "fit", "--config", str(ROOT / "configs" / config), f"--trainer.default_root_dir={tmp_path}",
         *quick, *TINY_MODEL],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held out by task (mc_task, parent:sub_a, parent:sub_b)" in result.stderr + result.stdout
    assert list(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
