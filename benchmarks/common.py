"""What the benchmarks share: statistics and tables, a quiet Trainer, memory peaks, adaptation curves.

The benchmarks are users of the package: this module imports only ``lightning_meta``'s public
names. Each ``benchmarks/<name>/run.py`` runs as a script (``python benchmarks/<name>/run.py``)
and makes this folder importable with the two lines::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
    import common  # noqa: E402
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_meta import Learner, MetaLearningModule, TaskBatch
from lightning_meta.algorithms import MetaAlgorithm
from lightning_meta.training.metrics import TASK_KEY, mean_and_ci95

# ------------------------------------------------------------------------------ statistics, tables


def format_ci(values: Tensor, signed: bool = False, tasks: Sequence[Hashable] | None = None) -> str:
    """``mean ± half-width`` of the 95% CI over ``values`` (``diverged (n episodes)`` if any is not finite).

    ``tasks``: the task of each value, where episodes share tasks: the CI is then over the task means
    (the package's ``mean_and_ci95(values, groups=tasks)``); without, over the values as independent.
    """
    if not torch.isfinite(values).all():
        return f"diverged ({int((~torch.isfinite(values)).sum())} episodes)"
    mean, ci95 = mean_and_ci95(values, groups=tasks)
    return f"{mean.item():{'+' if signed else ''}.3f} ± {ci95.item():.3f}"


def mean_ci(values: Sequence[float], tasks: Sequence[Hashable] | None = None) -> tuple[float, float]:
    """Mean and 95% CI half-width of plain numbers (the package's ``mean_and_ci95``; over tasks with ``tasks``)."""
    mean, ci95 = mean_and_ci95(torch.tensor(values, dtype=torch.float64), groups=tasks)
    return mean.item(), ci95.item()


def seed_spread(per_seed: Tensor, signed: bool = False, tasks: Sequence[Hashable] | None = None) -> str:
    """``mean ± CI [lowest, highest seed mean]`` of a (seeds, episodes) tensor, every seed on the same episodes.

    The CI has the seeds and the tasks as its units (``mean_and_ci95(..., groups=, seeds=)``: the
    seed-to-seed variance included); ``tasks`` is the task of each episode (``None``: each episode
    its own task). The mean is over tasks (each task weighs the same), and so are the seed means.
    For a paired difference (``signed``), pass the (seeds, episodes) differences, an arm without seeds
    repeated once per seed of the other: ``mean ± CI`` is then bold where the CI excludes 0.
    """
    seeds, episodes = per_seed.shape
    tasks = list(range(episodes)) if tasks is None else list(tasks)
    groups = tasks * seeds
    mean, ci95 = mean_and_ci95(per_seed.flatten(), groups=groups, seeds=[s for s in range(seeds) for _ in tasks])
    means = [mean_and_ci95(row, groups=tasks)[0].item() for row in per_seed]
    number = "+.3f" if signed else ".3f"
    figure = f"{mean:{number}} ± {ci95:.3f}"
    if signed and abs(mean) > ci95:
        figure = f"**{figure}**"
    return f"{figure} [{min(means):{number}}, {max(means):{number}}]"


def episode_tasks(batches: Iterable[TaskBatch]) -> list[str] | None:
    """The task of each episode of ``batches`` (``metadata["task"]``), or ``None`` where they carry none."""
    tasks: list[str] = []
    for batch in batches:
        if TASK_KEY not in batch.metadata:
            return None
        tasks += [str(task) for task in batch.metadata[TASK_KEY]]
    return tasks


def steps_label(k: int) -> str:
    """``after k step(s)``."""
    return f"after {k} step{'s' * (k > 1)}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def paired_rows(
    curves: dict[str, dict[int, Tensor]],
    reference: str,
    columns: Sequence[int],
    tasks: Sequence[Hashable] | None = None,
) -> list[list[str]]:
    """Per-episode differences to ``curves[reference]`` on the same episodes, one row per other name
    (the CI over tasks with ``tasks``, the task of each episode)."""
    return [
        [name, *(format_ci(curve[k] - curves[reference][k], tasks=tasks) for k in columns)]
        for name, curve in curves.items()
        if name != reference
    ]


# ---------------------------------------------------------------------------------- trainer


def quiet_benchmark_process() -> None:
    """One torch thread; Lightning's and the package's info logs and Python's warnings off (a benchmark's
    process, whose output is its own progress lines and tables)."""
    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_meta"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def quiet_lightning() -> None:
    """Silence Lightning's info messages (a level set higher already stays)."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.level, logging.WARNING))


def benchmark_trainer(max_steps: int = -1, **options: Any) -> lightning.Trainer:
    """A ``lightning.Trainer`` for benchmark runs: CPU, one device, no logger, checkpoints, progress bar,
    model summary or validation, unless ``options`` say otherwise; Lightning's info messages silenced."""
    quiet_lightning()
    settings = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "devices": 1,
    }
    return lightning.Trainer(max_steps=max_steps, **settings | options)


class RealTokenBudget(lightning.Callback):
    """Stops training once the steps so far ran ``budget`` real (unpadded) tokens through forward + backward.

    Per step: ``support_passes`` times the support's real tokens plus ``query_passes`` times the
    query's (FOMAML with 2 inner steps: 2 and 1; MetaICL: each query runs after the whole support, so
    ``queries`` and 1). Counted from the batch's attention masks after each step (one host sync per step);
    ``rows``: the rows the method trains on, by field prefix (``"channel_sequence_"`` for the channel
    direction, whose rows are longer than the direct ones).
    """

    def __init__(self, budget: int, support_passes: int, query_passes: int, rows: str = "") -> None:
        self.budget, self.support_passes, self.query_passes = budget, support_passes, query_passes
        self.mask = f"{rows}attention_mask"
        self.tokens = 0

    def on_train_batch_end(  # noqa: D102
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: TaskBatch,
        batch_idx: int,
    ) -> None:
        support, query = (int(split[self.mask].sum()) for split in (batch.support, batch.query))
        self.tokens += self.support_passes * support + self.query_passes * query
        trainer.should_stop = self.tokens >= self.budget


# --------------------------------------------------------------------------- adaptation curves


class _EpisodeFigures(lightning.Callback):
    """Keeps the per-episode curve figures the module's test collected, before it reduces them."""

    def __init__(self, names: Sequence[str], steps: Sequence[int]) -> None:
        self.keys = {name: {k: f"test_{name}_step{k}" for k in steps} for name in names}
        self.values: dict[str, dict[int, Tensor]] = {}

    def on_test_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        # Callbacks run before the module's own on_test_epoch_end, which logs and resets the statistics.
        stats = pl_module.episode_stats
        self.values = {
            name: {k: torch.cat(stats[key].values) for k, key in keys.items()} for name, keys in self.keys.items()
        }


def adaptation_curve(
    learner: Learner, algorithm: MetaAlgorithm, batches: Sequence[TaskBatch], steps: Sequence[int], name: str = "loss"
) -> dict[int, Tensor]:
    """Per-episode query ``name`` (float64) before adaptation (key 0) and after each of ``steps`` adaptation steps.

    What ``MetaLearningModule(learner, algorithm, eval_curve=[0, *steps])`` logs under ``trainer.test``
    (one adaptation trajectory per episode, ``algorithm.adapt_steps``), kept per episode for paired
    comparisons. A non-finite figure stops with the module's ``FloatingPointError``.
    """
    return adaptation_curves(learner, algorithm, batches, steps, [name])[name]


def adaptation_curves(
    learner: Learner,
    algorithm: MetaAlgorithm,
    batches: Sequence[TaskBatch],
    steps: Sequence[int],
    names: Sequence[str],
    **module_options: Any,
) -> dict[str, dict[int, Tensor]]:
    """:func:`adaptation_curve` of several figures from one test pass (``names``: e.g. ``accuracy``,
    ``control_gap``); ``module_options`` go to ``MetaLearningModule`` (``meta_batch="vmap"``)."""
    curve = [0, *steps]
    figures = _EpisodeFigures(names, curve)
    module = MetaLearningModule(learner, algorithm, eval_curve=curve, **module_options)
    loader = DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)
    benchmark_trainer(callbacks=[figures]).test(module, loader, verbose=False)
    return figures.values


class _AllEpisodeFigures(lightning.Callback):
    """Keeps every per-episode figure the module's test collected (those with values), before it reduces them."""

    def __init__(self) -> None:
        self.values: dict[str, Tensor] = {}

    def on_test_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self.values = {
            key.removeprefix("test_"): torch.cat(statistic.values)
            for key, statistic in pl_module.episode_stats.items()
            if key.startswith("test_") and statistic.values
        }


def episode_figures(
    learner: Learner, algorithm: MetaAlgorithm, batches: Sequence[TaskBatch], **module_options: Any
) -> dict[str, Tensor]:
    """Every per-episode figure ``trainer.test`` of ``MetaLearningModule(learner, algorithm, **module_options)``
    collects on ``batches``, by name without the stage (``accuracy_pre``, ``accuracy_step3``, control tasks'
    ``ceiling``, ``chance``, ``control_gap_post``, ...), episodes in batch order (float64)."""
    figures = _AllEpisodeFigures()
    module = MetaLearningModule(learner, algorithm, **module_options)
    loader = DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)
    benchmark_trainer(callbacks=[figures]).test(module, loader, verbose=False)
    return figures.values


# ------------------------------------------------------------------------------------ memory

#: glibc keeps freed blocks below its (dynamically raised) mmap threshold resident, so the
#: high-water mark would include earlier steps' peaks. A fixed 64 KiB threshold returns every
#: tensor-sized block to the system when freed: RSS then follows the live tensors. For the
#: environment of the process that measures (glibc reads it at start-up).
MALLOC_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")


def kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (``VmRSS:`` resident set, ``VmHWM:`` its high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_mib(step: Callable[[], None]) -> float:
    """MiB of resident memory ``step`` peaks at above the resident set before it (Linux)."""
    before = kib("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    step()
    return (kib("VmHWM:") - before) / 1024


def run_arm_processes(
    arms: Sequence[tuple[str, int]],
    command: Callable[[str, int], list[str]],
    workers: int,
    label: Callable[[str, int], str] = lambda method, seed: f"{method} seed {seed}",
    poll_seconds: float = 1.0,
) -> None:
    """Run each ``(method, seed)`` arm as its own process (``command(method, seed)``), ``workers`` at a time, one
    torch thread each, in order; stops with the failing command when an arm fails (its finished arms stay saved)."""
    import subprocess
    import time

    todo = list(arms)
    environment = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    running: list[subprocess.Popen] = []
    start = time.perf_counter()
    while todo or running:
        while todo and len(running) < workers:
            method, seed = todo.pop(0)
            print(f"[{time.perf_counter() - start:6.0f} s] start {label(method, seed)}", flush=True)
            running.append(subprocess.Popen(command(method, seed), env=environment))
        time.sleep(poll_seconds)
        for process in [p for p in running if p.poll() is not None]:
            running.remove(process)
            if process.returncode:
                raise SystemExit(f"An arm failed: {' '.join(process.args)}")
