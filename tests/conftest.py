"""Shared fixtures: tiny models and hand-made task batches (float64 for gradient checks)."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import lightning_meta
import lightning_meta.algorithms
import lightning_meta.datamodules
from lightning_meta import MLP, ClassificationLearner, RegressionLearner, TaskBatch

# Tiny models: one thread is faster, and two threads contending with another process on this
# 2-core machine slow the suite down by an order of magnitude.
torch.set_num_threads(1)
# Tokenizers the tests train go to a fresh cache (inherited by CLI subprocesses and pytest-xdist's workers):
# hermetic runs. The process that made it removes it when it exits (each run left ~10 MB, and 520 MB where a
# real model was dequantized into it).
if "LIGHTNING_META_CACHE" not in os.environ:
    os.environ["LIGHTNING_META_CACHE"] = tempfile.mkdtemp(prefix="lightning-meta-cache-")
    atexit.register(shutil.rmtree, os.environ["LIGHTNING_META_CACHE"], ignore_errors=True)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def tiny_language_models(layers: int, positions: int) -> dict[str, dict]:
    """A tiny GPT-2 (learned positions, LayerNorm) and a tiny Llama (RoPE, RMSNorm, grouped KV), no dropout."""
    return {
        "gpt2": {
            "model_type": "gpt2",
            "n_layer": layers,
            "n_embd": 16,
            "n_head": 2,
            "n_positions": positions,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
        "llama": {
            "model_type": "llama",
            "num_hidden_layers": layers,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": positions,
        },
    }


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>/run.py`` as a module (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_run", BENCHMARKS / name / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def regression_batch(
    meta_batch_size: int = 3,
    shots: int = 5,
    queries: int = 6,
    features: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(meta_batch_size, shots + queries, features, generator=generator, dtype=dtype)
    weights = torch.randn(meta_batch_size, features, 1, generator=generator, dtype=dtype)
    y = torch.sin(x @ weights) + 0.1 * torch.randn(
        meta_batch_size, shots + queries, 1, generator=generator, dtype=dtype
    )
    return TaskBatch(
        support={"x": x[:, :shots], "y": y[:, :shots]},
        query={"x": x[:, shots:], "y": y[:, shots:]},
        shots=shots,
    )


def classification_batch(
    meta_batch_size: int = 2,
    ways: int = 3,
    shots: int = 2,
    queries: int = 3,
    features: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(meta_batch_size, ways, 1, features, generator=generator, dtype=dtype)
    points = centres + torch.randn(meta_batch_size, ways, shots + queries, features, generator=generator, dtype=dtype)
    labels = torch.arange(ways).view(1, ways, 1).expand(meta_batch_size, ways, shots + queries)
    support_x = points[:, :, :shots].reshape(meta_batch_size, ways * shots, features)
    query_x = points[:, :, shots:].reshape(meta_batch_size, ways * queries, features)
    return TaskBatch(
        support={"x": support_x, "y": labels[:, :, :shots].reshape(meta_batch_size, -1)},
        query={"x": query_x, "y": labels[:, :, shots:].reshape(meta_batch_size, -1)},
        ways=ways,
        shots=shots,
    )


@pytest.fixture
def mlp_learner() -> RegressionLearner:
    torch.manual_seed(0)
    return RegressionLearner(MLP(1, [8, 8], 1)).double()


@pytest.fixture
def classifier() -> ClassificationLearner:
    torch.manual_seed(0)
    return ClassificationLearner(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))).double()


class Blocks(nn.Module):
    """An input layer, a list of blocks (what ``last_blocks:N`` and FSDP see), and a head."""

    def __init__(self, features: int = 4, width: int = 6, blocks: int = 3, ways: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


@contextlib.contextmanager
def host_syncs_from_the_package() -> Iterator[list[str]]:
    """Records every tensor-to-Python conversion (a device-to-host sync on a GPU) made by package code."""
    packages = tuple(
        str(Path(module.__file__).resolve().parent) for module in (lightning_meta, lightning_meta.algorithms)
    ) + (str(Path(lightning_meta.datamodules.__file__).resolve().parent),)
    seen: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__")}

    def wrap(name: str, original):  # noqa: ANN001, ANN202
        def recorded(self, *args, **kwargs):  # noqa: ANN001, ANN202
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(packages):
                seen.append(f"{name} in {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return recorded

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
