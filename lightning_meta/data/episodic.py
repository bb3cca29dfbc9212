"""The episodic datamodule base: a seeded, resumable training stream and fixed evaluation tasks."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_meta.data import stream
from lightning_meta.data.stream import PADDING
from lightning_meta.data.tasks import PADDING_KEY, Episode, TaskBatch
from lightning_meta.data.tokenization import check_tokenizer_record, tokenizer_record

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def task_generator(seed: int, split: str, *stream: int) -> torch.Generator:
    """A generator whose state depends only on ``(seed, split, *stream)`` (well mixed)."""
    state = np.random.SeedSequence([seed, _SPLIT_CODES[split], *stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class EpisodicDataModule(LightningDataModule, ABC):
    """Serves :class:`TaskBatch` es of ``meta_batch_size`` episodes.

    Training batch number ``i`` (the ``i``-th batch consumed since the start of training) is a pure
    function of ``(seed, rank, i)``: the stream is identical across runs and worker counts, each DDP rank
    draws different tasks, and a run resumed from a checkpoint (even mid-epoch) continues with
    exactly the batches the uninterrupted run would have seen. Validation and test tasks are
    drawn once from ``seed`` and are identical every epoch and every run.

    Subclasses implement :meth:`sample_episode`. Token sequences are padded per batch: each
    split of a batch is cut to its longest real sequence, rounded up to a multiple of 8
    (:meth:`TaskBatch.without_padding`), whatever length the episodes were drawn at.

    Args:
        meta_batch_size: episodes per training step.
        batches_per_epoch: training batches per epoch (the stream itself is unbounded).
        num_val_tasks: fixed validation episodes.
        num_test_tasks: fixed test episodes.
        eval_meta_batch_size: episodes per evaluation batch (default: ``meta_batch_size``).
        seed: seeds every task this datamodule draws.
        num_workers: ``DataLoader`` worker processes.
        allow_data_change: resume ``fit`` from a checkpoint trained on other data than this datamodule reads
            now (its :meth:`data_fingerprint` differs), with a warning, instead of refusing it.
    """

    def __init__(
        self,
        meta_batch_size: int = 4,
        batches_per_epoch: int = 100,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        allow_data_change: bool = False,
    ) -> None:
        super().__init__()
        for name, value in [
            ("meta_batch_size", meta_batch_size),
            ("batches_per_epoch", batches_per_epoch),
            ("num_val_tasks", num_val_tasks),
            ("num_test_tasks", num_test_tasks),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        self.meta_batch_size = meta_batch_size
        self.batches_per_epoch = batches_per_epoch
        self.num_val_tasks = num_val_tasks
        self.num_test_tasks = num_test_tasks
        self.eval_meta_batch_size = eval_meta_batch_size or meta_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.allow_data_change = allow_data_change
        self._resume_from = 0
        self._eval_batches: dict[str, list[TaskBatch]] = {}

    def data_fingerprint(self) -> str | None:
        """A fingerprint of the data this datamodule read (:func:`lightning_meta.data.stream.data_fingerprint`),
        recorded in checkpoints and compared when ``fit`` resumes; ``None`` (the default): its episodes are
        drawn from its options alone. Datamodules that read files or datasets return one of what they read."""
        return None

    @functools.cached_property
    def _data_fingerprint(self) -> str | None:  # the data never change within a run: computed once
        return self.data_fingerprint()

    @abstractmethod
    def sample_episode(self, generator: torch.Generator, split: str) -> Episode:
        """Draw one episode of ``split`` (``train``/``val``/``test``) using only ``generator``."""

    def train_batch(self, index: int, rank: int = 0) -> TaskBatch:
        """Training batch number ``index`` of the stream of ``rank``."""
        generator = task_generator(self.seed, "train", rank, index)
        episodes = [self.sample_episode(generator, "train") for _ in range(self.meta_batch_size)]
        return TaskBatch.stack(episodes).without_padding()

    def eval_batches(self, split: str) -> list[TaskBatch]:
        """The fixed validation or test tasks, in batches of ``eval_meta_batch_size``."""
        if split not in self._eval_batches:
            count = self.num_val_tasks if split == "val" else self.num_test_tasks
            generator = task_generator(self.seed, split)
            episodes = [self.sample_episode(generator, split) for _ in range(count)]
            size = self.eval_meta_batch_size
            self._eval_batches[split] = [
                TaskBatch.stack(episodes[i : i + size]).without_padding() for i in range(0, count, size)
            ]
        return self._eval_batches[split]

    def train_dataloader(self) -> DataLoader:
        stream.allow_mid_epoch_resume()
        rank, world = stream.rank_and_world(self)
        sampler = stream.StreamSampler(self.batches_per_epoch, self.next_train_batch, rank, world)
        return DataLoader(
            _TrainStream(self, rank),
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")

    def _eval_dataloader(self, split: str) -> DataLoader:
        batches = self.eval_batches(split)
        rank, world = stream.rank_and_world(self)
        # Each episode is evaluated by exactly one rank (repeats would skew the mean and CI); the
        # statistics are then gathered over all ranks. Ranks with one batch fewer run a padding batch
        # whose metrics are dropped.
        share = stream.rank_share(
            len(batches),
            rank,
            world,
            pad=True,
            what=f"{split} batches",
            fix=f"Raise num_{split}_tasks or lower eval_meta_batch_size (now {self.eval_meta_batch_size}).",
        )
        return DataLoader(
            _PaddedBatches(batches), batch_size=None, sampler=stream.IndexSampler(share, rank, world), num_workers=0
        )

    def next_train_batch(self) -> int:
        """The number of the next training batch to consume (:func:`lightning_meta.data.stream.next_train_batch`)."""
        return stream.next_train_batch(self, self._resume_from)

    def state_dict(self) -> dict[str, Any]:
        """The stream position (the number of the next training batch to consume), the fingerprint of the data
        read (:meth:`data_fingerprint`) and, for datamodules that tokenize (a ``tokenizer`` attribute naming
        one), the tokenizer's fingerprint."""
        state: dict[str, Any] = {"next_train_batch": self.next_train_batch()} | stream.data_state(
            self._data_fingerprint
        )
        tokenizer = getattr(self, "tokenizer", None)
        if isinstance(tokenizer, str):
            state |= tokenizer_record(tokenizer)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the stream; refuse a checkpoint trained on another tokenizer's token ids, or (resuming ``fit``)
        on other data unless ``allow_data_change``."""
        tokenizer = getattr(self, "tokenizer", None)
        if isinstance(tokenizer, str):
            check_tokenizer_record(state_dict, tokenizer, "The checkpoint's data")
        stream.check_saved_data(self, state_dict, lambda: self._data_fingerprint, self.allow_data_change)
        self._resume_from = int(state_dict["next_train_batch"])


class _TrainStream(Dataset):
    def __init__(self, datamodule: EpisodicDataModule, rank: int) -> None:
        self.datamodule = datamodule
        self.rank = rank

    def __getitem__(self, index: int) -> TaskBatch:
        return self.datamodule.train_batch(index, self.rank)


class _PaddedBatches(Dataset):
    def __init__(self, batches: list[TaskBatch]) -> None:
        self.batches = batches

    def __getitem__(self, index: int) -> TaskBatch:
        if index != PADDING:
            return self.batches[index]
        batch = self.batches[0]
        return TaskBatch(
            batch.support, batch.query, batch.ways, batch.shots, batch.metadata | {PADDING_KEY: [True] * len(batch)}
        )

    def __len__(self) -> int:
        return len(self.batches)
