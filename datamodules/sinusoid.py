"""Sinusoid regression tasks (Finn et al., 2017, section 5.1)."""

from __future__ import annotations

import math

import torch

from lightning_meta.data.episodic import EpisodicDataModule
from lightning_meta.data.tasks import Episode


class SinusoidDataModule(EpisodicDataModule):
    """Regress y = A·sin(x − φ) from ``shots`` points; each task draws its own A and φ.

    As in the MAML paper: A ~ U[0.1, 5.0], φ ~ U[0, π], x ~ U[-5, 5]. Support holds ``shots``
    points and query ``queries`` other points of the same task, as ``x``/``y`` of shape
    ``(points, 1)``; each episode's ``amplitude`` and ``phase`` are in its metadata.

    Args:
        shots: K, support points per task (the paper: 5, 10 or 20).
        queries: query points per task.
        amplitude_range, phase_range, x_range: the task distribution.
        others: ``meta_batch_size``, ``batches_per_epoch``, ``num_val_tasks``, ``num_test_tasks``,
            ``eval_meta_batch_size``, ``seed``, ``num_workers``, ``allow_data_change``: see
            :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        meta_batch_size: int = 25,
        batches_per_epoch: int = 100,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        allow_data_change: bool = False,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        super().__init__(
            meta_batch_size,
            batches_per_epoch,
            num_val_tasks,
            num_test_tasks,
            eval_meta_batch_size,
            seed,
            num_workers,
            allow_data_change,
        )
        if shots < 1 or queries < 1:
            raise ValueError(f"shots and queries must be >= 1, got shots={shots}, queries={queries}.")
        for name, (low, high) in [
            ("amplitude_range", amplitude_range),
            ("phase_range", phase_range),
            ("x_range", x_range),
        ]:
            if not low < high:
                raise ValueError(f"{name} must be (low, high) with low < high, got {(low, high)}.")
        self.shots = shots
        self.queries = queries
        self.amplitude_range = tuple(amplitude_range)
        self.phase_range = tuple(phase_range)
        self.x_range = tuple(x_range)
        self.save_hyperparameters()

    def sample_episode(self, generator: torch.Generator, split: str) -> Episode:
        amplitude = _uniform(generator, self.amplitude_range, ())
        phase = _uniform(generator, self.phase_range, ())
        x = _uniform(generator, self.x_range, (self.shots + self.queries, 1))
        y = amplitude * torch.sin(x - phase)
        return Episode(
            support={"x": x[: self.shots], "y": y[: self.shots]},
            query={"x": x[self.shots :], "y": y[self.shots :]},
            shots=self.shots,
            metadata={"amplitude": amplitude, "phase": phase},
        )


def _uniform(generator: torch.Generator, bounds: tuple[float, float], shape: tuple[int, ...]) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator)
