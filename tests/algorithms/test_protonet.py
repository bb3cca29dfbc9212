"""ProtoNet's logits against a hand computation, and its misuse errors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meta import TaskBatch
from lightning_meta.algorithms import ProtoNet
from lightning_meta.learners.base import DataError

from conftest import classification_batch, host_syncs_from_the_package, regression_batch


@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
def test_logits_match_hand_computation(classifier, distance):
    episode = classification_batch().episode(0)
    protonet = ProtoNet(distance=distance, temperature=0.5)
    logits = protonet.logits(classifier, episode.support, episode.query, episode.ways)

    with torch.no_grad():
        support_embeddings = classifier.model(episode.support["x"])
        query_embeddings = classifier.model(episode.query["x"])
    expected = torch.empty(len(query_embeddings), episode.ways, dtype=torch.float64)
    for k in range(episode.ways):
        members = [support_embeddings[i] for i in range(len(support_embeddings)) if episode.support["y"][i] == k]
        prototype = sum(members) / len(members)
        for q, embedding in enumerate(query_embeddings):
            if distance == "squared_euclidean":
                expected[q, k] = -sum((embedding[d] - prototype[d]) ** 2 for d in range(len(embedding))) / 0.5
            else:
                dot = sum(embedding[d] * prototype[d] for d in range(len(embedding)))
                norms = math.sqrt(sum(v * v for v in embedding)) * math.sqrt(sum(v * v for v in prototype))
                expected[q, k] = dot / norms / 0.5
    torch.testing.assert_close(logits.detach(), expected)


def test_meta_loss_is_query_cross_entropy_and_learns(classifier):
    batch = classification_batch(meta_batch_size=4)
    protonet = ProtoNet()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=0.01)
    first = protonet.meta_loss(classifier, batch)
    for _ in range(30):
        optimizer.zero_grad()
        protonet.meta_loss(classifier, batch).loss.backward()
        optimizer.step()
    last = protonet.meta_loss(classifier, batch)
    assert last.loss < first.loss
    assert last.metrics["query_accuracy"] == 1.0


def test_evaluate_reports_post_only(classifier):
    figures = ProtoNet().evaluate(classifier, classification_batch().episode(0))
    assert set(figures) == {"loss_post", "accuracy_post"}


def test_refuses_regression(mlp_learner):
    with pytest.raises(ValueError, match="ProtoNet needs a classification task.*Use MAML, FOMAML or Reptile"):
        ProtoNet().meta_loss(mlp_learner, regression_batch())


def test_bad_support_labels_are_refused_once_per_batch_naming_the_episode(classifier):
    batch = classification_batch(meta_batch_size=3, ways=3)
    missing = batch.support["y"].clone()
    missing[1] = torch.where(missing[1] == 2, 0, missing[1])  # episode 1: class 2 has no shot
    for labels, episode in [(missing, 1), (batch.support["y"].clone().index_fill_(0, torch.tensor([2]), 3), 2)]:
        bad = TaskBatch(support={**batch.support, "y": labels}, query=batch.query, ways=3, shots=batch.shots)
        with pytest.raises(
            DataError,
            match=rf"Episode {episode} of the batch \(1 of 3 episodes\): ProtoNet needs "
            r"support labels 0\.\.2 with every class present\. Fix: remap labels per episode",
        ):
            ProtoNet().meta_loss(classifier, bad)
    # Without the batch's ways, every class up to the episode's largest label must be present.
    labels = batch.support["y"].clone()
    labels[0] = torch.where(labels[0] == 1, 2, labels[0])  # episode 0: labels {0, 2}
    unnamed = TaskBatch(support={**batch.support, "y": labels}, query=batch.query, shots=batch.shots)
    with pytest.raises(DataError, match=r"Episode 0 of the batch \(1 of 3 episodes\): .*labels 0\.\.max"):
        ProtoNet().meta_loss(classifier, unnamed)
    # Called directly on one episode without ways, the labels are checked there.
    episode = unnamed.episode(0)
    with pytest.raises(ValueError, match=r"every class present; got counts \[2, 0, 4\]"):
        ProtoNet().logits(classifier, episode.support, episode.query)


def test_the_meta_step_syncs_once_per_batch_not_per_episode(classifier):
    batch = classification_batch(meta_batch_size=4, ways=3)
    unnamed = TaskBatch(support=batch.support, query=batch.query, shots=batch.shots)  # ways not given
    losses = []
    for each in (batch, unnamed):
        with host_syncs_from_the_package() as syncs:
            losses.append(ProtoNet().meta_loss(classifier, each, meta_batch="task_by_task"))
        assert len(syncs) == 1, syncs  # the batch's data check
    # Without ways, the classes no support example has score -inf: the same loss and gradient.
    torch.testing.assert_close(losses[1].loss, losses[0].loss)
    first = torch.autograd.grad(losses[0].loss, list(classifier.parameters()))
    second = torch.autograd.grad(losses[1].loss, list(classifier.parameters()))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


def test_bad_options():
    with pytest.raises(ValueError, match="distance must be"):
        ProtoNet(distance="manhattan")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ProtoNet(temperature=0)
