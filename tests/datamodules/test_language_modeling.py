"""LM domain tasks: disjoint support/query blocks, held-out domains, user corpora, clear errors."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from lightning_meta.data.tokenization import load_tokenizer
from lightning_meta.datamodules import LanguageModelingTasksDataModule
from lightning_meta.datamodules.language_modeling import read_corpus

TOKENIZER = "embedded-bpe-512"


@pytest.fixture(scope="module")
def embedded() -> LanguageModelingTasksDataModule:
    return LanguageModelingTasksDataModule(
        tokenizer=TOKENIZER,
        block_size=32,
        shots=3,
        queries=2,
        meta_batch_size=8,
        num_val_tasks=6,
        num_test_tasks=10,
        max_tokens_per_domain=4000,
    )


@pytest.mark.xdist_group("test_language_modeling.embedded")
def test_support_and_query_are_disjoint_blocks_of_one_domain(embedded):
    for index in range(5):
        batch = embedded.train_batch(index)
        assert batch.support["input_ids"].shape == (8, 3, 32) and batch.query["input_ids"].shape == (8, 2, 32)
        for episode in batch.episodes():
            blocks = embedded.domain_blocks[episode.metadata["domain"]]
            ids = episode.metadata["block_ids"].tolist()
            assert len(set(ids)) == 5
            assert torch.equal(episode.support["input_ids"], blocks[ids[:3]])
            assert torch.equal(episode.query["input_ids"], blocks[ids[3:]])
            support_rows = {tuple(row) for row in episode.support["input_ids"].tolist()}
            assert not support_rows & {tuple(row) for row in episode.query["input_ids"].tolist()}


@pytest.mark.xdist_group("test_language_modeling.embedded")
def test_held_out_domains_never_appear_in_training(embedded):
    splits = embedded.split_domains
    assert not set(splits["train"]) & (set(splits["val"]) | set(splits["test"]))
    assert not set(splits["val"]) & set(splits["test"])
    trained_on = {d for i in range(40) for d in embedded.train_batch(i).metadata["domain"]}
    assert trained_on <= set(splits["train"]) and len(trained_on) > 5
    for split in ("val", "test"):
        seen = {d for batch in embedded.eval_batches(split) for d in batch.metadata["domain"]}
        assert seen <= set(splits[split])


@pytest.mark.xdist_group("test_language_modeling.embedded")
def test_evaluation_tasks_are_fixed(embedded):
    again = LanguageModelingTasksDataModule(
        tokenizer=TOKENIZER,
        block_size=32,
        shots=3,
        queries=2,
        meta_batch_size=8,
        num_val_tasks=6,
        num_test_tasks=10,
        max_tokens_per_domain=4000,
    )
    for a, b in zip(embedded.eval_batches("test"), again.eval_batches("test"), strict=True):
        assert torch.equal(a.query["input_ids"], b.query["input_ids"])


@pytest.mark.xdist_group("test_language_modeling.embedded")
def test_blocks_are_the_tokenized_text(embedded):
    tokenizer = load_tokenizer(TOKENIZER)
    block = embedded.domain_blocks["json"][0]
    assert tokenizer.decode(block).startswith('r"""JSON (JavaScript Object Notation)')


def test_folder_corpus_one_domain_per_file_or_subfolder(tmp_path):
    for name in ("alpha", "beta", "gamma", "delta"):
        (tmp_path / f"{name}.txt").write_text(f"The {name} domain speaks of {name} things. " * 200)
    (tmp_path / "epsilon").mkdir()
    (tmp_path / "epsilon" / "a.md").write_text("epsilon words here. " * 200)
    datamodule = LanguageModelingTasksDataModule(
        tokenizer=TOKENIZER, corpus=str(tmp_path), block_size=16, test_domains=["beta"], val_domains=["epsilon"]
    )
    assert datamodule.split_domains == {"train": ["alpha", "delta", "gamma"], "val": ["epsilon"], "test": ["beta"]}
    assert datamodule.eval_batches("test")[0].metadata["domain"][0] == "beta"


def test_jsonl_corpus_with_a_domain_column_and_seeded_split(tmp_path):
    rows = [{"text": f"Document {i} about topic {t}. " * 30, "topic": t} for t in "abcdefghij" for i in range(3)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    datamodule = LanguageModelingTasksDataModule(
        tokenizer=TOKENIZER, corpus=str(path), domain_column="topic", block_size=16
    )
    splits = datamodule.split_domains
    assert len(splits["val"]) == 1 and len(splits["test"]) == 1 and len(splits["train"]) == 8
    assert (
        splits
        == LanguageModelingTasksDataModule(
            tokenizer=TOKENIZER, corpus=str(path), domain_column="topic", block_size=16
        ).split_domains
    )


def test_clear_errors(tmp_path):
    (tmp_path / "big.txt").write_text("plenty of words in this domain. " * 300)
    (tmp_path / "small.txt").write_text("tiny")
    (tmp_path / "other.txt").write_text("another domain with words. " * 300)
    small = LanguageModelingTasksDataModule(tokenizer=TOKENIZER, corpus=str(tmp_path), block_size=16)
    with pytest.raises(ValueError, match=r"fewer than shots \+ queries = 8 blocks of 16 tokens: \{'small': 0\}"):
        small.setup("fit")
    (tmp_path / "small.txt").unlink()
    unknown = LanguageModelingTasksDataModule(
        tokenizer=TOKENIZER, corpus=str(tmp_path), block_size=16, val_domains=["bigg"], test_domains=["other"]
    )
    with pytest.raises(ValueError, match=r"Unknown domains \['bigg'\].*domains: \['big', 'other'\]"):
        unknown.setup("fit")
    (tmp_path / "table.csv").write_text("body,topic\nhello,a\n")
    with pytest.raises(ValueError, match="needs text_column='text' and domain_column='topic'"):
        LanguageModelingTasksDataModule(
            tokenizer=TOKENIZER, corpus=str(tmp_path / "table.csv"), domain_column="topic"
        ).setup("fit")
    with pytest.raises(FileNotFoundError, match="neither an embedded tokenizer"):
        LanguageModelingTasksDataModule(tokenizer="gpt2").setup("fit")


def test_folder_corpus_leaves_out_hidden_and_binary_files(tmp_path):
    for name in ("alpha", "beta", "gamma"):
        (tmp_path / f"{name}.txt").write_text(f"The {name} domain speaks of {name} things. " * 20)
    (tmp_path / "delta").mkdir()
    (tmp_path / "delta" / "notes.md").write_text("delta words here. " * 20)
    (tmp_path / "delta" / ".cache").mkdir()
    (tmp_path / "delta" / ".cache" / "stale.txt").write_text("hidden, never read")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(range(256)))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "core").write_bytes(b"\x7fELF\x02\x01\x01\x00" * 64)
    rng = random.Random(0)
    (tmp_path / "noise").write_bytes(bytes(rng.randrange(1, 256) for _ in range(4000)))  # no NUL, not UTF-8
    (tmp_path / "latin.txt").write_bytes("Le café du matin est très bon pour tout le monde. ".encode("latin-1") * 20)
    with pytest.warns(UserWarning) as warned:
        domains = read_corpus(str(tmp_path))
    assert sorted(domains) == ["alpha", "beta", "delta", "gamma", "latin"]
    assert domains["delta"] == ["delta words here. " * 20]
    messages = [str(w.message) for w in warned]  # in file order
    assert len(messages) == 3, messages
    assert re.search(r"Leaving \S+/core out of the corpus: it holds NUL bytes, so it is binary", messages[0])
    assert re.search(r"\S+/latin\.txt: 40 byte sequences are not UTF-8.*iconv -f latin1 -t utf-8", messages[1])
    assert re.search(r"Leaving \S+/noise out of the corpus: \d+% of it is not UTF-8", messages[2])
    only_binary = tmp_path / "only_binary"
    only_binary.mkdir()
    (only_binary / ".DS_Store").write_bytes(b"\x00\x01")
    (only_binary / "blob").write_bytes(b"\x00\x01")
    with pytest.warns(UserWarning, match="blob"), pytest.raises(ValueError, match=rf"No text files .* {only_binary},"):
        read_corpus(str(only_binary))
    with pytest.raises(ValueError, match=r"corpus='.*alpha\.txt' is a single file, not a table: give the folder"):
        read_corpus(str(tmp_path / "alpha.txt"))


def test_two_files_of_one_domain_name_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("plain notes. " * 20)
    (tmp_path / "notes.md").write_text("# markdown notes. " * 20)
    with pytest.raises(ValueError, match=r"notes\.md and \S+notes\.txt would both be the domain 'notes'"):
        read_corpus(str(tmp_path))


def test_table_corpus_values_that_are_not_text_are_refused_by_row(tmp_path):
    rows = [{"text": f"Document {i}. " * 5, "topic": t} for t in "abc" for i in range(3)]
    rows[2]["text"] = 2024  # a raw TypeError inside tokenization before
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    datamodule = LanguageModelingTasksDataModule(tokenizer=TOKENIZER, corpus=str(path), domain_column="topic")
    with pytest.raises(ValueError, match=r"column 'text' holds values that are not text in 1 of 9 rows .*: 2 \(2024\)"):
        datamodule.setup("fit")


def test_table_corpus_rows_without_a_domain_or_text_are_an_error(tmp_path):
    rows = [{"text": f"Document {i} about topic {t}. " * 5, "topic": t} for t in "abc" for i in range(3)]
    rows[1]["topic"], rows[4]["topic"], rows[6]["text"] = None, "", None
    rows[7]["text"] = ""  # an empty document, not a missing one
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    datamodule = LanguageModelingTasksDataModule(tokenizer=TOKENIZER, corpus=str(path), domain_column="topic")
    message = (
        r"Missing values in corpus '.*corpus\.jsonl' \(rows counted from 0\): column 'text' has no value \(None, NaN "
        r"or empty\) in 1 of 9 rows: 6; column 'topic' has no value \(None, NaN or empty\) in 2 of 9 rows: 1, 4\. "
        r"Every row needs a text and a domain: filter those rows out of the table first\."
    )
    with pytest.raises(ValueError, match=message):
        datamodule.setup("fit")
