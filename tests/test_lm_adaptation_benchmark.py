"""benchmarks/lm_adaptation/run.py's tables: the held-out domains are the units of their CIs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_run():
    spec = importlib.util.spec_from_file_location("lm_adaptation_run", BENCHMARKS / "lm_adaptation" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tables_and_plot_have_the_domains_as_the_units(tmp_path):
    run = _load_run()
    import common

    domains = ["email", "email", "email", "html", "html", "tomllib"]
    generator = torch.Generator().manual_seed(0)
    results = [
        run.Result(run.METHODS[name], 1, 0.0, 0.0, 0.1, {},
                   {k: 6 + torch.rand(6, generator=generator, dtype=torch.float64) for k in (0, *run.EVAL_STEPS)})
        for name in ("fomaml", "baseline")
    ]  # fmt: skip
    table = run.results_table(results, domains)
    assert common.format_ci(results[0].test_loss[0], tasks=domains) in table
    assert common.format_ci(results[0].test_loss[0]) not in table  # not over the episodes
    paired = run.paired_table(results, results[1], domains)
    assert common.format_ci(results[0].test_loss[10] - results[1].test_loss[10], tasks=domains) in paired
    run.plot(results, tmp_path / "adaptation.png", "title", domains, reference=results[1])
    assert (tmp_path / "adaptation.png").exists()
