"""Learners: a model, how a split becomes a loss, and which parameters are fast weights
(:mod:`~lightning_meta.learners.fast_weights`).

A learner runs its model *functionally* (``torch.func.functional_call``) over a dict of fast
weights, so adapted weights are plain tensors and the module itself is never copied or mutated.
Parameters that are not fast weights form the backbone: the inner loop leaves them alone, while
the outer loop still differentiates through them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_meta.data.tasks import GenerationRule, Split, TaskBatch

# Defined with the rule that uses them; importable from here as before.
from lightning_meta.learners.fast_weights import (  # noqa: F401, E402
    BATCH_NORMS,
    adapter_parameter_names,
    blocks_of,
    is_normalization,
    resolve_fast_weights,
)

FastWeights = dict[str, Tensor]


@dataclass
class DataCheck:
    """One property every episode of a batch must have.

    ``passed`` is a boolean tensor with one entry per episode (it stays on the device);
    ``problem`` and ``fix`` make the error message when an entry is false.
    """

    passed: Tensor
    problem: str
    fix: str


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class DataError(ValueError):
    """A task batch the learner cannot run on (non-finite values, unknown token ids, labels out of range)."""


class Learner(nn.Module, ABC):
    """Base learner.

    Args:
        model: the network; called as ``model(split[input_key])``.
        fast_weights: which parameters the inner loop adapts: ``"all"``, ``"head"`` (the module
            named by ``head``; ANIL), ``"last_blocks:N"`` (the last N entries of the model's
            largest ``nn.ModuleList``: transformer blocks, without the head), ``"biases_norms"``
            (biases and normalization weights), ``"lora"`` (LoRA adapter weights), or a list whose
            entries are these names or ``fnmatch`` globs over parameter names, taken together
            (``["last_blocks:1", "head"]``, ``["net.4.*"]``). Every learner reads it the same way.
        head: name of the head submodule for ``fast_weights="head"``; by default the last
            submodule that owns parameters.
        input_key: the split field fed to the model.
        target_key: the split field holding targets.
    """

    #: what the outputs are: ``"regression"``, ``"classification"`` or ``"language_modeling"``
    #: (:class:`~lightning_meta.CausalLMLearner`); algorithms check it (ProtoNet needs classes,
    #: MetaICL a language model).
    task_type: ClassVar[str]
    #: per-episode metrics :meth:`loss` and :meth:`evaluation_metrics` may report (``loss`` first);
    #: evaluation keeps statistics of each one a split reports.
    metric_names: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(
        self,
        model: nn.Module,
        fast_weights: str | list[str] = "all",
        head: str | None = None,
        input_key: str = "x",
        target_key: str = "y",
    ) -> None:
        super().__init__()
        self.model = model
        self.fast_weights = fast_weights
        self.head = head
        self.input_key = input_key
        self.target_key = target_key
        self.fast_weight_names = resolve_fast_weights(model, fast_weights, head)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model reads (its position embeddings); ``None``: no limit."""
        return None

    def fast_parameters(self) -> FastWeights:
        """The current fast weights (the meta-parameters the inner loop starts from)."""
        named = dict(self.model.named_parameters())
        return {name: named[name] for name in self.fast_weight_names}

    def forward(self, *args: Any, params: Mapping[str, Tensor] | None = None, **kwargs: Any) -> Any:
        """Run the model with ``params`` replacing the matching parameters (others unchanged).

        Tied weights (GPT-2's input and output embeddings) stay tied: replacing one replaces both.
        """
        if not params:
            return self.model(*args, **kwargs)
        return functional_call(self.model, dict(params), args, kwargs, strict=False, tie_weights=True)

    def predict(self, split: Split, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Model outputs for a split."""
        return self(split[self.input_key], params=params)

    def data_checks(self, split_name: str, split: Split) -> list[DataCheck]:
        """The checks one split of a :class:`TaskBatch` must pass (tensors shaped ``(episodes, ...)``).

        By default every floating-point field is finite. Learners add their own (token ids inside
        the vocabulary, labels inside the head).
        """
        return [
            DataCheck(
                torch.isfinite(tensor).flatten(1).all(1),
                f"{split_name}[{name!r}] holds NaN or infinite values",
                "clean or filter the data (NaN often comes from missing values in a table)",
            )
            for name, tensor in split.items()
            if tensor.is_floating_point()
        ]

    def rebuilt_weights(self) -> list[str]:
        """Names of the weights this learner's constructor restores by itself, so checkpoints leave them out.

        None by default; a learner built from a pretrained model lists its frozen weights (a LoRA base).
        """
        return []

    def check_data(self, batch: TaskBatch, extra: Sequence[DataCheck] = ()) -> None:
        """Raise :class:`DataError` naming the split, field and episode when ``batch`` fails a check.

        Called once per batch, before any inner step: the checks (:meth:`data_checks`, then
        ``extra``: the algorithm's) run on the device and cost one host sync together, however
        many there are. Sequences longer than :attr:`max_positions` are refused first (from the
        shape: no sync).
        """
        for split in (batch.support, batch.query):
            if self.input_key in split and not split[self.input_key].is_floating_point():
                check_sequence_length(
                    split[self.input_key].shape[-1],
                    self.max_positions,
                    "the batch's sequence length",
                    "lower the datamodule's max_length (or block_size)",
                )
        checks = [check for name in ("support", "query") for check in self.data_checks(name, getattr(batch, name))]
        checks += extra
        if not checks or bool(torch.stack([check.passed for check in checks]).all()):
            return
        for check in checks:
            failing = torch.nonzero(~check.passed).flatten().tolist()
            if failing:
                raise DataError(
                    f"Episode {failing[0]} of the batch ({len(failing)} of {len(check.passed)} episodes): "
                    f"{check.problem}. Fix: {check.fix}."
                )

    def vmap_refusal(self) -> str | None:
        """Why this learner's tasks cannot run in parallel under ``torch.func.vmap``; ``None`` if they can.

        vmap is exact for functional models; it is refused for modules that update buffers in
        place (batch-norm running statistics) or draw random numbers (dropout) in training mode.
        Learners whose model has data-dependent control flow say so here.
        """
        for name, module in self.model.named_modules():
            if not module.training:
                continue
            if isinstance(module, BATCH_NORMS) and module.track_running_stats:
                return f"{name or 'the model'} ({type(module).__name__}) updates its running statistics in place"
            if isinstance(module, _DROPOUTS) and module.p > 0:
                return f"{name} ({type(module).__name__}, p={module.p}) draws random numbers per task"
        return None

    def prepare_second_order(self) -> None:
        """Called by algorithms that differentiate through the inner loop (second-order MAML).

        Learners whose model has kernels without a double backward (fused attention) switch
        them off here, or raise a clear error.
        """

    @abstractmethod
    def loss(self, split: Split, params: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean loss over the split, and detached per-episode metrics (``metric_names``)."""

    def evaluation_metrics(
        self,
        split: Split,
        params: Mapping[str, Tensor] | None = None,
        *,
        parallel: bool = False,
        generation: GenerationRule | None = None,
    ) -> dict[str, Tensor]:
        """Detached metrics of a split at evaluation (no gradient): :meth:`loss`'s by default.

        Learners add here the metrics that cost more than the loss needs (exact match, scoring
        a classification task's options); evaluation and adaptation curves read this.
        ``parallel=True``: the call runs under ``torch.func.vmap`` (the episodes of an evaluation
        batch together), so the metrics must come without host syncs or shapes that depend on the data.
        ``generation``: how the episode's task cuts generated outputs (its metadata, :func:`generation_rule`); a
        learner that generates nothing ignores it.
        """
        with torch.no_grad():
            return self.loss(split, params)[1]


class RegressionLearner(Learner):
    """Mean squared error between ``model(x)`` and ``y``."""

    task_type = "regression"

    def loss(self, split: Split, params: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        prediction = self.predict(split, params)
        loss = F.mse_loss(prediction, split[self.target_key].to(prediction.dtype))
        return loss, {"loss": loss.detach()}


class ClassificationLearner(Learner):
    """Cross-entropy between ``model(x)`` logits and integer labels ``y``; also reports accuracy.

    For ProtoNet the model output is read as an embedding rather than logits.
    """

    task_type = "classification"
    metric_names = ("loss", "accuracy")

    def loss(self, split: Split, params: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.predict(split, params)
        return classification_loss(logits, split[self.target_key])

    def data_checks(self, split_name: str, split: Split) -> list[DataCheck]:
        """Finite values, and class labels that are integers >= 0 (cross-entropy would skip a label of -100 without
        a word, and fail on other negatives inside the loss). How many classes the model has is its own: the head's
        width (:class:`EncoderLearner` checks it) or, for ProtoNet, the episode's ways (ProtoNet checks those)."""
        checks = super().data_checks(split_name, split)
        labels = split.get(self.target_key)
        if labels is not None:
            if labels.is_floating_point():
                passed = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
            else:
                passed = (labels >= 0).flatten(1).all(1)
            checks.append(
                DataCheck(
                    passed,
                    f"{split_name}[{self.target_key!r}] holds class labels that are not integers >= 0",
                    "give each example its class as an integer 0..ways-1 (the episodic datamodules number the "
                    "classes of each episode so)",
                )
            )
        return checks


def check_sequence_length(length: int, positions: int | None, setting: str, fix: str) -> None:
    """Refuse sequences longer than the model has positions for (an ``IndexError`` deep inside it otherwise).

    The one rule for every learner and for pretraining: ``setting`` names the length (``max_length``),
    ``fix`` what to lower (``lower --data.init_args.max_length``); ``positions=None``: no limit.
    """
    if positions is not None and length > positions:
        raise ValueError(
            f"{setting}={length} is longer than the model's {positions} positions: {fix} to {positions} or less."
        )


def classification_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy and accuracy of ``logits`` (examples, classes) against integer ``labels``."""
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()
    return loss, {"loss": loss.detach(), "accuracy": accuracy.detach()}
