"""Prototypical Networks."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_meta.data.tasks import Episode, Split, TaskBatch
from lightning_meta.learners.base import DataCheck, Learner, classification_loss
from lightning_meta.training.algorithm import MetaAlgorithm


class ProtoNet(MetaAlgorithm):
    """Prototypical Networks: Snell, Swersky & Zemel, "Prototypical Networks for Few-shot
    Learning", NeurIPS 2017.

    The model output is an embedding. Class prototypes are the means of the support embeddings
    of each class, c_k = mean_{i: y_i = k} f(x_i); a query is classified by
    softmax(−d(f(x), c_k) / temperature). The meta-loss is the query cross-entropy; there is no
    inner loop, so "adaptation" is computing the prototypes.

    Args:
        distance: ``"squared_euclidean"`` (the paper) or ``"cosine"`` (logits are cosine
            similarities divided by ``temperature``).
        temperature: divides the logits; smaller sharpens the softmax.

    Example::

        from lightning_meta.algorithms import ProtoNet
        protonet = ProtoNet(distance="squared_euclidean")
        protonet.meta_loss(learner, task_batch).loss.backward()   # learner: ClassificationLearner
        logits = protonet.logits(learner, episode.support, episode.query)
    """

    def __init__(
        self, distance: Literal["squared_euclidean", "cosine"] = "squared_euclidean", temperature: float = 1.0
    ) -> None:
        super().__init__()
        if distance not in ("squared_euclidean", "cosine"):
            raise ValueError(f"distance must be 'squared_euclidean' or 'cosine', got {distance!r}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.distance = distance
        self.temperature = temperature

    def check_learner(self, learner: Learner) -> None:
        if learner.task_type != "classification":
            raise ValueError(
                f"ProtoNet needs a classification task (integer class labels per episode), but the learner "
                f"is a {type(learner).__name__} for {learner.task_type}. Use MAML, FOMAML or Reptile for "
                "regression, or a ClassificationLearner whose model outputs embeddings."
            )

    def vmap_refusal(self, learner: Learner) -> str | None:
        return (
            "ProtoNet counts each episode's classes with torch.bincount, whose output size vmap cannot batch; "
            "with no inner loop, running the episodes one by one costs little"
        )

    def data_checks(self, learner: Learner, batch: TaskBatch) -> list[DataCheck]:
        """Support labels 0..ways-1 with every class present, in every episode (on the device)."""
        labels = batch.support[learner.target_key].flatten(1)
        episodes, shots = labels.shape
        width = max(batch.ways or 0, shots)  # every class needs a shot: more ways than shots fails below
        inside = (labels >= 0) & (labels < (batch.ways or width))
        counts = torch.zeros(episodes, width, dtype=torch.long, device=labels.device)
        counts = counts.scatter_add(1, labels.clamp(0, width - 1).long(), torch.ones_like(labels, dtype=torch.long))
        ways = batch.ways if batch.ways is not None else labels.amax(1, keepdim=True) + 1
        required = torch.arange(width, device=labels.device) < ways
        ways_text = f"0..{batch.ways - 1}" if batch.ways is not None else "0..max"
        return [
            DataCheck(
                inside.all(1) & ((counts > 0) | ~required).all(1),
                f"ProtoNet needs support labels {ways_text} with every class present",
                "remap labels per episode and give each class at least one shot",
            )
        ]

    def prototypes(self, learner: Learner, support: Split, ways: int | None = None) -> Tensor:
        """Class prototypes (ways, embedding_dim) from the support embeddings.

        Without ``ways`` it is read from the labels and they are checked here (a host sync). With
        ``ways`` the labels must be 0..ways-1, every class present (the meta-step checks its batch
        once, :meth:`data_checks`, and passes the episode's ways: nothing syncs per episode).
        """
        labels = support[learner.target_key]
        if ways is None:
            ways = int(labels.max()) + 1
            counts = torch.bincount(labels, minlength=ways)
            if labels.min() < 0 or (counts == 0).any():
                raise ValueError(
                    f"ProtoNet needs support labels 0..{ways - 1} with every class present; got counts "
                    f"{counts.tolist()}. Remap labels per episode and give each class at least one shot."
                )
        return self._prototypes(learner, support, ways)[0]

    def _prototypes(self, learner: Learner, support: Split, ways: int) -> tuple[Tensor, Tensor]:
        """Prototypes (ways, embedding_dim) and the support count of each class (0: no prototype)."""
        labels = support[learner.target_key]
        counts = torch.bincount(labels, minlength=ways)
        embeddings = learner.predict(support)
        sums = torch.zeros(ways, embeddings.shape[-1], dtype=embeddings.dtype, device=embeddings.device)
        sums = sums.index_add(0, labels, embeddings)
        return sums / counts.clamp_min(1).unsqueeze(-1).to(embeddings.dtype), counts

    def logits(self, learner: Learner, support: Split, query: Split, ways: int | None = None) -> Tensor:
        """Query logits (n_query, ways) against the support prototypes."""
        return self._distances(self.prototypes(learner, support, ways), learner.predict(query))

    def _distances(self, prototypes: Tensor, embeddings: Tensor) -> Tensor:
        if self.distance == "cosine":
            return F.cosine_similarity(embeddings.unsqueeze(1), prototypes.unsqueeze(0), dim=-1) / self.temperature
        return -(embeddings.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1) / self.temperature

    def _episode_logits(self, learner: Learner, episode: Episode) -> Tensor:
        """Query logits of an episode whose batch passed :meth:`data_checks`, with no host sync. Without the
        episode's ways there is a column per support example; the classes no support example has (above
        its largest label, by the check) score -inf."""
        if episode.ways is not None:
            prototypes, _ = self._prototypes(learner, episode.support, episode.ways)
            return self._distances(prototypes, learner.predict(episode.query))
        width = episode.support[learner.target_key].shape[0]
        prototypes, counts = self._prototypes(learner, episode.support, width)
        return self._distances(prototypes, learner.predict(episode.query)).masked_fill(counts == 0, -torch.inf)

    def task_loss(
        self, learner: Learner, episode: Episode, *, parallel: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss, metrics = classification_loss(self._episode_logits(learner, episode), episode.query[learner.target_key])
        return loss, {f"query_{name}": value for name, value in metrics.items()}

    def evaluate(self, learner: Learner, episode: Episode, steps: int | None = None) -> dict[str, Tensor]:
        self.check_learner(learner)
        with torch.no_grad():
            _, metrics = self.task_loss(learner, episode)
        return {f"{name.removeprefix('query_')}_post": value for name, value in metrics.items()}

    def predict(self, learner: Learner, episode: Episode, steps: int | None = None) -> Tensor:
        with torch.no_grad():
            return self._episode_logits(learner, episode)
