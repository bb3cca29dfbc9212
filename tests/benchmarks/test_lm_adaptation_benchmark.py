"""benchmarks/lm_adaptation/run.py's tables: the held-out domains are the units of their CIs."""

from __future__ import annotations

import torch

from conftest import load_benchmark


def test_tables_and_plot_have_the_domains_as_the_units(tmp_path):
    run = load_benchmark("lm_adaptation")
    import common

    domains = ["email", "email", "email", "html", "html", "tomllib"]
    generator = torch.Generator().manual_seed(0)
    results = [
        run.Result(
            run.METHODS[name],
            1,
            0.0,
            0.0,
            0.1,
            {},
            {k: 6 + torch.rand(6, generator=generator, dtype=torch.float64) for k in (0, *run.EVAL_STEPS)},
        )
        for name in ("fomaml", "baseline")
    ]
    table = run.results_table(results, domains)
    assert common.format_ci(results[0].test_loss[0], tasks=domains) in table
    assert common.format_ci(results[0].test_loss[0]) not in table  # not over the episodes
    paired = run.paired_table(results, results[1], domains)
    assert common.format_ci(results[0].test_loss[10] - results[1].test_loss[10], tasks=domains) in paired
    run.plot(results, tmp_path / "adaptation.png", "title", domains, reference=results[1])
    assert (tmp_path / "adaptation.png").exists()
