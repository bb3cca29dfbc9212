"""Text-to-text tasks: episode layout, loss masks, options, splits by family, and errors on bad data."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from lightning_meta.data.tasks import (
    ANSWER,
    CHOICE_FIELDS,
    CHOICE_INPUT_IDS,
    CHOICE_LABELS,
    CORRECT,
    IGNORE_INDEX,
    MULTIPLE_CHOICE,
    Choices,
)
from lightning_meta.data.tokenization import load_tokenizer
from lightning_meta.datamodules import TextToTextTasksDataModule, templates, text_encoding, text_to_text

TOKENIZER = "embedded-bpe-512"
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


def write_tasks(folder: Path, tasks: int = 6, examples: int = 12, **changes) -> Path:
    """A jsonl table: ``tasks`` tasks in 3 families; even tasks are yes/no classification with options."""
    rows = []
    for task in range(tasks):
        for example in range(examples):
            words = [WORDS[(task + example * k) % len(WORDS)] for k in (1, 2, 3)]
            text = " ".join(words) + f" {example}"
            classify = task % 2 == 0
            rows.append(
                {
                    "task": f"t{task}",
                    "family": f"f{task % 3}",
                    "input": text,
                    "output": ("yes" if example % 2 else "no") if classify else words[0],
                    "options": ["no", "yes"] if classify else None,
                }
            )
    for row, change in changes.items():
        rows[int(row.removeprefix("row"))].update(change)
    path = folder / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def datamodule(path: Path, **options) -> TextToTextTasksDataModule:
    options = {"tokenizer": TOKENIZER, "dataset": str(path), "shots": 3, "queries": 2, "max_length": 40} | options
    module = TextToTextTasksDataModule(**options)
    module.setup("fit")
    return module


def test_episodes_hold_distinct_examples_with_the_loss_on_the_output_only(tmp_path):
    module = datamodule(write_tasks(tmp_path), val_families=["f1"], test_families=["f2"])
    tokenizer = load_tokenizer(TOKENIZER)
    table = module.examples
    batch = module.train_batch(0)
    for episode in batch.episodes():
        ids = episode.metadata["example_ids"]
        assert len(set(ids.tolist())) == 5  # support and query are different examples
        task = table[episode.metadata["task"]]
        for split, rows in ((episode.support, ids[:3]), (episode.query, ids[3:])):
            for position, row in enumerate(rows.tolist()):
                labels, tokens, mask = (
                    split["labels"][position],
                    split["input_ids"][position],
                    split["attention_mask"][position],
                )
                prompt = task["templates"][row].replace("{input}", task["inputs"][row])
                expected_output = tokenizer(" " + task["outputs"][row][0], add_special_tokens=False)["input_ids"]
                labelled = labels != IGNORE_INDEX
                # The labels are exactly the output's tokens and the end token, right after the prompt.
                assert labels[labelled].tolist() == expected_output + [tokenizer.eos_token_id]
                assert tokenizer.decode(tokens[: int(mask.sum())][~labelled[: int(mask.sum())]]) == prompt
                assert (labels[mask == 0] == IGNORE_INDEX).all()
        support_inputs = {tuple(row.tolist()) for row in episode.support["input_ids"]}
        assert not any(tuple(row.tolist()) in support_inputs for row in episode.query["input_ids"])


def test_options_are_written_after_the_prompt_and_the_answer_points_at_the_output(tmp_path):
    module = datamodule(write_tasks(tmp_path), val_families=["f1"], test_families=["f2"])
    tokenizer = load_tokenizer(TOKENIZER)
    batch = module.eval_batches("val")[0]
    for episode in batch.episodes():
        task = module.examples[episode.metadata["task"]]
        query = episode.query
        choices = Choices.read(query)
        for position, row in enumerate(episode.metadata["example_ids"][3:].tolist()):
            options = task["options"][row]
            if options is None:
                assert not choices.multiple_choice[position] and (query[CHOICE_LABELS][position] == IGNORE_INDEX).all()
                continue
            assert choices.multiple_choice[position]
            correct = torch.nonzero(choices.correct[position]).flatten().tolist()
            assert [options[option] for option in correct] == [o for o in options if o in task["outputs"][row]]
            assert task["outputs"][row][0] in [options[option] for option in correct]
            for option, (ids, labels) in enumerate(
                zip(query[CHOICE_INPUT_IDS][position], query[CHOICE_LABELS][position], strict=True)
            ):
                labelled = labels[labels != IGNORE_INDEX].tolist()
                # The option's own tokens are labelled, without the end token (BIG-bench's and lm-eval's scoring).
                assert tokenizer.decode(labelled) == " " + options[option]
                assert labelled == tokenizer(" " + options[option], add_special_tokens=False)["input_ids"]
                prompt_length = int((query["labels"][position] == IGNORE_INDEX).nonzero()[0])  # prompt tokens first
                assert torch.equal(ids[:prompt_length], query["input_ids"][position][:prompt_length])


def test_held_out_families_never_reach_training(tmp_path):
    module = datamodule(write_tasks(tmp_path, tasks=9), val_families=["f1"], test_families=["f2"], meta_batch_size=8)
    assert module.split_tasks == {"train": ["t0", "t3", "t6"], "val": ["t1", "t4", "t7"], "test": ["t2", "t5", "t8"]}
    trained = {family for index in range(20) for family in module.train_batch(index).metadata["family"]}
    assert trained == {"f0"}
    assert {f for batch in module.eval_batches("test") for f in batch.metadata["family"]} == {"f2"}
    # By task: the held-out task's family mates still train; by default (no lists) whole families are held out.
    by_task = datamodule(write_tasks(tmp_path, tasks=9), val_tasks=["t1"], test_tasks=["t2"])
    assert by_task.split_tasks["train"] == ["t0", "t3", "t4", "t5", "t6", "t7", "t8"]
    default = datamodule(write_tasks(tmp_path, tasks=9))
    families = {split: {int(name[1:]) % 3 for name in names} for split, names in default.split_tasks.items()}
    assert all(len(held) == 1 for held in (families["val"], families["test"]))
    assert not families["train"] & (families["val"] | families["test"])


def test_evaluation_episodes_are_fixed_and_training_resumes_by_index(tmp_path):
    path = write_tasks(tmp_path)
    one, two = (datamodule(path, val_families=["f1"], test_families=["f2"]) for _ in range(2))
    assert all(
        torch.equal(a.query["input_ids"], b.query["input_ids"])
        for a, b in zip(one.eval_batches("test"), two.eval_batches("test"), strict=True)
    )
    assert torch.equal(one.train_batch(7).support["input_ids"], two.train_batch(7).support["input_ids"])
    assert not torch.equal(
        one.train_batch(7, rank=0).support["input_ids"], one.train_batch(7, rank=1).support["input_ids"]
    )


def test_a_folder_of_one_table_per_task(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    for task in ("alpha", "beta", "gamma", "delta"):
        rows = [{"input": f"{task} {i} {WORDS[i % 8]}", "output": WORDS[(i + 1) % 8]} for i in range(8)]
        (folder / f"{task}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    module = datamodule(folder, val_tasks=["beta"], test_tasks=["gamma"], template="Q: {input}\nA:")
    assert module.split_tasks == {"train": ["alpha", "delta"], "val": ["beta"], "test": ["gamma"]}
    assert CHOICE_INPUT_IDS not in module.train_batch(0).query  # no task lists options


@pytest.mark.parametrize(
    ("options", "changes", "message"),
    [
        ({"input_column": "question"}, {}, r"has no column \['question'\].*input_column"),
        (
            {"shots": 10, "queries": 5},
            {},
            r"fewer than shots \+ queries = 15 distinct examples.*Lower shots or queries",
        ),
        ({"template": "no input field"}, {}, r"must contain \{input\} exactly once"),
        ({}, {"row3": {"template": "Q: {input} {input}"}}, r"row 3\) must contain \{input\} exactly once"),
        (
            {"max_length": 8},
            {},
            r"Example \d+ of task 't\d' is \d+ tokens long.*Raise max_length.*truncate_inputs=true",
        ),
        (
            {},
            {"row0": {"output": "maybe"}},
            r"Task 't0', example 0 \('red red red 0'\) lists options \['no', 'yes'\], but its outputs \['maybe'\]",
        ),
        ({}, {"row5": {"output": None}}, r"Missing values .*'output'.*row"),
        (
            {"val_families": ["nope"]},
            {},
            r"Unknown families \['nope'\] in val_families; families: \['f0', 'f1', 'f2'\]",
        ),
    ],
)
def test_bad_data_gets_an_error_that_names_the_fix(tmp_path, options, changes, message):
    with pytest.raises(ValueError, match=message):
        datamodule(write_tasks(tmp_path, **changes), **options)


def test_truncate_inputs_cuts_the_input_never_the_output(tmp_path):
    long_input = {"row1": {"input": " ".join(WORDS * 6)}}
    with pytest.raises(ValueError, match="Example 1 of task 't0'"):
        datamodule(write_tasks(tmp_path, **long_input))
    module = datamodule(write_tasks(tmp_path, **long_input), truncate_inputs=True)
    task = module.tasks["t0"]
    tokenizer = load_tokenizer(TOKENIZER)
    labels = task.labels[1]
    assert labels[labels != IGNORE_INDEX].tolist() == tokenizer(" yes", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    prompt = tokenizer.decode(task.input_ids[1][labels == IGNORE_INDEX][: int(task.attention_mask[1].sum()) - 2])
    assert prompt.startswith("Input: red blue") and prompt.endswith("\nOutput:")


def test_the_gym_is_the_default_and_its_held_out_families_stay_out_of_training():
    families = ["word_map", "label_permutation", "string_transform"]
    module = TextToTextTasksDataModule(tokenizer=TOKENIZER, gym_families=families, max_length=64, truncate_inputs=True)
    module.setup("fit")
    split_families = {
        split: {module.tasks[name].family for name in names} for split, names in module.split_tasks.items()
    }
    assert split_families == {"train": {"word_map"}, "val": {"label_permutation"}, "test": {"string_transform"}}
    batch = module.train_batch(0)
    assert set(batch.metadata["family"]) == {"word_map"}
    # label_permutation lists options: every episode carries them, padded for tasks without.
    assert Choices.read(module.eval_batches("val")[0].query).multiple_choice.all()
    assert not Choices.read(module.eval_batches("test")[0].query).multiple_choice.any()


def test_a_task_file_in_two_formats_is_refused_naming_both(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "task0.csv").write_text("input,output\na,b\n")
    (folder / "task0.jsonl").write_text('{"input": "a", "output": "b"}\n')
    with pytest.raises(ValueError, match=r"task0\.csv and \S+task0\.jsonl would both be the task 'task0'\. Rename one"):
        datamodule(folder)


@pytest.mark.parametrize("template", ["Q: {input}\nA: {output}", "{instruction} {input}"])
def test_a_template_with_another_placeholder_is_refused(tmp_path, template):
    with pytest.raises(ValueError, match=r"has the placeholder\(s\) \{\w+\}: only \{input\} is filled in"):
        datamodule(write_tasks(tmp_path), template=template)
    with pytest.raises(ValueError, match=r"row 2\) has the placeholder"):
        datamodule(write_tasks(tmp_path, row2={"template": template}))
    datamodule(write_tasks(tmp_path), template='JSON {"text": "{input}"}\nAnswer:')  # other braces are text


def test_doubled_braces_in_a_template_are_text():
    """As in str.format: the task collections write a task's own {word} so, and it must never abort."""
    parts = templates.template_parts("Fill {{blank}} of {{input}}: {input}\nA:")
    assert parts == ("Fill {blank} of {input}: ", "\nA:")
    assert templates.template_parts('{"a": {{{input}}}}') == ('{"a": {', "}}")
    assert templates.check_template(templates.literal_template_text("{x} {input}") + "{input}")
    with pytest.raises(ValueError, match=r"must contain \{input\} exactly once.*write \{\{input\}\} for the text"):
        templates.check_template("{{input}}")


def test_the_log_says_which_split_was_made_and_why(tmp_path, monkeypatch):
    """With fewer than 3 families the default split is by task, and the log says so instead of naming families."""
    logged: list[str] = []
    monkeypatch.setattr(text_to_text, "rank_zero_info", logged.append)
    path = write_tasks(tmp_path, tasks=12)
    rows = [
        json.loads(line) | {"family": f"fam{int(json.loads(line)['task'][1:]) % 2}"}
        for line in path.read_text().splitlines()
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    module = datamodule(path)
    message = logged[-1]
    assert "held out by task" in message and "(families " not in message and "trains too" in message
    assert "Held out by task, not by family, for val and test: the data has 2 families" in message
    assert len(module.split_tasks["val"]) == 1
    datamodule(write_tasks(tmp_path, tasks=9), val_families=["f1"], test_families=["f2"])
    message = logged[-1]
    assert "validation 3 tasks held out by family (families f1); test 3 tasks held out by family (families f2)." in (
        message
    )
    assert "Held out by task" not in message


@pytest.mark.parametrize("seed", range(6))
def test_named_test_tasks_win_over_a_validation_family_that_holds_them(tmp_path, monkeypatch, seed):
    """BIG-bench's config: ``test_tasks`` by name (the Lite preset), validation a default draw of families. Tasks
    the test split names are left out of whichever family validation draws, never an error (it was one: the
    Lite tasks share keywords with the rest), and the log says how many the family split ceded."""
    logged: list[str] = []
    monkeypatch.setattr(text_to_text, "rank_zero_info", logged.append)
    path = write_tasks(tmp_path, tasks=30)  # families f0, f1, f2: ten tasks each
    named = ["t0", "t1", "t2"]  # one task of every family: any family validation draws holds one of them
    module = datamodule(path, test_tasks=named, seed=seed)
    split = module.split_tasks
    assert split["test"] == named
    assert split["val"] and not set(split["val"]) & set(named)
    families = {module.tasks[name].family for name in split["val"]}
    assert len(families) == 1  # 10% of 3 families: one, held out whole apart from the named test task
    assert len(split["val"]) == 9
    assert not {module.tasks[name].family for name in split["train"]} & families
    assert set(split["train"]) | set(split["val"]) | set(split["test"]) == set(module.tasks)
    assert "1 more of their tasks are named by test_tasks" in logged[-1]
    # Named on both sides, an overlap is still the user's to fix.
    with pytest.raises(ValueError, match=r"Tasks \['t1'\] are in both the validation and the test split"):
        datamodule(path, test_tasks=named, val_tasks=["t1", "t4"])


def write_rows(folder: Path, rows: list[dict]) -> Path:
    """``rows`` plus 8 filler rows of the same task, as a jsonl table of one task ``t``."""
    filler = [{"task": "t", "input": f"filler {i}", "output": "yes", "options": ["no", "yes"]} for i in range(8)]
    path = folder / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"task": "t"} | row) for row in rows + filler))
    return path


def test_a_list_of_outputs_trains_on_the_first_and_exact_match_accepts_any(tmp_path):
    from lightning_meta.data.tasks import CORRECT
    from lightning_meta.learners.language_models import CausalLMLearner

    path = write_rows(tmp_path, [{"input": "colour of the sky", "output": ["blue", "azure"], "options": None}])
    module = TextToTextTasksDataModule(tokenizer=TOKENIZER, dataset=str(path), max_length=40)
    assert module.examples["t"]["outputs"][0] == ["blue", "azure"]
    task = module.tasks["t"]
    tokenizer = load_tokenizer(TOKENIZER)
    labels = task.labels[0]
    assert tokenizer.decode(labels[labels != IGNORE_INDEX][:-1]) == " blue"  # the first output trains
    assert task.correct[0].tolist() == [True, True] and int(task.answer[0]) == -1
    assert tokenizer.decode(task.choice_labels[0, 1][task.choice_labels[0, 1] != IGNORE_INDEX][:-1]) == " azure"
    # A model whose greedy decoding writes "azure": an exact match, though the training target is "blue".
    learner = CausalLMLearner(
        model_config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2}, tokenizer=TOKENIZER
    )
    azure = task.choice_input_ids[0, 1]
    vocabulary = learner.transformer.config.vocab_size

    def writes_azure(split, params=None):
        following = torch.cat([azure[1:], azure[-1:]])
        return torch.nn.functional.one_hot(following, vocabulary).float().expand(len(split["input_ids"]), -1, -1)

    learner.predict = writes_azure  # the training sequence: greedy writes "azure" where "blue" is labelled
    # Its options, scored with the prompt cached: "azure" is the likelier row, and greedy decoding writes it.
    learner.option_scores = lambda *split, params=None, parallel=False, prefix=None: (
        torch.tensor([[-2.0, -1.0]]),
        torch.tensor([[False, True]]),
    )
    split = {name: getattr(task, name)[:1] for name in ("input_ids", "attention_mask", "labels")}
    split |= {
        CHOICE_INPUT_IDS: task.choice_input_ids[:1],
        "choice_attention_mask": task.choice_attention_mask[:1],
        CHOICE_LABELS: task.choice_labels[:1],
        ANSWER: task.answer[:1],
        CORRECT: task.correct[:1],
    }
    figures = learner.evaluation_metrics(split)
    assert float(figures["exact_match"]) == 1.0 and float(figures["accuracy"]) == 1.0
    split[CORRECT] = torch.tensor([[True, False]])  # only "blue" correct: greedy "azure" is wrong
    assert float(learner.evaluation_metrics(split)["exact_match"]) == 0.0


def test_options_are_taken_per_row(tmp_path):
    """Rows of one task may list different options: each example is scored against its own (the chance level
    per example), padded rows carry no labels, and an output need only be among its own row's options."""
    rows = [
        {"input": "two options", "output": "b", "options": ["a", "b"]},
        {"input": "three options", "output": "z", "options": ["x", "y", "z"]},
    ]
    module = TextToTextTasksDataModule(tokenizer=TOKENIZER, dataset=str(write_rows(tmp_path, rows)), max_length=40)
    assert module.examples["t"]["options"][:3] == [("a", "b"), ("x", "y", "z"), ("no", "yes")]
    task = module.tasks["t"]
    assert task.answer[:3].tolist() == [1, 2, 1]
    has_labels = (task.choice_labels != IGNORE_INDEX).any(-1)
    assert has_labels[:3].tolist() == [[True, True, False], [True, True, True], [True, True, False]]
    assert task.correct[:2].tolist() == [[False, True, False], [False, False, True]]


def test_repeated_inputs_with_other_outputs_are_kept_as_several_correct_outputs_and_counted(tmp_path, monkeypatch):
    from lightning_meta.datamodules import text_tables

    logged: list[str] = []
    monkeypatch.setattr(text_tables, "rank_zero_info", logged.append)
    rows = [
        {"input": "q", "output": "yes", "options": ["no", "yes"]},
        {"input": "q", "output": "no", "options": ["no", "yes"]},
        {"input": "q", "output": "no", "options": ["no", "yes"]},
    ]
    module = TextToTextTasksDataModule(tokenizer=TOKENIZER, dataset=str(write_rows(tmp_path, rows)), max_length=40)
    assert module.examples["t"]["inputs"].count("q") == 1
    assert module.examples["t"]["outputs"][0] == ["yes", "no"]
    assert any(
        "Task 't': 1 rows repeat an earlier input (with the same template and options) with" in line
        and "1 more rows repeat" in line
        for line in logged
    )
    task = module.tasks["t"]
    assert int(task.answer[0]) == 1 and task.correct[0].tolist() == [True, True]


def test_skip_long_examples_leaves_out_what_does_not_fit_and_logs_it(tmp_path, monkeypatch):
    logged = []
    for module in (text_encoding, text_to_text):  # examples left out as encoded; tasks left out as split
        monkeypatch.setattr(module, "rank_zero_info", logged.append)
    # A fixed prompt longer than max_length cannot be cut to fit: an error, or with the option left out.
    long = {"template": "Read this long instruction first. " * 4 + "{input}"}
    # Examples 0 and 1 of task t1 (rows 12, 13) and every example of t2 (rows 24-35) get the long prompt.
    path = write_tasks(tmp_path, **{f"row{row}": long for row in (12, 13, *range(24, 36))})
    with pytest.raises(ValueError, match="Example 0 of task 't1'"):
        datamodule(path, truncate_inputs=True)
    module = datamodule(path, truncate_inputs=True, skip_long_examples=True)
    assert "t2" not in module.tasks  # every example of t2 is too long
    assert len(module.tasks["t1"]) == 10 and len(module.tasks["t0"]) == 12
    labels = module.tasks["t1"].labels[0]
    assert load_tokenizer(TOKENIZER).decode(labels[labels != IGNORE_INDEX][:-1]) == " cat"  # example 2's output
    assert "left out 14 examples longer than max_length=40, by task: {'t1': 2, 't2': 12}" in "\n".join(logged)
    # A task left with fewer examples than an episode needs is left out too.
    module = datamodule(path, truncate_inputs=True, skip_long_examples=True, shots=8, queries=3)
    assert "t1" not in module.tasks and "t0" in module.tasks
    assert "left out 1 of 5 tasks with fewer than shots + queries = 11 examples that fit max_length=40: t1 (10)." in (
        "\n".join(logged)
    )


def test_tasks_keep_their_own_option_count_and_episodes_are_padded_to_their_split(tmp_path):
    # One example of t4 (family f1, validation) lists 12 options; the other classification tasks list 2.
    many = {"row48": {"options": ["no", "yes", *(f"option {k}" for k in range(10))]}}
    module = datamodule(write_tasks(tmp_path, **many), val_families=["f1"], test_families=["f2"])
    assert module.tasks["t4"].choice_input_ids.shape[1] == 12
    assert module.tasks["t2"].choice_input_ids.shape[1] == 2  # stored without t4's padding
    assert module.tasks["t1"].answer is None  # a task without options stores no choice rows
    for batch in module.eval_batches("val"):
        assert batch.query[CHOICE_INPUT_IDS].shape[-2] == 12
    for batch in module.eval_batches("test"):  # t2 (f2) lists 2 options; t5 none
        assert batch.query[CHOICE_INPUT_IDS].shape[-2] == 2


def test_training_batches_carry_no_options_and_evaluation_batches_keep_them(tmp_path):
    """Training never reads options: a BIG-bench batch would carry and data-check ~100 rows per example each step."""
    module = datamodule(write_tasks(tmp_path), val_families=["f1"], test_families=["f2"], meta_batch_size=4)
    option_fields = {*CHOICE_FIELDS, MULTIPLE_CHOICE, CORRECT}
    batches = [module.train_batch(index) for index in range(4)]
    assert "t0" in {task for batch in batches for task in batch.metadata["task"]}  # a training task with options
    for batch in batches:
        for split in (batch.support, batch.query):
            assert set(split) == {"input_ids", "attention_mask", "labels"}
    for name in ("val", "test"):
        for batch in module.eval_batches(name):
            assert option_fields <= set(batch.query), name


def test_a_scores_column_grades_each_option_and_a_wrong_count_is_refused(tmp_path):
    from lightning_meta.data.tasks import CREDIT

    rows = [{"input": "graded", "output": "b", "options": ["a", "b", "c"], "scores": [0.5, 1, 0]}]
    module = TextToTextTasksDataModule(tokenizer=TOKENIZER, dataset=str(write_rows(tmp_path, rows)), max_length=40)
    task = module.tasks["t"]
    assert task.credit[0].tolist() == [0.5, 1.0, 0.0]
    assert task.credit[1].tolist()[:2] == [0.0, 1.0]  # a row without scores: 1 for its correct option
    split = text_encoding.example_rows(task, torch.tensor([0, 1]), 4)
    assert split[CREDIT].tolist() == [[0.5, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    rows[0]["scores"] = [1, 0]
    module = TextToTextTasksDataModule(tokenizer=TOKENIZER, dataset=str(write_rows(tmp_path, rows)), max_length=40)
    with pytest.raises(ValueError, match=r"row 0: the scores \[1, 0\] do not give one number per option"):
        module.tasks  # noqa: B018


def test_many_tasks_with_too_few_examples_are_counted_with_a_few_names_and_the_fix(tmp_path):
    rows = [
        {"task": f"small{task:04d}", "input": f"q {task} {i}", "output": "a"} for task in range(1500) for i in (0, 1)
    ]
    rows += [{"task": "big", "input": f"q {i}", "output": "a"} for i in range(8)]
    (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ValueError) as error:
        datamodule(tmp_path / "tasks.jsonl")
    message = str(error.value)
    assert message.startswith(
        "1500 of 1501 tasks have fewer than shots + queries = 5 distinct examples (examples in "
        "brackets): small0000 (2), small0001 (2), small0002 (2), small0003 (2), small0004 (2), "
        "..."
    )
    assert "--data.init_args.skip_long_examples=true" in message and len(message) < 400


def table_rows() -> list[dict]:
    """A table with every feature a row can have: families and templates on some rows, options as a list and as
    ``a|b``, list outputs, repeated inputs (one with another output), numbers for text, a missing family."""
    return [
        {"task": "t1", "family": "f1", "input": "x", "output": "yes", "options": ["no", "yes"], "template": None},
        {"task": "t1", "family": None, "input": "y", "output": "no", "options": "no|yes", "template": "Q: {input}"},
        {"task": "t1", "family": "f1", "input": "x", "output": "no", "options": ["no", "yes"], "template": None},
        {"task": "t1", "family": "f1", "input": "x", "output": "yes", "options": ["no", "yes"], "template": None},
        {"task": "t2", "family": None, "input": "z", "output": ["b", "c"], "options": None, "template": None},
        {"task": "t2", "family": "f2", "input": 7, "output": 8, "options": [], "template": "N: {input}"},
        {"task": "t2", "family": None, "input": "w", "output": "d", "options": None, "template": None},
    ]


def test_a_table_gives_the_same_examples_as_the_row_by_row_reader(tmp_path):
    """The columns are read in one pass each now; the examples are those the row-by-row reader gave."""
    (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(row) for row in table_rows()))
    module = TextToTextTasksDataModule(
        tokenizer=TOKENIZER, dataset=str(tmp_path / "tasks.jsonl"), template="In: {input}", max_examples_per_task=2
    )
    examples = {
        name: {key: task[key] for key in ("family", "templates", "inputs", "outputs", "options")}
        for name, task in module.examples.items()
    }
    assert examples == {
        "t1": {
            "family": "f1",
            "templates": ["In: {input}", "Q: {input}"],
            "inputs": ["x", "y"],
            "outputs": [["yes", "no"], ["no"]],
            "options": [("no", "yes"), ("no", "yes")],
        },
        "t2": {
            "family": "f2",
            "templates": ["In: {input}", "N: {input}"],
            "inputs": ["z", "7"],
            "outputs": [["b", "c"], ["8"]],
            "options": [None, None],
        },
    }


def test_a_table_is_read_a_column_at_a_time_not_a_row_at_a_time(tmp_path, monkeypatch):
    from datasets import Dataset

    rows = [{"task": f"t{i % 50}", "input": f"q {i}", "output": "a", "options": None} for i in range(1000)]
    (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    module = TextToTextTasksDataModule(tokenizer=TOKENIZER, dataset=str(tmp_path / "tasks.jsonl"))
    lookups = []
    getitem = Dataset.__getitem__
    monkeypatch.setattr(Dataset, "__getitem__", lambda self, key: lookups.append(key) or getitem(self, key))
    assert len(module.examples) == 50
    assert len(lookups) < 20  # a few per column at most; it was several per row (30 s for 10,000 tasks)


def test_a_very_long_input_is_cut_as_before_without_tokenizing_it_whole(tmp_path, monkeypatch):
    """A 200,000-character input: its first tokens are read from a prefix of it (tokenizing 10 MB whole took
    3.5 GB), and the cut row is the one that tokenizing it whole and cutting gave."""
    long_input = " ".join(f"{WORDS[i % 8]}{i % 13}," for i in range(40_000))
    path = write_tasks(tmp_path, row1={"input": long_input})
    tokenized = []
    ids = text_encoding.TaskEncoder.ids
    monkeypatch.setattr(
        text_encoding.TaskEncoder, "ids", lambda self, texts: tokenized.extend(map(len, texts)) or ids(self, texts)
    )
    module = datamodule(path, truncate_inputs=True, max_length=64)
    assert len(long_input) > 200_000 and max(tokenized) < 10_000
    tokenizer = load_tokenizer(TOKENIZER)
    encode = functools.partial(tokenizer, add_special_tokens=False)
    answer = encode(" yes")["input_ids"] + [tokenizer.eos_token_id]  # row 1 of task t0 is a yes
    prefix, suffix = (encode(part)["input_ids"] for part in ("Input: ", "\nOutput:"))
    budget = 64 - len(answer) - len(prefix) - len(suffix)
    expected = prefix + encode(long_input)["input_ids"][:budget] + suffix + answer  # cut after tokenizing it whole
    assert module.tasks["t0"].input_ids[1].tolist() == expected
    with pytest.raises(ValueError, match=r"Example 1 of task 't0' is over 64 tokens long \(its input alone\)"):
        datamodule(path, max_length=64)


def test_calibration_and_channel_rows_are_written_as_the_rules_define_them(tmp_path):
    """Evaluation splits: each option after the content-free prompt (the template with an empty input), and with
    ``channel`` each option, "\\n", then the prompt (labels on the prompt); every split with ``channel``: the output,
    "\\n", the prompt and the end token (labels on the prompt and end token)."""
    from lightning_meta.data.tasks import CALIBRATION_FIELDS, CHANNEL_FIELDS, CHANNEL_SEQUENCE_FIELDS

    tokenizer = load_tokenizer(TOKENIZER)

    def text(ids, mask, labels):
        return tokenizer.decode(ids[mask.bool()].tolist()), tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())

    path = write_tasks(tmp_path)
    plain = datamodule(path, val_families=["f1"], test_families=["f2"]).eval_batches("val")[0].query
    assert CALIBRATION_FIELDS[0] in plain and CHANNEL_FIELDS[0] not in plain and CHANNEL_SEQUENCE_FIELDS[0] not in plain
    module = datamodule(path, val_families=["f1"], test_families=["f2"], channel=True)
    assert CHANNEL_SEQUENCE_FIELDS[0] in module.train_dataloader().dataset[0].query  # training reads them
    assert CHANNEL_FIELDS[0] not in module.train_dataloader().dataset[0].query
    checked = 0
    for episode in module.eval_batches("val")[0].episodes():
        task = module.examples[episode.metadata["task"]]
        query = episode.query
        for position, row in enumerate(episode.metadata["example_ids"][3:].tolist()):
            prompt = "Input: " + task["inputs"][row] + "\nOutput:"
            output = task["outputs"][row][0]
            sequence = text(*(query[name][position] for name in CHANNEL_SEQUENCE_FIELDS))
            assert sequence == (f" {output}\n{prompt}<|endoftext|>", f"{prompt}<|endoftext|>")
            for option, name in enumerate(task["options"][row] or []):
                calibration = text(*(query[field][position, option] for field in CALIBRATION_FIELDS))
                assert calibration == (f"Input: \nOutput: {name}", f" {name}")
                assert text(*(query[field][position, option] for field in CHANNEL_FIELDS)) == (
                    f" {name}\n{prompt}",
                    prompt,
                )
                checked += 1
    assert checked


def test_calibration_false_leaves_out_the_calibration_rows_and_their_figure(tmp_path):
    """Runs that do not ask for ``calibrated`` need not pay for its rows (one more prompt and every option again per
    example): ``calibration=False`` writes none, so evaluation reports every figure but ``accuracy_calibrated``."""
    from lightning_meta import CausalLMLearner
    from lightning_meta.data.tasks import CALIBRATION_FIELDS

    path = write_tasks(tmp_path)
    splits = {"val_families": ["f1"], "test_families": ["f2"]}
    with_rows = datamodule(path, **splits).eval_batches("val")[0].query
    without = datamodule(path, calibration=False, **splits).eval_batches("val")[0].query
    assert CALIBRATION_FIELDS[0] in with_rows and not set(CALIBRATION_FIELDS) & set(without)
    assert set(with_rows) - set(without) == set(CALIBRATION_FIELDS)
    for name in without:
        assert torch.equal(with_rows[name], without[name]), name  # everything else is as before
    torch.manual_seed(0)
    model = CausalLMLearner(
        model_config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2}, tokenizer=TOKENIZER
    ).eval()
    episode = next(datamodule(path, calibration=False, **splits).eval_batches("val")[0].episodes())
    figures = model.evaluation_metrics(episode.query)
    assert "accuracy_calibrated" not in figures and "accuracy_per_char" in figures
    with pytest.raises(ValueError, match=r"--data.init_args.calibration=true"):
        CausalLMLearner(
            model_config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2},
            tokenizer=TOKENIZER,
            scoring="calibrated",
        ).evaluation_metrics(episode.query)


def test_generated_outputs_are_cut_by_the_tasks_output_regex_before_exact_match(tmp_path):
    """A task's ``output_regex`` (and ``stop_string``), BIG-bench's, cut the greedily generated output before it
    is compared: an example whose output is the cut text is an exact match whatever the model writes after it (no
    end token asked), in the episode metadata's path through an algorithm's evaluation; without the rule exact
    match asks for the output and then the end token."""
    from lightning_meta import CausalLMLearner
    from lightning_meta.algorithms import MetaICL
    from lightning_meta.data.tasks import GenerationRule, generation_rule

    torch.manual_seed(0)
    model = CausalLMLearner(
        model_config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 128},
        tokenizer=TOKENIZER,
    ).eval()
    tokenizer = load_tokenizer(TOKENIZER)
    regex = r"\S{1,6}"
    rows = []
    for task in range(3):
        for example in range(6):
            text = f"{WORDS[(task + example) % 8]} {task} {example}"
            # What the model writes after this prompt, read first: the output is the rule's cut of it.
            prompt = torch.tensor(tokenizer(f"Input: {text}\nOutput:", add_special_tokens=False)["input_ids"])
            written = tokenizer.decode(model.generate(prompt, None, 24))
            output = GenerationRule(None, regex).apply(written.removeprefix(" "))
            assert output, written
            rows.append(
                {"task": f"t{task}", "family": f"f{task}", "input": text, "output": output, "output_regex": regex}
            )
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    module = datamodule(path, val_tasks=["t0"], test_tasks=["t1"], shots=2, queries=3, max_length=48)
    episode = next(module.eval_batches("val")[0].episodes())
    assert generation_rule(episode.metadata) == GenerationRule(None, regex)
    figures = MetaICL().evaluate(model, episode)
    assert float(figures["exact_match_pre"]) == 1.0  # every query: its cut generated output is its output
    assert float(model.evaluation_metrics(episode.query)["exact_match"]) == 0.0  # the end token does not follow
    # Decoding runs on the host: an evaluation batch whose tasks cut generated outputs never runs under vmap.
    from lightning_meta.training.meta_batch import MetaBatchRunner

    parallel_calls: list[bool] = []

    def figures_of(episode, parallel):  # noqa: ANN001, ANN202
        parallel_calls.append(parallel)
        return {"x": torch.zeros(())}

    MetaBatchRunner("vmap").evaluate(MetaICL(), model, module.eval_batches("val")[0], figures_of)
    assert parallel_calls and not any(parallel_calls)


@pytest.mark.parametrize(
    ("columns", "options", "message"),
    [
        ({"output_regex": "(a)(b)"}, {}, r"Task 't': output_regex '\(a\)\(b\)' has 2 capturing groups.*\(\?:\.\.\.\)"),
        (
            {"task_prefix": "Other."},
            {"template": "Say.\nQ: {input}\nA:", "demonstrations": "bigbench"},
            r"Task 't' gives the task_prefix 'Other\.', but its template starts 'Say\.\\nQ: '.*task_prefix column",
        ),
        ({}, {"demonstrations": "paper"}, r"demonstrations='paper' is not a layout: use one of metaicl, bigbench"),
    ],
)
def test_bad_task_fields_and_an_unknown_layout_are_refused_naming_the_fix(tmp_path, columns, options, message):
    rows = [{"input": f"word {index}", "output": WORDS[index % 8], **columns} for index in range(8)]
    path = write_rows(tmp_path, rows)
    with pytest.raises(ValueError, match=message):
        TextToTextTasksDataModule(tokenizer=TOKENIZER, dataset=str(path), max_length=40, **options).setup("fit")
