"""Resumable training streams and evenly split evaluation: the rules every datamodule follows.

A datamodule's training batch number ``i`` is the ``i``-th batch the fit loop consumes since the
start of training, whatever Lightning counts as an epoch; the datamodule saves the number of the
next one (and the fingerprints of the tokenizer its token ids come from and of the data it read) in its
``state_dict``, so a resumed run continues with exactly the batches the uninterrupted run would have seen,
or is refused when the data changed (:func:`check_saved_data`).
Evaluation batches are dealt out to the processes so that each runs as many (under FSDP every
forward is a collective, and unequal counts hang), and no batch is counted twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DistributedSampler

from lightning_meta._compat import batches_consumed

#: The index of a padding batch in a process's share (:func:`rank_share` with ``pad=True``).
PADDING = -1


def allow_mid_epoch_resume() -> None:
    """Silence Lightning's warning about resuming inside an epoch: the datamodule's ``state_dict``
    restores the stream, which Lightning's check for resumable *dataloaders* does not see."""
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")


def rank_and_world(datamodule: LightningDataModule) -> tuple[int, int]:
    """``(global rank, world size)`` of the datamodule's trainer; ``(0, 1)`` without one."""
    trainer = datamodule.trainer
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def next_train_batch(datamodule: LightningDataModule, resumed: int) -> int:
    """The number of the next training batch to consume: the batches the fit loop has taken so far
    (``resumed``, the position loaded from a checkpoint, without a trainer).

    Counted from the loop's progress, not from epochs or yielded batches: a run that stopped at
    ``max_steps`` inside an epoch ends that epoch for Lightning, ``limit_train_batches`` shortens
    epochs, and Lightning fetches batches ahead of the one it runs.
    """
    return resumed if datamodule.trainer is None else batches_consumed(datamodule.trainer)


def data_fingerprint(*parts: Any) -> str:
    """16 hex digits of sha256 over what a datamodule read: tensors (dtype, shape, bytes), texts and numbers,
    in dicts (by key), lists, tuples and dataclasses (in order). Equal for equal data, on any machine."""
    digest = hashlib.sha256()

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"T{value.dtype}{tuple(value.shape)}|".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, Mapping):
            digest.update(f"D{len(value)}|".encode())
            for key in sorted(value, key=str):
                add(str(key))
                add(value[key])
        elif isinstance(value, list | tuple):
            digest.update(f"L{len(value)}|".encode())
            for item in value:
                add(item)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            add({item.name: getattr(value, item.name) for item in dataclasses.fields(value)})
        elif value is None or isinstance(value, str | int | float | bool):
            digest.update(f"{type(value).__name__}:{len(str(value))}:{value}|".encode())
        else:
            raise TypeError(f"data_fingerprint takes tensors, plain values and containers of them, not {type(value)}.")

    add(list(parts))
    return digest.hexdigest()[:16]


def data_state(fingerprint: str | None) -> dict[str, str]:
    """What a checkpoint records of the data a datamodule read (nothing for data drawn from its options alone)."""
    return {} if fingerprint is None else {"data_fingerprint": fingerprint}


def check_saved_data(
    datamodule: LightningDataModule, state: Mapping[str, Any], fingerprint: Callable[[], str | None], allow_change: bool
) -> None:
    """On resuming ``fit``, refuse a checkpoint trained on other data than ``datamodule`` reads now
    (:func:`data_state`), or with ``allow_change`` warn and continue; evaluation takes any data.

    ``fingerprint`` is called only when there is something to compare (it may read the data).
    """
    trainer = datamodule.trainer
    saved = state.get("data_fingerprint")
    if saved is None or (trainer is not None and trainer.state.fn != "fit"):
        return
    now = fingerprint()
    if now is None or now == saved:
        return
    message = (
        f"{type(datamodule).__name__}: the checkpoint was trained on other data than this run reads (data "
        f"fingerprint {now}, saved {saved}): the dataset's contents, or the options that read them, changed since, "
        "so the resumed run would not continue the one that was saved."
    )
    if allow_change:
        rank_zero_warn(f"{message} Continuing on this data, as allow_data_change=true asks.")
        return
    raise ValueError(
        f"{message} Resume on the data it was trained on, or continue on this data with "
        "--data.init_args.allow_data_change=true."
    )


def rank_share(count: int, rank: int, world: int, *, pad: bool, what: str, fix: str) -> list[int]:
    """Process ``rank``'s items among ``count``: ``rank, rank + world, ...``, as many on every process.

    ``pad``: every item is evaluated once, and the processes with one fewer end with a
    :data:`PADDING` item (to be run but not counted). Otherwise the last ``count % world`` items
    are left out. Fewer items than processes is refused (``what`` names them, ``fix`` says what to
    change), except none at all with ``pad`` (Lightning then skips the split).
    """
    if count < world and (count or not pad):
        raise ValueError(f"{count} {what} for {world} processes: every process needs at least one. {fix}")
    if not pad:
        return list(range(rank, count // world * world, world))
    own = list(range(rank, count, world))
    return own + [PADDING] * (-(-count // world) - len(own))


class RankSampler(DistributedSampler):
    """Base of the samplers that already give this process its own ``length`` indices.

    A ``DistributedSampler`` so that Lightning leaves it in place under DDP: it wraps any other
    sampler in its own, which splits the indices again and pads the last processes with repeats
    (counted twice). The epoch Lightning sets is not used: the stream position already says where
    an epoch starts, and evaluation is the same every epoch. Subclasses implement ``__iter__``.
    """

    def __init__(self, length: int, rank: int, world: int) -> None:
        super().__init__(range(length * world), num_replicas=world, rank=rank, shuffle=False)
        self.length = length

    def __len__(self) -> int:
        return self.length


class IndexSampler(RankSampler):
    """This process's fixed list of indices (e.g. its :func:`rank_share`), the same every epoch."""

    def __init__(self, indices: list[int], rank: int = 0, world: int = 1) -> None:
        super().__init__(len(indices), rank, world)
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class StreamSampler(RankSampler):
    """Yields ``length`` consecutive batch numbers from the stream position (``position()``) at each epoch's start.

    The position is read when Lightning starts an epoch's iterator, so a resumed run continues the
    stream whatever Lightning counts as an epoch.
    """

    def __init__(self, length: int, position: Callable[[], int], rank: int = 0, world: int = 1) -> None:
        super().__init__(length, rank, world)
        self.position = position

    def __iter__(self) -> Iterator[int]:
        start = self.position()
        return iter(range(start, start + self.length))
