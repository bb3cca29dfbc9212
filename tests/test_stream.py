"""The stream and evaluation-split rules every datamodule shares (lightning_meta.data.stream)."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from lightning_meta.data import stream
from lightning_meta.datamodules.packed_text import _BlockBatchSampler


def test_padded_shares_hold_every_item_once_and_are_equal():
    shares = [stream.rank_share(7, rank, 3, pad=True, what="x", fix="") for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4, stream.PADDING], [2, 5, stream.PADDING]]


def test_unpadded_shares_leave_the_remainder_out_and_are_equal():
    shares = [stream.rank_share(7, rank, 3, pad=False, what="x", fix="") for rank in range(3)]
    assert shares == [[0, 3], [1, 4], [2, 5]]


def test_fewer_items_than_processes_is_refused_with_the_fix():
    message = r"^1 val batches for 2 processes: every process needs at least one\. Raise it\.$"
    with pytest.raises(ValueError, match=message):
        stream.rank_share(1, 0, 2, pad=True, what="val batches", fix="Raise it.")
    with pytest.raises(ValueError, match="0 validation blocks for 1 processes"):
        stream.rank_share(0, 0, 1, pad=False, what="validation blocks", fix="")
    assert stream.rank_share(0, 0, 2, pad=True, what="x", fix="") == []  # none at all: Lightning skips the split


@pytest.mark.parametrize(
    "sampler",
    [
        stream.IndexSampler([1, 3], rank=1, world=2),
        stream.StreamSampler(4, lambda: 10, rank=1, world=2),
        _BlockBatchSampler(40, 4, 1, 2, seed=0, shuffle=False, position=lambda: 0),
    ],
    ids=["index", "stream", "packed blocks"],
)
def test_samplers_are_complete_distributed_samplers_lightning_leaves_in_place(sampler):
    # Lightning wraps any sampler that is not a DistributedSampler in its own under DDP; these were once
    # DistributedSamplers that skipped its __init__ (no num_replicas, rank, epoch, ...).
    assert isinstance(sampler, DistributedSampler)
    assert (sampler.num_replicas, sampler.rank, sampler.num_samples) == (2, 1, len(sampler))
    sampler.set_epoch(5)  # the epoch is not what orders them
    assert len(list(sampler)) == len(sampler)


def test_the_stream_sampler_starts_where_the_position_says_at_each_epoch():
    position = [0]
    sampler = stream.StreamSampler(3, lambda: position[0])
    assert list(sampler) == [0, 1, 2]
    position[0] = 7
    assert list(sampler) == [7, 8, 9]
