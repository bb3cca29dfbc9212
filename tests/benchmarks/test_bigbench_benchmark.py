"""The BIG-bench benchmark end to end in its smoke mode (tiny BIG-bench-format files it writes itself, a
tiny random GPT-2): every arm writes its result files, and a rerun skips the finished arms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lightning_meta.training.metrics import mean_and_ci95

from conftest import load_benchmark

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "bigbench" / "run.py"
ARMS = ["base-seed0", "multitask-seed0", "metaicl-seed0", "fomaml_lora-seed0"]


def smoke(tmp_path: Path, *options: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", LIGHTNING_META_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, str(RUN), "--smoke", "--workers", "0", "--seeds", "0", "--out", str(tmp_path / "out")]
    result = subprocess.run([*command, *options], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def test_smoke_run_writes_every_arm_and_a_rerun_skips_them(tmp_path):
    first = smoke(tmp_path)
    out = tmp_path / "out"
    evaluations = {arm: json.loads((out / f"eval-{arm}.json").read_text()) for arm in ARMS}
    for arm, result in evaluations.items():
        assert result["complete"], arm
        # The long-prompt task and the programmatic one are left out, with the reason.
        assert sorted(result["tasks"]) == ["lite_choice", "lite_generative"]
        assert "fewer than K + queries = 4 of its examples fit max_length=48" in result["left_out"]["lite_long"]
        assert "no task.json" in result["left_out"]["lite_py"]
        rows = result["tasks"]["lite_choice"]["rows"]
        in_context = {"in context K=0", "in context K=1", "in context K=2"}
        assert set(rows) == in_context | ({"SGD K=2"} if "metaicl" not in arm else set())
        assert all(len(values) == 2 for row in rows.values() for values in row.values())  # 2 episodes per task
        assert 0 < result["tasks"]["lite_choice"]["chance"] < 1 and result["tasks"]["lite_generative"]["chance"] == 0
    for arm in ARMS[1:]:  # trained arms: equal real-token budgets, reached
        train = json.loads((out / f"train-{arm}.json").read_text())
        assert train["steps"] > 0 and train["tokens"] >= train["settings"]["budget"]
    # Every arm is measured on the same fixed episodes.
    assert len({json.dumps(r["tasks"]["lite_choice"]["chance"]) for r in evaluations.values()}) == 1
    assert "accuracy − MultiTask, paired by episode" in first.stdout
    assert (out / "bigbench.png").exists()
    written = {path.name: path.stat().st_mtime_ns for path in out.glob("*.json")}
    second = smoke(tmp_path)
    assert all(f"skip {arm}: finished" in second.stdout for arm in ARMS)
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.json")} == written
    # Results of other settings are never mixed in.
    other = smoke(tmp_path, "--eval-episodes", "3", check=False)
    assert other.returncode != 0 and "was written with other settings" in other.stderr
    # On another machine (the results files committed, the adapters not): an unfinished arm trains again and
    # evaluates from the start, never continuing a partial evaluation of other adapters.
    evaluation = out / "eval-multitask-seed0.json"
    partial = json.loads(evaluation.read_text())
    partial["complete"], partial["tasks"] = False, {"lite_choice": partial["tasks"]["lite_choice"]}
    evaluation.write_text(json.dumps(partial))
    (tmp_path / "cache" / "bigbench_benchmark" / "multitask-seed0.pt").unlink()
    smoke(tmp_path)
    assert (tmp_path / "cache" / "bigbench_benchmark" / "multitask-seed0.pt").exists()
    assert (out / "train-multitask-seed0.json").stat().st_mtime_ns != written["train-multitask-seed0.json"]
    assert json.loads(evaluation.read_text())["complete"]


def test_report_has_tasks_and_seeds_as_the_units(tmp_path):
    """Made-up results (2 tasks x 2 episodes; base with one seed, MultiTask with two): every cell's CI is
    over the task means with the seed variance, and an unseeded arm is paired with each seed of the other."""
    run = load_benchmark("bigbench")
    accuracy = {"base": {0: [0.5, 0.6, 0.1, 0.3]}, "multitask": {0: [0.4, 0.5, 0.2, 0.2], 1: [0.3, 0.5, 0.0, 0.2]}}
    for method, seeds in accuracy.items():
        for seed, values in seeds.items():
            tasks = {
                task: {
                    "kind": "multiple choice",
                    "chance": 0.25,
                    "rows": {
                        "in context K=0": {
                            "accuracy": values[2 * i : 2 * i + 2],
                            "exact_match": [0.0, 0.0],
                            "loss": [1.0, 2.0],
                        }
                    },
                }
                for i, task in enumerate(["task_a", "task_b"])
            }
            result = {
                "method": method,
                "seed": seed,
                "complete": True,
                "tasks": tasks,
                "eval_seconds": 1.0,
                "left_out": {},
            }
            (tmp_path / f"eval-{method}-seed{seed}.json").write_text(json.dumps(result))
    report = run.report(tmp_path)
    groups = ["task_a", "task_a", "task_b", "task_b"]
    trained = torch.tensor(accuracy["multitask"][0] + accuracy["multitask"][1], dtype=torch.float64)
    mean, ci95 = mean_and_ci95(trained, groups=groups * 2, seeds=[0] * 4 + [1] * 4)
    assert f"| MultiTask | 2 | {mean:.3f} ± {ci95:.3f} [0.250, 0.325] |" in report  # seeds: task means' means
    base = torch.tensor(accuracy["base"][0] * 2, dtype=torch.float64)
    mean, ci95 = mean_and_ci95(trained - base, groups=groups * 2, seeds=[0] * 4 + [1] * 4)
    assert f"| MultiTask | {mean:+.3f} ± {ci95:.3f} [" in report  # paired with base's one seed, twice
    assert "with the task as the unit" in report and (tmp_path / "bigbench.png").exists()
