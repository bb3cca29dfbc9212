"""Episodes from learn2learn-style tasksets, so existing learn2learn task pipelines train here.

learn2learn is not imported: any object whose ``sample()`` returns ``(data, labels)`` for one
episode works, such as the ``train``/``validation``/``test`` tasksets of
``learn2learn.vision.benchmarks.get_tasksets("omniglot", train_ways=5, train_samples=2 * shots, ...)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from lightning_meta.data.episodic import EpisodicDataModule
from lightning_meta.data.tasks import Episode, TaskBatch


@runtime_checkable
class Taskset(Protocol):
    """What this datamodule needs of a taskset: ``sample()`` gives one episode's ``(data, labels)``."""

    def sample(self) -> tuple[Any, Any]: ...


class Learn2LearnDataModule(EpisodicDataModule):
    """N-way K-shot episodes drawn from learn2learn-style tasksets.

    Each ``sample()`` must return ``ways`` classes with at least ``shots + queries`` examples each
    (learn2learn: ``NWays(dataset, ways)``, ``KShots(dataset, shots + queries)``). The examples of
    each class are split in the order the taskset gives them: the first ``shots`` are the support,
    the next ``queries`` the query. Classes are relabelled 0..ways-1 in a random order. Splits hold
    ``x`` (the data) and ``y`` (labels), as :class:`~lightning_meta.ClassificationLearner` expects.

    Tasksets draw from Python's, NumPy's and torch's global generators; each ``sample()`` call
    runs with those generators seeded from this datamodule's seeded stream (and restored after),
    so training batches are a function of ``(seed, rank, batch index)`` and validation/test
    episodes are fixed, exactly as in :class:`EpisodicDataModule`. That holds for tasksets that keep
    no state between calls (learn2learn's default ``num_tasks=-1``).

    Args:
        train: the meta-training taskset.
        validation: the validation taskset, or ``None`` for no validation episodes.
        test: the test taskset, or ``None`` for no test episodes.
        ways: classes per episode (checked against every sample).
        shots: support examples per class.
        queries: query examples per class; ``None``: all examples after the support (must then be
            the same number for every class).
        others: ``meta_batch_size``, ``batches_per_epoch``, ``num_val_tasks``, ``num_test_tasks``,
            ``eval_meta_batch_size``, ``seed``, ``num_workers``, ``allow_data_change``: see
            :class:`EpisodicDataModule`.

    Example::

        import learn2learn as l2l
        tasksets = l2l.vision.benchmarks.get_tasksets("omniglot", train_ways=5, train_samples=2,
                                                        test_ways=5, test_samples=2, root="~/data")
        datamodule = Learn2LearnDataModule.from_tasksets(tasksets, ways=5, shots=1)
    """

    def __init__(
        self,
        train: Taskset,
        validation: Taskset | None = None,
        test: Taskset | None = None,
        ways: int = 5,
        shots: int = 1,
        queries: int | None = None,
        meta_batch_size: int = 4,
        batches_per_epoch: int = 100,
        num_val_tasks: int = 100,
        num_test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        allow_data_change: bool = False,
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
        for name, taskset in (("train", train), ("validation", validation), ("test", test)):
            if taskset is not None and not callable(getattr(taskset, "sample", None)):
                raise TypeError(
                    f"The {name} taskset ({type(taskset).__name__}) has no sample() method. Give a learn2learn "
                    "TaskDataset (or any object whose sample() returns (data, labels) for one episode)."
                )
        if ways < 2 or shots < 1 or (queries is not None and queries < 1):
            raise ValueError(f"Need ways >= 2, shots >= 1 and queries >= 1 or None; got {ways}, {shots}, {queries}.")
        self.train = train
        self.validation = validation
        self.test = test
        self.ways = ways
        self.shots = shots
        self.queries = queries

    @classmethod
    def from_tasksets(cls, tasksets: Any, **options: Any) -> Learn2LearnDataModule:
        """From an object with ``train``, ``validation`` and ``test`` tasksets (learn2learn's ``get_tasksets``)."""
        return cls(tasksets.train, tasksets.validation, tasksets.test, **options)

    def eval_batches(self, split: str) -> list[TaskBatch]:
        if self._taskset(split) is None:
            return []  # Lightning then skips the split
        return super().eval_batches(split)

    def sample_episode(self, generator: torch.Generator, split: str) -> Episode:
        taskset = self._taskset(split)
        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        with _seeded_global_generators(seed):
            data, labels = taskset.sample()
        data, labels = torch.as_tensor(data), torch.as_tensor(labels)
        classes, inverse = torch.unique(labels, return_inverse=True)
        if len(classes) != self.ways:
            raise ValueError(
                f"The {split} taskset gave an episode with {len(classes)} classes, but ways={self.ways}. Build it "
                f"with NWays(dataset, {self.ways}), or set ways={len(classes)}."
            )
        counts = torch.bincount(inverse, minlength=self.ways)
        if counts.min() < self.shots + (self.queries or 1) or (self.queries is None and (counts != counts[0]).any()):
            needed = f"{self.shots} + {self.queries}" if self.queries else f"{self.shots} + the same number of queries"
            raise ValueError(
                f"The {split} taskset gave classes {classes.tolist()} {counts.tolist()} examples; each class needs "
                f"shots + queries = {needed}. Build the taskset with "
                f"KShots(dataset, {self.shots + (self.queries or self.shots)}), or lower shots/queries."
            )
        query_size = self.queries if self.queries is not None else int(counts[0]) - self.shots
        rows = [torch.nonzero(inverse == index).flatten() for index in range(self.ways)]
        relabel = torch.randperm(self.ways, generator=generator)  # original class index -> episode label
        order = torch.argsort(relabel)  # new label k belongs to the class at position order[k]
        support = torch.cat([rows[i][: self.shots] for i in order.tolist()])
        query = torch.cat([rows[i][self.shots : self.shots + query_size] for i in order.tolist()])
        return Episode(
            support={"x": data[support], "y": relabel[inverse[support]]},
            query={"x": data[query], "y": relabel[inverse[query]]},
            ways=self.ways,
            shots=self.shots,
            metadata={"classes": classes[order]},
        )

    def _taskset(self, split: str) -> Taskset | None:
        return {"train": self.train, "val": self.validation, "test": self.test}[split]


@contextmanager
def _seeded_global_generators(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global generators; restore their states afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
