"""What an evaluation leaves: its per-episode statistics logged (and printed after a test), ``results.json``
(what ran, the metrics, the curve) and the adaptation-curve PNG."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_meta.data.local_files import write_file_atomically
from lightning_meta.training.config import NotConfigurable, to_config
from lightning_meta.training.metrics import EpisodeStatistics
from lightning_meta.training.plots import curve_figure, curve_points, save_curve

if TYPE_CHECKING:
    from lightning_meta.training.module import MetaLearningModule


def episode_statistics(stages: Sequence[str], metric_names: Sequence[str], curve_steps: Sequence[int]) -> nn.ModuleDict:
    """One :class:`EpisodeStatistics` per stage and figure: ``{stage}_{name}_pre``/``_post``/``_step{k}`` for the
    learner's metrics, and the control tasks' (``ceiling``, ``chance``, ``control_gap_*``; see
    :func:`~lightning_meta.training.metrics.control_metrics`), which count only where episodes carry a ceiling."""
    whens = ("pre", "post", *(f"step{step}" for step in curve_steps))
    names = [f"{name}_{when}" for name in metric_names for when in whens]
    names += ["ceiling", "chance", *(f"control_gap_{when}" for when in whens)]
    return nn.ModuleDict({f"{stage}_{name}": EpisodeStatistics() for stage in stages for name in names})


def log_episode_statistics(module: MetaLearningModule, stage: str) -> None:
    """Log ``{stage}/query_{figure}`` and its ``_ci95`` for every statistic of ``stage`` that counted episodes,
    and reset them; after a test, print them and write ``results.json`` (with a logger)."""
    summary = []
    metrics: dict[str, dict[str, float | int]] = {}
    for key, statistic in module.episode_stats.items():
        if not key.startswith(f"{stage}_") or statistic.update_count == 0:
            continue
        mean, ci95, episodes, tasks = statistic.compute()
        name = f"{stage}/query_{key.removeprefix(f'{stage}_')}"
        module.log(name, mean.float(), sync_dist=False)
        module.log(f"{name}_ci95", ci95.float(), sync_dist=False)
        metrics[name] = {"mean": mean.item(), "ci95": ci95.item(), "episodes": episodes}
        if tasks is not None:
            metrics[name]["tasks"] = tasks
        counted = f"{episodes} episodes" + (f", {tasks} task{'s' * (tasks != 1)}" if tasks is not None else "")
        summary.append(f"{name} = {mean.item():.4f} ± {ci95.item():.4f} ({counted})")
        statistic.reset()
    if summary and stage == "test" and not module.trainer.sanity_checking:
        heading = "Post-adaptation results (mean ± 95% CI over episodes, or over tasks where episodes share them):"
        rank_zero_info(heading + "\n  " + "\n  ".join(summary))
        if module.trainer.loggers:
            write_results(module, stage, metrics)


def write_results(module: MetaLearningModule, stage: str, metrics: dict[str, dict[str, float | int]]) -> None:
    """The printed results as ``results.json`` in the run's log folder, for scripts.

    ``metrics``: ``{name: {mean, ci95, episodes}}``; ``curve``: ``{figure: [{steps, mean, ci95}]}``
    from the ``eval_curve`` metrics.
    """
    folder = Path(module.trainer.log_dir)  # on every rank: log_dir is a collective call
    if not module.trainer.is_global_zero:
        return
    flat = {name: values["mean"] for name, values in metrics.items()}
    flat |= {f"{name}_ci95": values["ci95"] for name, values in metrics.items()}
    curve = {
        name: [{"steps": step, "mean": mean, "ci95": ci95} for step, (mean, ci95) in sorted(points.items())]
        for name, points in curve_points(flat, stage).items()
    }
    steps = module.trained_steps
    results = {
        "stage": stage,
        **run_description(module, folder),
        "global_step": steps,
        "metrics": metrics,
        "curve": curve,
    }
    if curve:
        results["curve_png"] = write_curve(module, flat, stage, folder, steps, metrics)
    path = folder / "results.json"
    text = json.dumps(results, indent=2, default=str) + "\n"
    # Atomic: a full disk leaves no empty results.json (nor replaces an earlier one), and says so.
    write_file_atomically(
        path,
        lambda partial: partial.write_text(text),
        "the results file",
        "; the metrics printed above are what it would hold",
    )
    rank_zero_info(f"Saved the results to {path}")


def run_description(module: MetaLearningModule, folder: Path) -> dict[str, Any]:
    """What ran, for ``results.json``: the algorithm and its options, the learner and data, the config, seed,
    checkpoint, times and versions."""
    import lightning
    import transformers

    from lightning_meta.version import VERSION

    def described(component: Any) -> Any:
        try:
            return to_config(component)
        except NotConfigurable:
            return {"class_path": f"{type(component).__module__}.{type(component).__qualname__}"}

    datamodule = getattr(module.trainer, "datamodule", None)
    config = folder / "config.yaml"
    seed = os.environ.get("PL_GLOBAL_SEED")  # set by Lightning's seed_everything (and the CLI's seed_everything)
    now = time.perf_counter()
    return {
        "algorithm": described(module.algorithm),
        "learner": type(module.learner).__name__,
        "data": None
        if datamodule is None
        else {"class_path": type(datamodule).__name__, "init_args": dict(getattr(datamodule, "hparams", {}))},
        "config": str(config) if config.is_file() else None,
        "seed": None if seed is None else int(seed),
        "checkpoint": None if module.trainer.ckpt_path is None else str(module.trainer.ckpt_path),
        "time": {
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "training_seconds": round(module.timings["fit_seconds"], 1) if "fit_seconds" in module.timings else None,
            "evaluation_seconds": round(now - module.timings["test"], 1) if "test" in module.timings else None,
        },
        "versions": {
            "lightning_meta": VERSION,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }


def write_curve(
    module: MetaLearningModule,
    flat: dict[str, float],
    stage: str,
    folder: Path,
    steps: int,
    metrics: dict[str, dict[str, float | int]],
) -> str | None:
    """The adaptation curve as ``{stage}_adaptation_curve.png``, titled with what it shows; its file name
    (``None`` without matplotlib, which draws it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        rank_zero_info("The adaptation curve is in results.json; pip install matplotlib to have it drawn too.")
        return None
    datamodule = getattr(module.trainer, "datamodule", None)
    shots = dict(getattr(datamodule, "hparams", {})).get("shots")
    episodes = max(int(values["episodes"]) for values in metrics.values())
    title = ", ".join(
        part
        for part in (
            type(module.algorithm).__name__,
            None if shots is None else f"K = {shots} shots",
            f"{steps} steps trained",
            f"{episodes} {stage} episodes",
        )
        if part
    )
    module.curve_figure = curve_figure(flat, stage, title=title)
    module.curve_path = save_curve(module.curve_figure, stage, folder)
    return module.curve_path.name
