"""Packed-token text for ordinary causal-LM pretraining: documents joined by EOS, cut into fixed blocks.

In memory (the default), every document is tokenized once, each source's token stream is split
into training and held-out validation tokens, and the training tokens are cut into blocks of
``block_size``; each epoch visits the blocks in a seeded order, split between the DDP ranks
without overlap. Streaming (``streaming=True``, tables only) reads a ``datasets`` iterable dataset
document by document, split between ranks with ``split_dataset_by_node``, for corpora larger than
memory. Either way the position in the stream is saved in checkpoints, so a resumed run sees
exactly the blocks the uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_meta.data import stream
from lightning_meta.data.tables import is_saved_dataset, read_table
from lightning_meta.data.tokenization import (
    check_tokenizer_record,
    load_tokenizer,
    required_tokenizer,
    tokenizer_record,
)
from lightning_meta.datamodules.language_modeling import (
    EMBEDDED_TEST_DOMAINS,
    EMBEDDED_VAL_DOMAINS,
    cut_into_blocks,
    read_corpus,
    tokenize_documents,
)

#: Snapshots of the stream position kept per rank (Lightning prefetches a batch or two ahead).
_KEPT_POSITIONS = 64


class PackedTextDataModule(LightningDataModule):
    """Causal-LM batches ``{"input_ids", "block_index"}`` of ``batch_size`` blocks of ``block_size`` tokens.

    Args:
        tokenizer: ``embedded-bpe-4096`` (ships with the package), ``embedded-bpe-N``, a local tokenizer
            folder (an exported model folder holds one) or ``pkg:NAME/dir``; required (``lightning-meta
            pretrain`` gives the model's when unset).
        corpus: ``None`` for the embedded corpus (Python's standard library by domain); a folder of text
            files; or a table: a ``json``/``jsonl``/``csv``/``parquet`` file, a glob of them, or a
            ``save_to_disk`` folder (the readers of :func:`~lightning_meta.datamodules.language_modeling.read_corpus`).
        text_column: column holding the text, for tables.
        domain_column: column naming each row's domain, for tables (only needed with ``domains``).
        domains: keep only these domains (of the embedded corpus, a folder or ``domain_column``). For the
            embedded corpus the default leaves out the meta-learning tasks' held-out validation and test
            domains, so pretraining never sees the text meta-learning is tested on.
        streaming: read a table document by document as a ``datasets`` iterable dataset instead of
            tokenizing it all in memory; training is then one endless stream (set ``max_steps``).
        val_fraction: share of each domain's tokens (its end) held out for validation (in memory).
        val_corpus: held-out validation text, read like ``corpus`` (replaces ``val_fraction``; needed for
            validation when streaming).
        block_size: tokens per block (sequence).
        batch_size: blocks per batch, per process.
        max_tokens_per_domain: tokenize at most this many tokens of each domain, in memory (``None``: all).
        shuffle: visit the in-memory training blocks in a seeded random order each epoch.
        seed: seeds the order of the blocks.
        num_workers: ``DataLoader`` workers (in-memory only; streaming positions live in this process).
        allow_data_change: resume from a checkpoint trained on other data than this run reads (another
            :meth:`data_fingerprint`), with a warning, instead of refusing it.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        corpus: str | None = None,
        text_column: str = "text",
        domain_column: str | None = None,
        domains: list[str] | None = None,
        streaming: bool = False,
        val_fraction: float = 0.05,
        val_corpus: str | None = None,
        block_size: int = 128,
        batch_size: int = 8,
        max_tokens_per_domain: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        allow_data_change: bool = False,
    ) -> None:
        super().__init__()
        if block_size < 2 or batch_size < 1:
            raise ValueError(f"Need block_size >= 2 and batch_size >= 1; got {block_size} and {batch_size}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if streaming and (corpus is None or Path(corpus).expanduser().is_dir() and not _is_table(corpus)):
            raise ValueError(
                f"streaming=True reads tables (a json/jsonl/csv/parquet file or glob, or a save_to_disk folder); "
                f"corpus={corpus!r} is not one. Leave streaming off: the embedded corpus and text folders are "
                "read in memory."
            )
        if streaming and num_workers:
            raise ValueError(
                "streaming=True needs num_workers=0: the stream position saved in checkpoints is tracked in this "
                f"process (got num_workers={num_workers})."
            )
        self.tokenizer = required_tokenizer(tokenizer, type(self).__name__)
        self.corpus = corpus
        self.text_column = text_column
        self.domain_column = domain_column
        self.domains = domains
        self.streaming = streaming
        self.val_fraction = val_fraction
        self.val_corpus = val_corpus
        self.block_size = block_size
        self.batch_size = batch_size
        self.max_tokens_per_domain = max_tokens_per_domain
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.allow_data_change = allow_data_change
        self._resume: dict[str, Any] = {}
        self._stream: _PackedStream | None = None
        self.save_hyperparameters(ignore=["allow_data_change"])  # a resume's choice, not carried to the next

    def prepare_data(self) -> None:
        load_tokenizer(self.tokenizer)  # trains and caches an embedded tokenizer once, before the ranks start

    def setup(self, stage: str) -> None:
        """Tokenize (in memory) or open the stream; errors about the data surface here."""
        if not self.streaming:
            self.blocks  # noqa: B018 (computes and caches the training and validation blocks)

    @functools.cached_property
    def eos_token_id(self) -> int:
        token_id = load_tokenizer(self.tokenizer).eos_token_id
        if token_id is None:
            raise ValueError(f"Tokenizer {self.tokenizer!r} has no end-of-text token to separate documents.")
        return token_id

    def _documents(self, corpus: str | None) -> dict[str, list[str]]:
        documents = read_corpus(corpus, self.text_column, self.domain_column)
        wanted = self.domains
        if wanted is None and corpus is None:
            held_out = set(EMBEDDED_VAL_DOMAINS) | set(EMBEDDED_TEST_DOMAINS)
            wanted = [domain for domain in documents if domain not in held_out]
        if wanted is not None:
            unknown = sorted(set(wanted) - set(documents))
            if unknown:
                raise ValueError(f"Unknown domains {unknown} in domains; the corpus has {sorted(documents)}.")
            documents = {domain: documents[domain] for domain in wanted}
        return documents

    @functools.cached_property
    def blocks(self) -> dict[str, torch.Tensor]:
        """In-memory ``train`` and ``val`` blocks, ``(blocks, block_size)`` each."""
        tokenizer = load_tokenizer(self.tokenizer)
        train: list[torch.Tensor] = []
        val: list[torch.Tensor] = []
        for _, texts in sorted(self._documents(self.corpus).items()):
            ids = tokenize_documents(tokenizer, texts, self.eos_token_id, self.max_tokens_per_domain)
            held = int(len(ids) * self.val_fraction) if self.val_corpus is None else 0
            train.append(ids[: len(ids) - held])
            val.append(ids[len(ids) - held :])
        result = {
            "train": cut_into_blocks(torch.cat(train), self.block_size),
            "val": self.val_blocks if self.val_corpus is not None else cut_into_blocks(torch.cat(val), self.block_size),
        }
        if len(result["train"]) < self.batch_size:
            raise ValueError(
                f"The corpus gives {len(result['train'])} training blocks of {self.block_size} tokens, fewer than "
                f"batch_size={self.batch_size}. Add text, or lower block_size or batch_size."
            )
        rank_zero_info(
            f"Packed text: {len(result['train'])} training and {len(result['val'])} validation blocks of "
            f"{self.block_size} tokens."
        )
        return result

    def batches_per_epoch(self, world_size: int = 1) -> int:
        """Training batches per epoch and process (in memory): every rank gets as many."""
        return -(-(len(self.blocks["train"]) // world_size) // self.batch_size)

    def train_dataloader(self) -> DataLoader:
        stream.allow_mid_epoch_resume()
        rank, world_size = stream.rank_and_world(self)
        if self.streaming:
            self._stream = _PackedStream(self, rank, world_size, self._resume.get("stream"))
            return DataLoader(self._stream, batch_size=None, num_workers=0)
        sampler = _BlockBatchSampler(
            len(self.blocks["train"]), self.batch_size, rank, world_size, self.seed, self.shuffle, self._next_batch
        )
        return DataLoader(
            _Blocks(self.blocks["train"]),
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        if self.streaming and self.val_corpus is None:
            return DataLoader([])
        blocks = self.val_blocks if self.streaming else self.blocks["val"]
        rank, world_size = stream.rank_and_world(self)
        # The blocks are dealt out in turn, as many to every rank (the last world_size - 1 at most are left out).
        mine = stream.rank_share(
            len(blocks),
            rank,
            world_size,
            pad=False,
            what="validation blocks",
            fix="Raise val_fraction, give a larger val_corpus, or lower block_size.",
        )
        batches = [mine[start : start + self.batch_size] for start in range(0, len(mine), self.batch_size)]
        sampler = stream.IndexSampler(list(range(len(batches))), rank, world_size)
        return DataLoader(_Blocks(blocks, batches), batch_size=None, sampler=sampler)

    @functools.cached_property
    def val_blocks(self) -> torch.Tensor:
        """Blocks of ``val_corpus``."""
        tokenizer = load_tokenizer(self.tokenizer)
        documents = read_corpus(self.val_corpus, self.text_column, self.domain_column)
        ids = [tokenize_documents(tokenizer, texts, self.eos_token_id, None) for _, texts in sorted(documents.items())]
        return cut_into_blocks(torch.cat(ids), self.block_size)

    def data_fingerprint(self) -> str:
        """Of the training and validation blocks; streaming, of the table's length, 256 of its documents spread
        over it (all of them would cost a pass over the data) and the validation blocks."""
        if not self.streaming:
            return stream.data_fingerprint(self.blocks)
        table = read_table(self.corpus)
        rows = sorted({index * len(table) // 256 for index in range(256)}) if len(table) else []
        sample = list(table.select(rows)[self.text_column]) if rows else []
        return stream.data_fingerprint(len(table), sample, self.val_blocks if self.val_corpus is not None else None)

    @functools.cached_property
    def _data_fingerprint(self) -> str:  # the data never change within a run: computed once
        return self.data_fingerprint()

    def _next_batch(self) -> int:
        """The number of the next training batch, over all epochs (``stream.next_train_batch``)."""
        return stream.next_train_batch(self, self._resume.get("next_train_batch", 0))

    def state_dict(self) -> dict[str, Any]:
        """The position of the next training batch, the block size, and the fingerprints of the tokenizer and of
        the data read."""
        state: dict[str, Any] = tokenizer_record(self.tokenizer) | {"block_size": self.block_size}
        if self.trainer is None:
            return state | self._resume
        state |= stream.data_state(self._data_fingerprint)
        if self.streaming:
            if self._stream is not None:
                # Lightning has fetched ahead: the position is that of the next batch the loop will *use*.
                state["stream"] = self._stream.position_before(self._next_batch())
        else:
            state["next_train_batch"] = self._next_batch()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the stream; refuse a checkpoint trained on another tokenizer's token ids or block size, or on
        other data unless ``allow_data_change``."""
        check_tokenizer_record(state_dict, self.tokenizer, "The checkpoint's data")
        saved_block_size = state_dict.get("block_size", self.block_size)
        if saved_block_size != self.block_size:
            raise ValueError(
                f"The checkpoint was trained on blocks of {saved_block_size} tokens, this run cuts blocks of "
                f"{self.block_size}: its saved stream position would point into another block layout and the "
                f"validation losses would not be comparable. Resume with --data.init_args.block_size="
                f"{saved_block_size}, or start a new run from the checkpoint's weights with "
                "--model.init_from=CKPT (no --ckpt_path)."
            )
        stream.check_saved_data(self, state_dict, lambda: self._data_fingerprint, self.allow_data_change)
        self._resume = {key: state_dict[key] for key in ("next_train_batch", "stream") if key in state_dict}


def _is_table(corpus: str) -> bool:
    return is_saved_dataset(Path(corpus).expanduser())


class _Blocks(Dataset):
    """``dataset[list of block numbers]`` is one batch (the sampler yields whole batches)."""

    def __init__(self, blocks: torch.Tensor, batches: list[list[int]] | None = None) -> None:
        self.blocks = blocks
        self.batches = batches

    def __getitem__(self, index: int | list[int]) -> dict[str, torch.Tensor]:
        numbers = torch.tensor(self.batches[index] if self.batches is not None else index)
        return {"input_ids": self.blocks[numbers], "block_index": numbers}

    def __len__(self) -> int:
        return len(self.batches) if self.batches is not None else len(self.blocks)


class _BlockBatchSampler(stream.RankSampler):
    """Lists of block numbers: epoch ``e``'s seeded permutation, rank ``r`` taking every ``world``-th.

    Each epoch's iterator yields ``len(self)`` batches from the stream position at its start
    (``position()``, counted over all epochs): global batch ``g`` is batch ``g % len(self)`` of the
    order of epoch ``g // len(self)``, so a run resumed where Lightning counts another epoch still
    continues the uninterrupted run's batches. Every rank gets as many blocks (at most ``world - 1``
    are left out of an epoch) and as many batches, with no block on two ranks and none repeated.
    """

    def __init__(
        self,
        blocks: int,
        batch_size: int,
        rank: int,
        world: int,
        seed: int,
        shuffle: bool,
        position: Callable[[], int],
    ) -> None:
        super().__init__(-(-(blocks // world) // batch_size), rank, world)  # the last batch may be smaller
        self.blocks, self.batch_size, self.world = blocks, batch_size, world
        self.seed, self.shuffle, self.position = seed, shuffle, position

    def _order(self, epoch: int) -> torch.Tensor:
        order = (
            torch.randperm(self.blocks, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            if self.shuffle
            else torch.arange(self.blocks)
        )
        return order[self.rank : (self.blocks // self.world) * self.world : self.world]

    def __iter__(self) -> Iterator[list[int]]:
        start = self.position()
        orders: dict[int, torch.Tensor] = {}
        for number in range(start, start + len(self)):
            epoch, batch = divmod(number, len(self))
            mine = orders.setdefault(epoch, self._order(epoch))
            yield mine[batch * self.batch_size : (batch + 1) * self.batch_size].tolist()


class _PackedStream(IterableDataset):
    """Endless packed blocks from a ``datasets`` iterable dataset, split between ranks by node.

    The position of a batch is ``(epoch, dataset state before a document, tokens of that document
    already used)``; ``datasets`` restores the first part with ``load_state_dict``, and the
    document is re-tokenized to skip the second, so a checkpoint stores a few numbers, not tokens.
    """

    def __init__(self, datamodule: PackedTextDataModule, rank: int, world: int, start: dict | None) -> None:
        table = read_table(datamodule.corpus)
        if datamodule.text_column not in table.column_names:
            raise ValueError(
                f"text_column={datamodule.text_column!r} is not a column of {datamodule.corpus!r}; "
                f"its columns are {table.column_names}."
            )
        self.table = table.select_columns([datamodule.text_column])
        self.rank, self.world = rank, world
        self.datamodule = datamodule
        self.start = start or {"epoch": 0, "state": None, "offset": 0, "batch": 0}
        self.positions: dict[int, dict[str, Any]] = {}
        self.order: deque[int] = deque()

    def position_before(self, batch: int) -> dict[str, Any]:
        """The saved position of batch number ``batch`` (counted from the start of training)."""
        if batch in self.positions:
            return self.positions[batch]
        if batch == self.start["batch"]:
            return self.start
        raise RuntimeError(f"Stream position of batch {batch} was not kept (kept: {sorted(self.positions)}).")

    def _open(self, epoch: int) -> Any:
        """A fresh pass over this rank's documents (a ``datasets`` stream restarts from its loaded state)."""
        from datasets.distributed import split_dataset_by_node

        # Shards a multiple of the ranks: each rank then reads whole shards, not every other row.
        shards = self.world * max(1, min(16, len(self.table) // self.world))
        stream = split_dataset_by_node(self.table.to_iterable_dataset(num_shards=shards), self.rank, self.world)
        stream.set_epoch(epoch)
        return stream

    def _remember(self, batch: int, position: dict[str, Any]) -> None:
        self.positions[batch] = position
        self.order.append(batch)
        while len(self.order) > _KEPT_POSITIONS:
            self.positions.pop(self.order.popleft(), None)

    def _documents(self) -> Iterator[tuple[dict[str, Any], list[int]]]:
        """``(position of the document's first unused token, its unused tokens + EOS)``, endlessly."""
        tokenizer = load_tokenizer(self.datamodule.tokenizer)
        column, eos = self.datamodule.text_column, self.datamodule.eos_token_id
        epoch, state, offset = self.start["epoch"], self.start["state"], self.start["offset"]
        while True:
            dataset = self._open(epoch)
            if state is not None:
                dataset.load_state_dict(state)
            before = dataset.state_dict()
            rows = 0
            for row in dataset:
                rows += 1
                text = row[column]
                if not isinstance(text, str):  # checked here, where it is read: a stream is never read whole
                    raise ValueError(
                        f"The corpus {self.datamodule.corpus!r} has a row whose {column!r} is {text!r:.40}, not "
                        "text. Write every text as a string (an empty string is an empty document), or filter "
                        "those rows out."
                    )
                ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
                yield {"epoch": epoch, "state": before, "offset": offset}, ids[offset:]
                offset = 0
                before = dataset.state_dict()
            if not rows and state is None:
                raise ValueError(f"The corpus {self.datamodule.corpus!r} has no rows for process {self.rank}.")
            epoch, state, offset = epoch + 1, None, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        block_size, batch_size = self.datamodule.block_size, self.datamodule.batch_size
        needed = block_size * batch_size
        tokens: list[int] = []
        # (position, tokens left) of each document in `tokens`, oldest first: the first one's position,
        # advanced by the tokens already taken, is where the next batch starts.
        pieces: deque[list] = deque()
        batch = self.start["batch"]
        documents = self._documents()
        while True:
            while len(tokens) < needed:
                position, ids = next(documents)
                tokens += ids
                pieces.append([position, len(ids)])
            first = pieces[0][0]
            self._remember(batch, {**first, "batch": batch})
            block, tokens = tokens[:needed], tokens[needed:]
            used = needed
            while used:
                position, left = pieces[0]
                take = min(left, used)
                used -= take
                if take == left:
                    pieces.popleft()
                else:
                    pieces[0] = [{**position, "offset": position["offset"] + take}, left - take]
            batch += 1
            yield {"input_ids": torch.tensor(block).view(batch_size, block_size)}
