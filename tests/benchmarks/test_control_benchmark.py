"""The control benchmark (every method on the control task families) end to end in its smoke mode: every arm
writes its results, all arms are measured on the same held-out tasks against the analytic ceiling and chance,
and a rerun skips the finished arms."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_meta.datamodules.control_tasks import label_mapping_ceiling
from lightning_meta.training.metrics import mean_and_ci95

from conftest import load_benchmark


def smoke(run: ModuleType, out: Path, capsys: pytest.CaptureFixture, *options: str) -> str:
    """The benchmark's smoke mode in this process (one arm after another); what it printed."""
    run.main(["--smoke", "--workers", "0", "--seeds", "0", "--out", str(out), *options])
    return capsys.readouterr().out


def test_smoke_run_writes_every_arm_against_the_ceiling_and_a_rerun_skips_them(tmp_path, capsys):
    run = load_benchmark("control")
    out = tmp_path / "out"
    first = smoke(run, out, capsys)
    settings = run.SMOKE
    results = {name: json.loads((out / f"{name}-seed0.json").read_text()) for name in run.methods()}
    for name, result in results.items():
        assert result["steps"] > 0 and result["tokens"] >= settings.budget, name  # the same real-token budget
        for shots in settings.eval_shots:
            figures = result["figures"][str(shots)]
            # The same fixed held-out tasks for every arm, the ceiling of K shots and chance of 4 labels.
            assert figures["task"] == results["metaicl"]["figures"][str(shots)]["task"], name
            assert len(figures["task"]) == settings.test_tasks and all("/test/" in t for t in figures["task"])
            assert figures["ceiling"] == pytest.approx([label_mapping_ceiling(4, shots)] * settings.test_tasks)
            assert figures["chance"] == [0.25] * settings.test_tasks
            steps = range(settings.eval_steps + 1)
            for point in ["post"] if run.methods()[name].in_context else [f"step{s}" for s in steps]:
                accuracy, ceiling, gap = (
                    torch.tensor(figures[key], dtype=torch.float64)
                    for key in (f"accuracy_{point}", "ceiling", f"control_gap_{point}")
                )
                assert torch.allclose(gap, (accuracy - 0.25) / (ceiling - 0.25)), (name, point)
    assert "### control_gap against K" in first and "control_gap − ANIL" in first
    assert (out / "control.png").exists()
    written = {path.name: path.stat().st_mtime_ns for path in out.glob("*.json")}
    second = smoke(run, out, capsys)
    assert all(f"skip {name}-seed0: finished" in second for name in run.methods())
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.json")} == written
    with pytest.raises(SystemExit, match="was written with other settings"):  # never mixed with other settings
        smoke(run, out, capsys, "--test-tasks", "3")


def test_report_has_tasks_and_seeds_as_the_units(tmp_path):
    """Made-up results (3 tasks, 2 seeds): a cell's CI is over the task means with the seed variance, and a
    difference to ANIL is paired by task and seed."""
    run = load_benchmark("control")
    import common

    settings = run.replace(run.SMOKE, eval_shots=(4,), primary_shots=4, eval_steps=1, primary_steps=1, test_tasks=3)
    tasks = ["label_mapping/test/a", "label_mapping/test/b", "label_mapping/test/c"]
    gaps = {"metaicl": [[0.1, 0.0, -0.2], [0.3, 0.1, 0.0]], "anil": [[0.9, 0.5, 0.7], [0.6, 0.8, 1.0]]}
    for name, by_seed in gaps.items():
        for seed, values in enumerate(by_seed):
            point = "post" if name == "metaicl" else "step1"
            figures = {
                "task": tasks,
                "ceiling": [0.9] * 3,
                "chance": [0.25] * 3,
                f"accuracy_{point}": values,
                f"control_gap_{point}": values,
                "accuracy_pre": [0.25] * 3,
                "control_gap_pre": [0.0] * 3,
            }
            if name == "anil":
                figures |= {"accuracy_step0": [0.25] * 3, "control_gap_step0": [0.0] * 3}
            result = {
                "method": name,
                "seed": seed,
                "settings": json.loads(json.dumps(run.asdict(settings))),
                "steps": 1,
                "tokens": 1,
                "train_seconds": 1.0,
                "train_cpu_seconds": 1.0,
                "eval_cpu_seconds": 1.0,
                "final_train_loss": 1.0,
                "figures": {"4": figures},
            }
            (tmp_path / f"{name}-seed{seed}.json").write_text(json.dumps(result))
    report = run.report(tmp_path)
    anil = torch.tensor(gaps["anil"], dtype=torch.float64)
    zero_shot = "0.000 ± 0.000 [0.000, 0.000]"
    anil_row = f"| ANIL (MAML on the head, 2nd order) | 2 | {zero_shot} | {common.seed_spread(anil, tasks=tasks)} |"
    assert anil_row in report
    difference = torch.tensor(gaps["metaicl"], dtype=torch.float64) - anil
    mean, ci95 = mean_and_ci95(difference.flatten(), groups=tasks * 2, seeds=[0] * 3 + [1] * 3)
    assert f"| MetaICL | **{mean:+.3f} ± {ci95:.3f}** [" in report
    assert (tmp_path / "control.png").exists()


def test_the_user_table_script_writes_a_table_the_recipe_reads_with_its_ceiling(tmp_path):
    """``write_table.py``'s table through the datamodule with the README's options: held-out words at test,
    the table's ceiling and chance in every episode."""
    import importlib.util

    from lightning_meta.data.tasks import CEILING, CHANCE
    from lightning_meta.datamodules import TextToTextTasksDataModule

    script = Path(__file__).parents[2] / "benchmarks" / "control" / "write_table.py"
    spec = importlib.util.spec_from_file_location("write_table", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "tasks.jsonl"
    assert module.write_table(path, {"train": 20, "val": 4, "test": 4}) == 28 * 4  # 4 inputs a task
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    words = {split: {row["input"] for row in rows if row["family"] == split} for split in ("train", "test")}
    assert words["train"] and words["test"] and not words["train"] & words["test"]
    data = TextToTextTasksDataModule(
        "embedded-bpe-4096",
        str(path),
        template="{input}",
        replacement=True,
        val_families=["val"],
        test_families=["test"],
        shots=8,
        queries=4,
        max_length=64,
        meta_batch_size=2,
        num_val_tasks=2,
        num_test_tasks=2,
    )
    data.setup("fit")
    episode = data.sample_episode(torch.Generator().manual_seed(0), "train")
    assert float(episode.metadata[CEILING]) == pytest.approx(label_mapping_ceiling(4, 8), abs=1e-4)
    assert float(episode.metadata[CHANCE]) == 0.25
