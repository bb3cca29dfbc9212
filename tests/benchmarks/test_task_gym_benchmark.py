"""benchmarks/task_gym/run.py's report: the test tasks and the seeds are the units of its CIs."""

from __future__ import annotations

import json

import torch

from conftest import load_benchmark


def test_report_has_tasks_and_seeds_as_the_units(tmp_path):
    run = load_benchmark("task_gym")
    import common

    tasks = ["rule/1", "rule/1", "title/2", "title/3"]
    generator = torch.Generator().manual_seed(0)
    losses = {}
    for method, seeds in (("base", [0]), ("multitask", [0, 1])):
        for seed in seeds:
            rows = {
                row: {name: (6 + torch.rand(4, generator=generator)).tolist() for name in run.FIGURES}
                for row in ("zero-shot", "in context K=4", "SGD K=4")
            }
            losses[method, seed] = rows["SGD K=4"]["loss"]
            figures = rows | {"family": {"K=4": ["rule", "rule", "title", "title"]}, "task": {"K=4": tasks}}
            result = {
                "seed": seed,
                "steps": 0,
                "train_seconds": 0.0,
                "eval_seconds": 0.0,
                "sgd_step_size": 0.1,
                "final_train_loss": 0.0,
                "figures": figures,
            }
            (tmp_path / f"{method}-seed{seed}.json").write_text(json.dumps(result))
    report = run.report(tmp_path, ["base", "multitask"])
    multitask = torch.tensor([losses["multitask", 0], losses["multitask", 1]], dtype=torch.float64)
    assert common.seed_spread(multitask, tasks=tasks) in report
    base = torch.tensor([losses["base", 0]] * 2, dtype=torch.float64)  # paired with each MultiTask seed
    assert common.seed_spread(base - multitask, signed=True, tasks=tasks) in report
    assert "4 fixed test episodes of 3 tasks per K" in report and (tmp_path / "task_gym.png").exists()
