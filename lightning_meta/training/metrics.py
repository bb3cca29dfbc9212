"""Few-shot evaluation figures: mean over episodes ± 95% confidence interval."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

Z_95 = 1.96


def mean_and_ci95(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and 95% CI half-width 1.96·σ/√n (σ: sample standard deviation; 0 for one episode)."""
    values = values.flatten().double()
    count = values.numel()
    if count == 0:
        raise ValueError("mean_and_ci95 needs at least one value.")
    std = values.std(unbiased=True) if count > 1 else values.new_zeros(())
    return values.mean(), Z_95 * std / math.sqrt(count)


class EpisodeStatistics(Metric):
    """Collects one value per episode (across DDP ranks); computes mean, 95% CI half-width and count."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, value: Tensor) -> None:
        self.values.append(value.detach().reshape(-1).to(torch.float64))

    def compute(self) -> tuple[Tensor, Tensor, int]:
        """(mean, 95% CI half-width, number of episodes)."""
        values = dim_zero_cat(self.values)
        return (*mean_and_ci95(values), values.numel())
