"""Task batches: a meta-batch of episodes, each with a support and a query split, and their padding.

The text fields a split may hold are named in :mod:`~lightning_meta.data.text_fields` and importable from here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_meta.data.text_fields import (
    ANSWER,
    CALIBRATION_FIELDS,
    CEILING,
    CHANCE,
    CHANNEL_FIELDS,
    CHANNEL_SEQUENCE_FIELDS,
    CHOICE_ATTENTION_MASK,
    CHOICE_CHARACTERS,
    CHOICE_FIELDS,
    CHOICE_INPUT_IDS,
    CHOICE_LABELS,
    CORRECT,
    CREDIT,
    DEMONSTRATION_FIELDS,
    IGNORE_INDEX,
    LABEL_WEIGHTS,
    MULTIPLE_CHOICE,
    OUTPUT_REGEX,
    POSITION_IDS,
    SEGMENT_IDS,
    STOP_STRING,
    TASK_PREFIX_LENGTH,
    Choices,
    GenerationRule,
    channel_sequences,
    generation_rule,
)

#: This module's names and the text fields' (defined in :mod:`~lightning_meta.data.text_fields`), importable from here.
__all__ = [
    "ANSWER",
    "CALIBRATION_FIELDS",
    "CEILING",
    "CHANCE",
    "CHANNEL_FIELDS",
    "CHANNEL_SEQUENCE_FIELDS",
    "CHOICE_ATTENTION_MASK",
    "CHOICE_CHARACTERS",
    "CHOICE_FIELDS",
    "CHOICE_INPUT_IDS",
    "CHOICE_LABELS",
    "CORRECT",
    "CREDIT",
    "Choices",
    "DEMONSTRATION_FIELDS",
    "Episode",
    "GenerationRule",
    "IGNORE_INDEX",
    "LABEL_WEIGHTS",
    "MASK_FIELDS",
    "MULTIPLE_CHOICE",
    "OUTPUT_REGEX",
    "PADDING_KEY",
    "PAD_TO_MULTIPLE_OF",
    "POSITION_IDS",
    "SEGMENT_IDS",
    "STOP_STRING",
    "Split",
    "TASK_PREFIX_LENGTH",
    "TOKEN_FIELDS",
    "TaskBatch",
    "channel_sequences",
    "generation_rule",
    "joined",
    "padded",
    "padded_length",
    "padding_fraction",
    "without_padding",
]

Split = Mapping[str, Tensor]
#: Metadata key of an evaluation batch that a rank runs only to match the other ranks' batch count
#: (FSDP forwards are collective); the host module does not count its metrics.
PADDING_KEY = "evaluation_padding"


#: The token-aligned fields of a split, by name, grouped under the mask they share positions with, each with
#: the value its padding positions hold (no token, no attention, no loss). :func:`without_padding` cuts and
#: :func:`padded` pads exactly these fields, where shaped like their mask: other fields are never cut, even
#: when their shape happens to match (``correct`` with as many options as token positions).
TOKEN_FIELDS: dict[str, dict[str, int]] = {
    "attention_mask": {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX},
    CHOICE_ATTENTION_MASK: {CHOICE_INPUT_IDS: 0, CHOICE_ATTENTION_MASK: 0, CHOICE_LABELS: IGNORE_INDEX},
    **{
        fields[1]: dict(zip(fields, (0, 0, IGNORE_INDEX), strict=True))
        for fields in (CALIBRATION_FIELDS, CHANNEL_FIELDS, CHANNEL_SEQUENCE_FIELDS)
    },
    DEMONSTRATION_FIELDS[1]: dict(zip(DEMONSTRATION_FIELDS, (0, 0), strict=True)),
}
#: Mask fields of a split (the keys of :data:`TOKEN_FIELDS`).
MASK_FIELDS = tuple(TOKEN_FIELDS)
#: Batches are padded to a multiple of this many positions: aligned shapes suit the matrix kernels, and
#: fewer distinct shapes keep allocator caches and compiled kernels reusable.
PAD_TO_MULTIPLE_OF = 8


def padded_length(longest: int, limit: int | None = None) -> int:
    """``longest`` rounded up to a multiple of :data:`PAD_TO_MULTIPLE_OF` (at least one), at most ``limit``."""
    length = -(-max(longest, 1) // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    return length if limit is None else min(length, limit)


def _token_fields(split: Mapping[str, Tensor], mask_name: str) -> dict[str, int]:
    """The fields of ``split`` aligned with its mask ``mask_name`` (:data:`TOKEN_FIELDS`), with their padding values."""
    if mask_name not in split:
        return {}
    shape = split[mask_name].shape
    return {
        name: value for name, value in TOKEN_FIELDS[mask_name].items() if name in split and split[name].shape == shape
    }


def without_padding(split: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``split`` with its token positions past the last real token of every sequence cut off.

    Each mask field and its token-aligned fields (:data:`TOKEN_FIELDS`, by name) keep
    :func:`padded_length` of the longest real sequence (the last position the mask marks in
    any row), so the tensors of a meta-batch still stack and the cut is the same for every
    episode. Real tokens, and so every loss and figure, are unchanged: the cut positions are
    padding in every row. Runs on the host, where batches are collated.
    """
    trimmed = dict(split)
    for mask_name in MASK_FIELDS:
        mask = split.get(mask_name)
        if mask is None:
            continue
        real = torch.nonzero(mask.flatten(0, -2).any(0)).flatten()
        length = padded_length(int(real[-1]) + 1 if len(real) else 0, mask.shape[-1])
        for name in _token_fields(split, mask_name):
            trimmed[name] = split[name][..., :length].contiguous()
    return trimmed


def padded(split: Mapping[str, Tensor], widths: Mapping[str, int]) -> dict[str, Tensor]:
    """``split`` with the token-aligned fields of each mask in ``widths`` padded at the end to that many positions.

    ``widths`` maps a mask field (:data:`MASK_FIELDS`) to a width at least its own; the new positions
    are padding (:data:`TOKEN_FIELDS`' values), so every loss and figure is unchanged. The inverse of
    :func:`without_padding`; :func:`joined` pads two splits to one width with it.
    """
    extended = dict(split)
    for mask_name, width in widths.items():
        for name, value in _token_fields(split, mask_name).items():
            tensor = split[name]
            extended[name] = torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1]), value=value)
    return extended


def joined(first: Split, second: Split) -> dict[str, Tensor]:
    """The examples of ``first`` and then ``second`` as one split (the fields both have).

    Token-aligned fields (:data:`TOKEN_FIELDS`) are padded to the wider split's width first, so the
    splits join whatever their widths, and a loss over the joined split (a token mean) is the one
    over both splits' examples together, as if they had been collated at one width. Other fields
    must agree in shape past the examples. Works under ``torch.func.vmap`` (no host sync).
    """
    shared = [name for name in first if name in second]
    widths = {mask: max(first[mask].shape[-1], second[mask].shape[-1]) for mask in MASK_FIELDS if mask in shared}
    first, second = padded(first, widths), padded(second, widths)
    for name in shared:
        if first[name].shape[1:] != second[name].shape[1:]:
            raise ValueError(
                f"The splits cannot be joined: field {name!r} is shaped {tuple(first[name].shape)} in one and "
                f"{tuple(second[name].shape)} in the other (past the examples, only token positions may differ). "
                "Give both splits the same shapes."
            )
    return {name: torch.cat([first[name], second[name]]) for name in shared}


def padding_fraction(*masks: Tensor) -> Tensor:
    """The share of padded positions among all positions of ``masks`` (a 0-dim tensor; no host sync)."""
    real = sum(mask.count_nonzero() for mask in masks)
    return 1 - real / sum(mask.numel() for mask in masks)


@dataclass
class Episode:
    """One task: ``support`` is what adaptation sees, ``query`` what the adapted model is judged on.

    Each split maps a field name (``x``/``y``, or ``input_ids``/``attention_mask``/``labels``) to a
    tensor whose first dimension indexes the examples of the split.
    """

    support: dict[str, Tensor]
    query: dict[str, Tensor]
    ways: int | None = None
    shots: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskBatch:
    """A meta-batch of episodes stacked along a leading dimension.

    ``support[name]`` has shape ``(meta_batch_size, n_support, ...)`` and ``query[name]`` shape
    ``(meta_batch_size, n_query, ...)``. ``ways``/``shots`` describe every episode of the batch
    (``ways`` is ``None`` for regression); ``metadata`` holds per-episode values (a task id, the
    sinusoid's amplitude, ...), each a tensor or list with ``meta_batch_size`` entries.

    Lightning moves it to the device like any dataclass of tensors.
    """

    support: dict[str, Tensor]
    query: dict[str, Tensor]
    ways: int | None = None
    shots: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split_name in ("support", "query"):
            split = getattr(self, split_name)
            if not split:
                raise ValueError(f"TaskBatch.{split_name} has no fields: give it at least one tensor.")
            for name, tensor in split.items():
                if tensor.dim() < 2:
                    raise ValueError(
                        f"TaskBatch.{split_name}[{name!r}] has shape {tuple(tensor.shape)}; expected "
                        "(meta_batch_size, examples, ...). Stack episodes along a new first dimension."
                    )
            sizes = {name: tuple(tensor.shape[:2]) for name, tensor in split.items()}
            if len(set(sizes.values())) != 1:
                raise ValueError(f"TaskBatch.{split_name} fields disagree on (meta_batch, examples): {sizes}")
            if next(iter(sizes.values()))[1] == 0:
                raise ValueError(
                    f"TaskBatch.{split_name} is empty (0 examples per episode). Every episode needs at least "
                    f"one {split_name} example: raise shots/queries or check the dataset."
                )
        if self.support_size[0] != self.query_size[0]:
            raise ValueError(
                f"TaskBatch has {self.support_size[0]} support episodes but {self.query_size[0]} query episodes."
            )

    @property
    def support_size(self) -> tuple[int, int]:
        return tuple(next(iter(self.support.values())).shape[:2])  # type: ignore[return-value]

    @property
    def query_size(self) -> tuple[int, int]:
        return tuple(next(iter(self.query.values())).shape[:2])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.support_size[0]

    def episode(self, index: int) -> Episode:
        """The ``index``-th episode of the meta-batch (views, no copies)."""
        return Episode(
            support={name: tensor[index] for name, tensor in self.support.items()},
            query={name: tensor[index] for name, tensor in self.query.items()},
            ways=self.ways,
            shots=self.shots,
            metadata={name: values[index] for name, values in self.metadata.items()},
        )

    def episodes(self) -> Iterator[Episode]:
        for index in range(len(self)):
            yield self.episode(index)

    def without_padding(self) -> TaskBatch:
        """This batch with each split cut to its longest real sequence (:func:`without_padding`)."""
        return TaskBatch(
            without_padding(self.support), without_padding(self.query), self.ways, self.shots, self.metadata
        )

    def padding_fraction(self) -> Tensor | None:
        """The share of padded token positions in the support and query (``None`` without ``attention_mask``)."""
        masks = [split["attention_mask"] for split in (self.support, self.query) if "attention_mask" in split]
        return padding_fraction(*masks) if masks else None

    def detached_clone(self) -> TaskBatch:
        """A copy made of ordinary tensors.

        Lightning builds evaluation batches under ``torch.inference_mode()``; such tensors cannot
        be saved for backward, which the inner loop needs. Call this inside
        ``torch.inference_mode(False)``.
        """
        return TaskBatch(
            support={name: tensor.clone() for name, tensor in self.support.items()},
            query={name: tensor.clone() for name, tensor in self.query.items()},
            ways=self.ways,
            shots=self.shots,
            metadata={
                name: values.clone() if isinstance(values, Tensor) else values for name, values in self.metadata.items()
            },
        )

    @staticmethod
    def stack(episodes: list[Episode]) -> TaskBatch:
        """Stack episodes with identical shapes into a meta-batch."""
        if not episodes:
            raise ValueError("TaskBatch.stack needs at least one episode.")
        first = episodes[0]
        metadata: dict[str, Any] = {}
        for name in first.metadata:
            values = [episode.metadata[name] for episode in episodes]
            metadata[name] = torch.stack(values) if isinstance(values[0], Tensor) else values
        return TaskBatch(
            support={name: torch.stack([e.support[name] for e in episodes]) for name in first.support},
            query={name: torch.stack([e.query[name] for e in episodes]) for name in first.query},
            ways=first.ways,
            shots=first.shots,
            metadata=metadata,
        )
