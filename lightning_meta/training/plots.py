"""Plots of evaluation results: the adaptation curve as a PNG and a TensorBoard image."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class AdaptationCurvePlot(Callback):
    """Writes ``test_adaptation_curve.png`` (query metrics vs adaptation steps, 95% CI bars) into the log dir.

    Reads the ``test/query_{name}_step{k}`` metrics that ``MetaLearningModule(eval_curve=[...])`` logs,
    at the end of ``test`` (rank 0 only), one panel per figure (loss, and accuracy where the
    learner reports it), and adds the same figure as the image ``test/adaptation_curve`` to each
    TensorBoard logger of the trainer. Needs matplotlib (``pip install matplotlib``, part of the
    ``dev`` extra).

    Example::

        trainer = Trainer(callbacks=[AdaptationCurvePlot()])
        trainer.test(MetaLearningModule(learner, eval_curve=[0, 1, 5, 10]), datamodule)
    """

    def __init__(self) -> None:
        super().__init__()
        # Checked here so that a missing matplotlib fails before any training, not after it.
        try:
            import matplotlib  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "AdaptationCurvePlot needs matplotlib: pip install matplotlib (or lightning-meta[dev]), or drop "
                "the callback."
            ) from error
        #: where the last plot was written (``None`` before the first)
        self.path: Path | None = None

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # on every rank: log_dir is a collective call
        if not trainer.is_global_zero:
            return
        # MetaLearningModule draws the curve itself where it writes results.json; reuse that figure and file.
        figure, self.path = getattr(pl_module, "curve_figure", None), getattr(pl_module, "curve_path", None)
        if figure is None:
            figure = curve_figure(trainer.callback_metrics, "test")
            if figure is None:
                return
            self.path = save_curve(figure, "test", folder)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("test/adaptation_curve", figure, global_step=trainer.global_step)


def curve_points(metrics: dict, stage: str) -> dict[str, dict[int, tuple[float, float]]]:
    """``{name: {k: (mean, ci95)}}`` from the ``{stage}/query_{name}_step{k}`` metrics and their ``_ci95``."""
    pattern = re.compile(rf"{re.escape(stage)}/query_(\w+?)_step(\d+)")
    curves: dict[str, dict[int, tuple[float, float]]] = {}
    for key, value in metrics.items():
        match = pattern.fullmatch(key)
        if match:
            name, step = match.group(1), int(match.group(2))
            curves.setdefault(name, {})[step] = (float(value), float(metrics.get(f"{key}_ci95", 0.0)))
    return curves


def curve_figure(metrics: dict, stage: str, title: str | None = None) -> Figure | None:
    """The adaptation curve of ``metrics`` as a matplotlib figure, with ``title`` above its panels (what ran:
    algorithm, K, steps trained, episodes); ``None`` when they hold no curve."""
    from matplotlib.figure import Figure  # without pyplot: no global backend or figure state

    curves = curve_points(metrics, stage)
    if not curves:
        return None
    figure = Figure(figsize=(5.5 * len(curves), 4.2))
    axes = figure.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, points) in zip(axes, sorted(curves.items()), strict=True):
        steps = sorted(points)
        ax.errorbar(
            steps, [points[k][0] for k in steps], yerr=[points[k][1] for k in steps], marker="o", capsize=4, linewidth=2
        )
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel(f"query {name} (mean ± 95% CI over episodes)")
        ax.set_title(f"{stage}: query {name} along the adaptation trajectory")
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def save_curve(figure: Figure, stage: str, folder: Path) -> Path:
    """Save ``figure`` as ``{folder}/{stage}_adaptation_curve.png`` and say where."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stage}_adaptation_curve.png"
    figure.savefig(path, dpi=110)
    rank_zero_info(f"Saved the {stage} adaptation curve to {path}")
    return path
