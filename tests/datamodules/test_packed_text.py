"""PackedTextDataModule: documents joined by EOS in fixed blocks, split between ranks, resumable when streaming."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_meta.data.corpus import domain_text
from lightning_meta.data.tokenization import load_tokenizer
from lightning_meta.datamodules import PackedTextDataModule
from lightning_meta.datamodules.packed_text import _BlockBatchSampler, _PackedStream

TOKENIZER = "embedded-bpe-4096"


def write_corpus(folder, domains=("json", "tomllib", "html"), chars=6000):
    """A folder corpus: one file per domain, from the embedded standard-library text."""
    folder.mkdir(parents=True, exist_ok=True)
    for domain in domains:
        (folder / f"{domain}.py").write_text(domain_text(domain)[:chars])
    return folder


def test_blocks_are_the_documents_joined_by_eos(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    data = PackedTextDataModule(tokenizer=TOKENIZER, corpus=str(corpus), block_size=16, batch_size=4, val_fraction=0.1)
    data.setup("fit")
    tokenizer = load_tokenizer(TOKENIZER)
    expected_train, expected_val = [], []
    for domain in ("html", "json", "tomllib"):  # sorted
        ids = tokenizer((corpus / f"{domain}.py").read_text(), add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
        held = int(len(ids) * 0.1)
        expected_train += ids[: len(ids) - held]
        expected_val += ids[len(ids) - held :]
    train, val = data.blocks["train"], data.blocks["val"]
    assert train.shape[1] == 16
    assert train.flatten().tolist() == expected_train[: len(train) * 16]
    assert val.flatten().tolist() == expected_val[: len(val) * 16]


def sampler_at(blocks: int, batch_size: int, rank: int, world: int, position: int) -> _BlockBatchSampler:
    return _BlockBatchSampler(blocks, batch_size, rank, world, seed=3, shuffle=True, position=lambda: position)


def test_each_epoch_visits_every_block_once_split_between_ranks():
    blocks, batch_size = 103, 8
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            sampler = sampler_at(blocks, batch_size, rank, 2, position=epoch * 7)
            batches = list(sampler)
            assert len(batches) == len(sampler) == 7  # 51 blocks per rank: 6 full batches and one of 3
            seen.append([block for batch in batches for block in batch])
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == blocks - 1  # one block of an odd count is left out
    assert list(sampler_at(blocks, batch_size, 0, 2, 7)) != list(sampler_at(blocks, batch_size, 0, 2, 0))


def test_resume_anywhere_continues_the_stream_across_epochs():
    stream = list(sampler_at(50, 4, 0, 1, 0)) + list(sampler_at(50, 4, 0, 1, 13)) + list(sampler_at(50, 4, 0, 1, 26))
    for position in (5, 13, 20):  # inside epoch 0, at the start of epoch 1, inside epoch 1
        assert list(sampler_at(50, 4, 0, 1, position)) == stream[position : position + 13]


def test_validation_gives_every_rank_as_many_batches(tmp_path):
    data = PackedTextDataModule(
        tokenizer=TOKENIZER, corpus=str(write_corpus(tmp_path / "corpus")), block_size=16, batch_size=4
    )
    data.setup("fit")

    class FakeTrainer:
        world_size = 2

        def __init__(self, rank):
            self.global_rank = rank

    counts, blocks = [], []
    for rank in (0, 1):
        data.trainer = FakeTrainer(rank)
        batches = list(data.val_dataloader())
        counts.append(len(batches))
        blocks.append({int(i) for batch in batches for i in batch["block_index"]})
    assert counts[0] == counts[1] and not blocks[0] & blocks[1]
    assert len(blocks[0] | blocks[1]) >= len(data.blocks["val"]) - 1


def table(path, rows=40):
    with path.open("w") as handle:
        for index in range(rows):
            handle.write(json.dumps({"text": f"Document {index}. " + "word " * (index % 7 + 3)}) + "\n")
    return path


def stream_batches(data, start, count, rank=0, world=1):
    stream = _PackedStream(data, rank, world, start)
    iterator = iter(stream)
    batches = [next(iterator)["input_ids"] for _ in range(count)]
    return batches, stream


def test_streaming_resumes_exactly_from_a_saved_position(tmp_path):
    data = PackedTextDataModule(
        tokenizer=TOKENIZER,
        corpus=str(table(tmp_path / "docs.jsonl")),
        streaming=True,
        block_size=8,
        batch_size=2,
        val_fraction=0.0,
    )
    uninterrupted, stream = stream_batches(data, None, 30)  # several passes over the 40 documents
    for consumed in (1, 7, 19):
        position = stream.position_before(consumed)
        resumed, _ = stream_batches(data, position, 30 - consumed)
        assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[consumed:], strict=True)), consumed
    assert {"epoch", "state", "offset", "batch"} <= set(position)
    json.dumps(position)  # plain data in the checkpoint


def test_streaming_ranks_read_different_documents(tmp_path):
    data = PackedTextDataModule(
        tokenizer=TOKENIZER,
        corpus=str(table(tmp_path / "docs.jsonl")),
        streaming=True,
        block_size=8,
        batch_size=2,
        val_fraction=0.0,
    )
    first, _ = stream_batches(data, None, 3, rank=0, world=2)
    second, _ = stream_batches(data, None, 3, rank=1, world=2)
    assert not torch.equal(torch.stack(first), torch.stack(second))


def test_bad_options_name_the_fix(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    with pytest.raises(ValueError, match="streaming=True reads tables"):
        PackedTextDataModule(tokenizer=TOKENIZER, corpus=str(corpus), streaming=True)
    with pytest.raises(ValueError, match="Unknown domains"):
        PackedTextDataModule(tokenizer=TOKENIZER, corpus=str(corpus), domains=["nope"]).setup("fit")
    with pytest.raises(ValueError, match="fewer than batch_size"):
        PackedTextDataModule(tokenizer=TOKENIZER, corpus=str(corpus), block_size=512, batch_size=64).setup("fit")


def test_resuming_with_another_block_size_is_refused():
    saved = PackedTextDataModule(tokenizer=TOKENIZER, block_size=16).state_dict()
    PackedTextDataModule(tokenizer=TOKENIZER, block_size=16).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"blocks of 16 tokens, this run cuts blocks of 32.*block_size=16"):
        PackedTextDataModule(tokenizer=TOKENIZER, block_size=32).load_state_dict(saved)


def test_a_streamed_row_whose_text_is_not_text_is_refused_where_it_is_read(tmp_path):
    # It trained as an empty document (None) or failed inside the tokenizer (a number).
    rows = [{"text": f"Document {i}. " * 4} for i in range(6)]
    rows[3]["text"] = None
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = PackedTextDataModule(
        tokenizer=TOKENIZER, corpus=str(path), streaming=True, block_size=8, batch_size=2, val_fraction=0.0
    )
    with pytest.raises(ValueError, match=r"has a row whose 'text' is None, not text\. Write every text as a string"):
        stream_batches(data, None, 10)
