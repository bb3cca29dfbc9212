"""benchmarks/handoff/run.py's report: the held-out domains and the seeds are the units of its CIs."""

from __future__ import annotations

import torch

from conftest import load_benchmark


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
