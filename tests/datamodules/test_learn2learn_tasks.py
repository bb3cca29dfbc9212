"""learn2learn-style tasksets as a datamodule, with a stand-in for learn2learn's TaskDataset."""

from __future__ import annotations

import random
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_meta import ClassificationLearner, MetaLearningModule
from lightning_meta.algorithms import MAML, ProtoNet
from lightning_meta.datamodules import Learn2LearnDataModule


class StandInTaskset:
    """Like ``TaskDataset(dataset, [NWays(ways), KShots(samples), LoadData, ...])``: each ``sample()``
    draws ``ways`` of ``classes`` with Python's and torch's global generators and returns
    ``(data, labels)`` with the original class ids, in a shuffled order. Feature 0 of each example is
    its class id, so tests can check that data and labels stay together.
    """

    def __init__(self, classes: list[int], ways: int = 3, samples: int = 4, features: int = 5) -> None:
        self.classes, self.ways, self.samples, self.features = classes, ways, samples, features

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = random.sample(self.classes, self.ways)
        labels = torch.tensor(chosen).repeat_interleave(self.samples)
        data = torch.randn(len(labels), self.features) + labels.unsqueeze(1).float()
        data[:, 0] = labels.float()
        order = torch.randperm(len(labels))
        return data[order], labels[order]


def tasksets(ways: int = 3, samples: int = 4) -> SimpleNamespace:
    """What ``learn2learn.vision.benchmarks.get_tasksets`` returns: ``.train``, ``.validation``, ``.test``."""
    return SimpleNamespace(
        train=StandInTaskset(list(range(0, 20)), ways, samples),
        validation=StandInTaskset(list(range(20, 30)), ways, samples),
        test=StandInTaskset(list(range(30, 40)), ways, samples),
    )


def datamodule(**overrides) -> Learn2LearnDataModule:
    options = dict(ways=3, shots=1, meta_batch_size=2, batches_per_epoch=4, num_val_tasks=4, num_test_tasks=6)
    return Learn2LearnDataModule.from_tasksets(tasksets(), **(options | overrides))


def test_episodes_are_well_formed_with_labels_remapped():
    dm = datamodule(shots=1)
    for split, batches in (("train", [dm.train_batch(0)]), ("test", dm.eval_batches("test"))):
        for episode in (e for batch in batches for e in batch.episodes()):
            assert episode.support["x"].shape == (3, 5) and episode.query["x"].shape == (9, 5)  # 1 shot, 3 queries
            assert episode.support["y"].tolist() == [0, 1, 2]
            assert episode.query["y"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
            classes = episode.metadata["classes"]
            assert (classes >= 30).all() == (split == "test")
            for part in (episode.support, episode.query):  # each example keeps its own class
                assert torch.equal(part["x"][:, 0].long(), classes[part["y"]])
            support_rows = {tuple(row) for row in episode.support["x"].tolist()}
            assert not support_rows & {tuple(row) for row in episode.query["x"].tolist()}


def test_queries_argument_takes_that_many_after_the_support():
    episode = datamodule(shots=2, queries=1).train_batch(0).episode(0)
    assert episode.support["x"].shape[0] == 6 and episode.query["x"].shape[0] == 3


def test_episodes_are_seeded_fixed_and_leave_global_generators_alone():
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    first, second = datamodule(), datamodule()
    for split in ("val", "test"):
        for a, b in zip(first.eval_batches(split), second.eval_batches(split), strict=True):
            assert torch.equal(a.support["x"], b.support["x"]) and torch.equal(a.query["y"], b.query["y"])
    assert torch.equal(first.train_batch(3).query["x"], second.train_batch(3).query["x"])
    assert not torch.equal(first.train_batch(3).query["x"], first.train_batch(3, rank=1).query["x"])
    assert not torch.equal(first.train_batch(3).query["x"], datamodule(seed=1).train_batch(3).query["x"])
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


def test_worker_count_does_not_change_the_stream():
    def stream(workers: int) -> list[torch.Tensor]:
        return [batch.support["x"] for batch in datamodule(num_workers=workers).train_dataloader()]

    assert all(torch.equal(a, b) for a, b in zip(stream(0), stream(2), strict=True))


@pytest.mark.parametrize("algorithm", [ProtoNet(), MAML(inner_lr=0.3)])
def test_meta_trains_through_the_host_module(algorithm):
    torch.manual_seed(0)
    outputs = 16 if isinstance(algorithm, ProtoNet) else 3
    model = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, outputs))
    module = MetaLearningModule(ClassificationLearner(model), algorithm)
    sets = tasksets()
    dm = Learn2LearnDataModule(sets.train, None, sets.test, ways=3, shots=1, meta_batch_size=2, num_test_tasks=6)
    options = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    L.Trainer(max_steps=3, **options).fit(module, dm)  # no validation taskset: validation is skipped
    (results,) = L.Trainer(**options).test(module, dm, verbose=False)
    assert 0 <= results["test/query_accuracy_post"] <= 1 and "test/query_accuracy_post_ci95" in results


def test_bad_tasksets_name_the_fix():
    with pytest.raises(TypeError, match=r"train taskset \(list\) has no sample\(\) method"):
        Learn2LearnDataModule(train=[1, 2, 3])
    with pytest.raises(ValueError, match=r"episode with 3 classes, but ways=5\. Build it with NWays\(dataset, 5\)"):
        datamodule(ways=5).train_batch(0)
    with pytest.raises(ValueError, match=r"\[4, 4, 4\] examples; each class needs shots \+ queries = 3 \+ 2.*KShots"):
        datamodule(shots=3, queries=2).train_batch(0)
    with pytest.raises(ValueError, match=r"each class needs shots \+ queries = 4 \+ the same number of queries"):
        datamodule(shots=4).train_batch(0)
