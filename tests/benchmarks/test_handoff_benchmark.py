"""benchmarks/handoff/: run.py's report (the held-out domains and the seeds are the units of its CIs), and
control_run.py's arms in a shortened form."""

from __future__ import annotations

import pytest
import torch

from conftest import BENCHMARKS, load_benchmark


def test_report_has_domains_and_seeds_as_the_units(tmp_path, capsys):
    run = load_benchmark("handoff")
    import common

    tasks = ["email", "email", "html", "html", "html", "tomllib"]
    generator = torch.Generator().manual_seed(0)

    def curve() -> dict[int, torch.Tensor]:
        return {k: 6 + torch.rand(len(tasks), generator=generator, dtype=torch.float64) for k in run.STEPS}

    for seed in (0, 1):
        losses = {"before": {key: curve() for key in "abc"}, "after": {key: curve() for key in "abcde"}}
        seconds = {"total": 1.0}
        torch.save({"losses": losses, "seconds": seconds, "settings": {}, "tasks": tasks}, tmp_path / f"seed{seed}.pt")
    run.report(tmp_path)
    printed = capsys.readouterr().out
    runs = [torch.load(tmp_path / f"seed{seed}.pt") for seed in (0, 1)]
    expected = common.seed_spread(torch.stack([r["losses"]["before"]["a"][0] for r in runs]), tasks=tasks)
    assert f"| (a) FOMAML | after stage 1 | {expected} |" in printed
    difference = torch.stack([r["losses"]["after"]["d"][10] - r["losses"]["after"]["e"][10] for r in runs])
    assert common.seed_spread(difference, signed=True, tasks=tasks) in printed
    assert "3 held-out domains (the tasks: 6 episodes" in printed and (tmp_path / "handoff.png").exists()


def load_control_run():
    """``benchmarks/handoff/control_run.py`` as a module (it imports ``run.py`` beside it as ``run``)."""
    import importlib.util
    import sys

    load_benchmark("handoff")  # puts benchmarks/ on the path (common.py)
    folder = BENCHMARKS / "handoff"
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("handoff_control_run", folder / "control_run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~40 CPU-seconds: 2 meta-training runs, 3 pretraining runs, 6 evaluations
def test_control_handoff_arms_run_count_tokens_and_are_skipped_once_saved(tmp_path, capsys, monkeypatch):
    # The arms in a shortened form: 1 stage-1 step, N = 1,500 tokens, 4 held-out control tasks, little text.
    run = load_control_run()
    monkeypatch.setattr(run.handoff, "PRETRAIN_TOKENS_PER_DOMAIN", 10_000)  # 3 held-out blocks a domain
    monkeypatch.setattr(run.handoff, "PRETRAIN_BATCH", 2)
    argv = [
        "--seeds",
        "0",
        "--tokens",
        "1500",
        "--meta_steps",
        "1",
        "--eval_points",
        "--final_inner_lrs",
        "10",
        "--test_tasks",
        "4",
        "--text_blocks",
        "8",
        "--out",
        str(tmp_path),
    ]
    run.main(argv)
    saved = {arm: torch.load(tmp_path / "seed0" / f"{arm}.pt") for arm in "abc"}
    for arm, record in saved.items():
        stages = [point["stage"] for point in record["points"]]
        assert stages[0] == ("random init" if arm == "a" else "after stage 1") and stages[-1] == "after stage 2"
        for point in record["points"]:
            assert point["lm_loss"].shape == (8,) and torch.isfinite(point["lm_loss"]).all()
            assert set(point["control_gap"]) == {0, *run.ADAPT_STEPS} and len(point["control_gap"][0]) == 4
        assert "control_gap@10" in record["points"][-1] and "control_gap@10" not in record["points"][0]
        last = record["points"][-1]
        # N in all: the meta-training's real tokens (3 a label-mapping example) come out of the pretraining.
        spent = last["meta_tokens"] + last["pretrain_tokens"]
        assert spent <= 1500 < spent + 2 * 64  # whole pretraining steps of 2 blocks of 64 tokens
    # MAML and MultiTask ran as many steps on the same tasks: the same tokens (16 episodes x 12 examples x 3 tokens).
    assert saved["b"]["points"][0]["meta_tokens"] == saved["c"]["points"][0]["meta_tokens"] == 16 * 12 * 3
    # A rerun skips every finished arm and reports them.
    capsys.readouterr()
    run.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("saved already, skipped") == 3 and "| (b) MAML, then pretraining | after stage 2 |" in printed


def load_gym_run():
    """``benchmarks/handoff/gym_run.py`` as a module (it imports ``run.py`` and ``control_run.py`` beside it)."""
    import importlib.util
    import sys

    load_control_run()  # benchmarks/ and benchmarks/handoff/ on the path
    spec = importlib.util.spec_from_file_location("handoff_gym_run", BENCHMARKS / "handoff" / "gym_run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~60 CPU-seconds: 2 gym trainings, 3 pretraining runs, 8 evaluations on 2 episodes
def test_gym_handoff_arms_run_count_tokens_and_are_skipped_once_saved(tmp_path, capsys, monkeypatch):
    # Shortened: N = 3,000 tokens, 1,000 of them on the gym, 2 validation and 2 test episodes, little text.
    run = load_gym_run()
    monkeypatch.setattr(run.handoff, "PRETRAIN_TOKENS_PER_DOMAIN", 10_000)
    monkeypatch.setattr(run.handoff, "PRETRAIN_BATCH", 2)
    monkeypatch.setattr(run.gym, "SGD_GRID", (0.3, 1.0))
    full = run.episodes
    monkeypatch.setattr(run, "episodes", lambda split: tuple(part[:2] for part in full(split)))
    argv = [
        "--seeds",
        "0",
        "--tokens",
        "3000",
        "--meta_tokens",
        "1000",
        "--eval_points",
        "--text_blocks",
        "8",
        "--out",
        str(tmp_path),
    ]
    run.main(argv)
    saved = {arm: torch.load(tmp_path / "seed0" / f"{arm}.pt") for arm in "abc"}
    for arm, record in saved.items():
        stages = [point["stage"] for point in record["points"]]
        first = ["random init"] if arm == "a" else ["after stage 1, own adapters", "after stage 1"]
        assert stages == [*first, "after stage 2"]
        for point in record["points"]:
            assert point["lm_loss"].shape == (8,) and torch.isfinite(point["lm_loss"]).all()
            assert set(point["loss"]) == {0, *run.ADAPT_STEPS} and len(point["loss"][0]) == 2
            assert point["step_size"] in (0.3, 1.0) and set(point["val_loss_by_step_size"]) == {0.3, 1.0}
        last = record["points"][-1]
        spent = last["meta_tokens"] + last["pretrain_tokens"]
        assert spent <= 3000 < spent + 2 * 64  # N in all, in whole pretraining steps of 2 blocks of 64 tokens
    # The export merges the adapters and the scoring adds fresh ones (B = 0): the same model before adaptation.
    for arm in "bc":
        own, fresh = saved[arm]["points"][:2]
        torch.testing.assert_close(own["loss"][0], fresh["loss"][0], rtol=1e-4, atol=1e-4)
        assert saved[arm]["points"][0]["meta_tokens"] >= 1000  # the budget stops after the step that reached it
    capsys.readouterr()
    run.main(argv)
    printed = capsys.readouterr().out
    assert (
        printed.count("saved already, skipped") == 3
        and "| (b) MAML-LoRA, then pretraining | after stage 2 |" in printed
    )
