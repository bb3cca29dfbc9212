"""The lm-evaluation-harness model ``lightning-meta``: the harness's own ``hf`` log-likelihoods, from every source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # the optional dependency [eval]; CI installs it

from lm_eval.tasks import TaskManager  # noqa: E402
from test_export import TINY, meta_checkpoint  # noqa: E402
from test_layers import import_time_imports, modules  # noqa: E402

from lightning_meta import CausalLMLearner, LoraSettings, MetaLearningModule, cli  # noqa: E402
from lightning_meta.data.tasks import CHOICE_FIELDS  # noqa: E402
from lightning_meta.datamodules import TextToTextTasksDataModule  # noqa: E402
from lightning_meta.handoff import harness  # noqa: E402
from lightning_meta.handoff.export import export  # noqa: E402

TASK = "tiny_choice"
ROWS = [  # made up: question, three options, the right one
    ("What is one plus two?", ["three", "four", "two"], 0),
    ("Which animal barks?", ["a cat", "a dog", "a fish"], 1),
    ("What colour is the sky on a clear day?", ["green", "red", "blue"], 2),
    ("How many legs has a spider?", ["eight", "six", "four"], 0),
    ("Which is a fruit?", ["a chair", "an apple", "a road"], 1),
    ("What do bees make?", ["milk", "silk", "honey"], 2),
]


def write_task(folder: Path) -> Path:
    """A harness task folder: the YAML (``dataset_path: json``) and its rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = folder / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": q, "options": o, "label": a}) + "\n" for q, o, a in ROWS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {rows}\n  cache_dir: {folder / 'datasets-cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{options}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    return folder


def evaluate(tasks: Path, model: str, **model_args) -> tuple[dict[str, float], list]:
    """``acc``/``acc_norm`` and every option's log-likelihood (by example), as ``lm_eval run`` computes them."""
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        device="cpu",
        log_samples=True,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
    )
    figures = {name: results["results"][TASK][f"{name},none"] for name in ("acc", "acc_norm")}
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    return figures, [[score for score, _ in sample["filtered_resps"]] for sample in samples]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step FOMAML checkpoint of a tiny GPT-2, its export, a task folder, and ``--model hf`` on the export."""
    folder = tmp_path_factory.mktemp("harness")
    checkpoint, _ = meta_checkpoint(folder)
    exported = export(str(checkpoint), str(folder / "export"))
    tasks = write_task(folder / "tasks")
    return checkpoint, exported, tasks, evaluate(tasks, "hf", pretrained=str(exported))


@pytest.mark.xdist_group("test_harness.trained")
def test_a_checkpoint_and_its_export_give_the_log_likelihoods_of_the_harness_hf_model(trained):
    checkpoint, exported, tasks, (figures, loglikelihoods) = trained
    assert len(loglikelihoods) == len(ROWS) and all(len(scores) == 3 for scores in loglikelihoods)
    for source in (checkpoint, exported):
        assert evaluate(tasks, "lightning-meta", checkpoint=str(source)) == (figures, loglikelihoods)


@pytest.mark.xdist_group("test_harness.trained")
def test_this_projects_evaluator_scores_the_same_examples_as_lm_eval(trained, tmp_path):
    """The test episode's query examples: the same option log-likelihoods (to float32 rounding: the prompt's
    keys and values are cached here) and the same accuracy as lm-eval's ``acc`` on those examples."""
    checkpoint, _, _, (_, loglikelihoods) = trained
    table = tmp_path / "tasks.jsonl"
    rows = [{"task": TASK, "input": q, "output": o[a], "options": o} for q, o, a in ROWS]
    rows += [
        {"task": name, "input": f"Is {n} even?", "output": ["no", "yes"][n % 2 == 0], "options": ["no", "yes"]}
        for name in ("train", "val")
        for n in range(len(ROWS))
    ]
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = TextToTextTasksDataModule(
        tokenizer="embedded-bpe-4096",
        dataset=str(table),
        template="Question: {input}\nAnswer:",
        val_tasks=["val"],
        test_tasks=[TASK],
        shots=1,
        queries=len(ROWS) - 1,
        num_val_tasks=1,
        num_test_tasks=1,
    )
    data.setup("test")
    batch = data.eval_batches("test")[0]
    query = {name: values[0] for name, values in batch.query.items()}
    examples = batch.metadata["example_ids"][0][1:].tolist()  # the query's rows (the task's in table order)
    learner = MetaLearningModule.load_from_checkpoint(checkpoint).learner.eval()
    with torch.no_grad():
        scores, _ = learner.option_scores(*(query[name] for name in CHOICE_FIELDS[:3]))
        accuracy = learner.evaluation_metrics(query)["accuracy"]
    expected = torch.tensor([loglikelihoods[row] for row in examples])
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    lm_eval_acc = sum(max(range(3), key=loglikelihoods[row].__getitem__) == ROWS[row][2] for row in examples)
    assert accuracy.item() == pytest.approx(lm_eval_acc / len(examples))


@pytest.mark.slow
def test_a_lora_adapter_and_a_slim_checkpoint_over_their_pretrained_base(tmp_path):
    base = tmp_path / "base"
    L.seed_everything(1, verbose=False)
    CausalLMLearner(model_config=dict(TINY)).model.save_pretrained(base)
    checkpoint, _ = meta_checkpoint(tmp_path, pretrained=str(base), lora=LoraSettings(r=2, alpha=4))
    exported = export(str(checkpoint), str(tmp_path / "export"), adapter_dir=str(tmp_path / "adapter"))
    tasks = write_task(tmp_path / "tasks")
    expected = evaluate(tasks, "hf", pretrained=str(exported))
    # The slim checkpoint rebuilds its frozen base from `pretrained` and merges as export does: identical.
    assert evaluate(tasks, "lightning-meta", checkpoint=str(checkpoint), pretrained=str(base)) == expected
    # The adapter alone over its base (the one its adapter_config.json names): peft merges the same sums. The
    # base holds no tokenizer here: the adapter's is then asked for, never made up empty.
    with pytest.raises(FileNotFoundError, match=r"No tokenizer in .*adapter or .*base: give the model.s"):
        harness.load_model(str(tmp_path / "adapter"))
    assert evaluate(tasks, "lightning-meta", checkpoint=str(tmp_path / "adapter"), tokenizer="embedded-bpe-4096") == (
        expected
    )


@pytest.mark.slow
@pytest.mark.xdist_group("test_harness.trained")
def test_the_lm_eval_command_writes_the_harness_results_files(trained, tmp_path):
    checkpoint, _, tasks, (figures, loglikelihoods) = trained
    output = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "lightning_meta",
        "lm-eval",
        "--model_args",
        f"checkpoint={checkpoint}",
        "--tasks",
        TASK,
        "--include_path",
        str(tasks),
        "--limit",
        "4",
        "--device",
        "cpu",
        "--output_path",
        str(output),
        "--log_samples",
    ]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    (results_file,) = output.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "lightning-meta" and results["config"]["limit"] == 4
    assert results["config"]["lightning_meta"]["steps_trained"] == 2  # where the model comes from
    (samples_file,) = output.rglob(f"samples_{TASK}_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [[float(score) for score, _ in sample["filtered_resps"]] for sample in samples] == loglikelihoods[:4]
    correct = [max(range(3), key=scores.__getitem__) == ROWS[i][2] for i, scores in enumerate(loglikelihoods[:4])]
    assert results["results"][TASK]["acc,none"] == sum(correct) / 4
    assert TASK in finished.stdout  # lm-eval's own table


def test_the_command_puts_in_run_and_this_model_unless_given(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", lambda: seen.append(sys.argv[1:]))
    config = tmp_path / "config.yaml"
    config.write_text("model: hf\n")
    for args in (
        ["--tasks", "x"],
        ["run", "--tasks", "x"],
        ["--model", "hf"],
        ["-M=hf"],
        ["ls", "tasks"],
        ["--config", str(config)],
        ["--help"],
    ):
        harness.run_command(args)
    assert seen == [
        ["run", "--model", "lightning-meta", "--tasks", "x"],
        ["run", "--model", "lightning-meta", "--tasks", "x"],
        ["run", "--model", "hf"],
        ["run", "-M=hf"],
        ["ls", "tasks"],
        ["run", "--config", str(config)],  # the config file names its model
        ["run", "--model", "lightning-meta", "--help"],
    ]
    assert sys.argv[1:] != seen[-1]  # put back


def test_a_missing_lm_eval_is_one_line_naming_the_extra(monkeypatch, capsys):
    for name in [name for name in sys.modules if name == "lm_eval" or name.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "lightning_meta.handoff.harness")
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["lm-eval", "--tasks", TASK])
    assert exit_status.value.code == 2
    message = capsys.readouterr().err.splitlines()[0]
    assert message == (
        "lightning-meta: error: ModuleNotFoundError: The lm-evaluation-harness model needs lm-eval, an optional "
        'dependency: pip install "lightning-meta[eval]".'
    )


def test_only_the_harness_module_imports_lm_eval():
    """Importing the package (and its command) never needs the optional dependency."""
    importers = {name for name, path in modules() if any(m.startswith("lm_eval") for m in import_time_imports(path))}
    assert importers == {"lightning_meta.handoff.harness"}
    assert not [name for name, path in modules() if "lightning_meta.handoff.harness" in import_time_imports(path)]


@pytest.mark.xdist_group("test_harness.trained")
def test_bad_sources_are_named(trained, tmp_path):
    _, exported, _, _ = trained
    with pytest.raises(FileNotFoundError, match=r"checkpoint='.*missing'.* Give a .ckpt of lightning-meta fit"):
        harness.load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"pretrained=.* is a whole model folder.*Leave pretrained out"):
        harness.load_model(str(exported), pretrained=str(exported))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match=r"LoRA adapter that names no base model: give pretrained=FOLDER"):
        harness.load_model(str(adapter))
    with pytest.raises(FileNotFoundError, match=r"base model .*elsewhere.* of the LoRA adapter .*pretrained=FOLDER"):
        harness.load_model(str(adapter), pretrained=str(tmp_path / "elsewhere"))
