"""ProtoNet's logits against a hand computation, and its misuse errors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meta.algorithms import ProtoNet

from conftest import classification_batch, regression_batch


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
    assert last.metrics["query_acc"] == 1.0


def test_evaluate_reports_post_only(classifier):
    figures = ProtoNet().evaluate(classifier, classification_batch().episode(0))
    assert set(figures) == {"loss_post", "acc_post"}


def test_refuses_regression(mlp_learner):
    with pytest.raises(ValueError, match="ProtoNet needs a classification task.*Use MAML, FOMAML or Reptile"):
        ProtoNet().meta_loss(mlp_learner, regression_batch())


def test_refuses_missing_class_in_support(classifier):
    episode = classification_batch(ways=3).episode(0)
    episode.support["y"] = torch.zeros_like(episode.support["y"])
    with pytest.raises(ValueError, match="every class present"):
        ProtoNet().task_loss(classifier, episode)


def test_bad_options():
    with pytest.raises(ValueError, match="distance must be"):
        ProtoNet(distance="manhattan")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ProtoNet(temperature=0)
