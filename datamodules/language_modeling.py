"""Language-modelling tasks: one task is one domain of text; support and query are token blocks."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_meta.data.corpus import embedded_domains
from lightning_meta.data.episodic import EpisodicDataModule
from lightning_meta.data.stream import data_fingerprint
from lightning_meta.data.tables import (
    claim_name,
    describe_missing,
    is_missing,
    is_saved_dataset,
    read_table,
    reencode_command,
)
from lightning_meta.data.tasks import Episode
from lightning_meta.data.tokenization import load_tokenizer, required_tokenizer

if TYPE_CHECKING:
    from datasets import Dataset

#: Held-out embedded domains: library code of unseen packages, and the language reference (prose).
EMBEDDED_VAL_DOMAINS = ("json", "wsgiref", "xmlrpc")
EMBEDDED_TEST_DOMAINS = ("email", "html", "tomllib", "reference")
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ""}
#: Files of a corpus folder more than this share of which is not UTF-8 are binary (or in another encoding).
_MAX_NOT_UTF8 = 0.1


class LanguageModelingTasksDataModule(EpisodicDataModule):
    """Episodes of causal-LM adaptation to a domain.

    Each domain's text is tokenized, joined with end-of-text tokens and cut into blocks of
    ``block_size`` tokens. An episode picks one domain and ``shots + queries`` distinct blocks of
    it: adaptation sees the ``shots`` support blocks, the query blocks measure the adapted model.
    Training, validation and test domains are disjoint.

    Args:
        tokenizer: ``embedded-bpe-4096`` (ships with the package), ``embedded-bpe-N`` (trained and cached),
            a local tokenizer folder or ``pkg:NAME/dir``; required (the CLI gives the learner's when unset).
        corpus: ``None`` for the embedded corpus (Python's standard-library code by package, its
            language reference, its docstrings); a folder of text files (one domain per file, or per
            sub-folder; hidden and binary files are left out); or a table with a ``domain_column``:
            a ``json``/``jsonl``/``csv``/``parquet`` file, a glob of them, or a ``save_to_disk``
            folder (:func:`~lightning_meta.data.tables.read_table`).
        text_column: column holding the text, for tables.
        domain_column: column whose values are the domains, for tables.
        val_domains: held-out validation domains; by default a fixed list for the embedded corpus
            and a seeded draw of 10% (at least one) otherwise.
        test_domains: held-out test domains, chosen like ``val_domains``.
        block_size: tokens per block (per sequence).
        shots: support blocks per episode.
        queries: query blocks per episode.
        max_tokens_per_domain: tokenize at most this many tokens of each domain.
        others: ``meta_batch_size``, ``batches_per_epoch``, ``num_val_tasks``, ``num_test_tasks``,
            ``eval_meta_batch_size``, ``seed``, ``num_workers``, ``allow_data_change``: see
            :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        corpus: str | None = None,
        text_column: str = "text",
        domain_column: str | None = None,
        val_domains: list[str] | None = None,
        test_domains: list[str] | None = None,
        block_size: int = 64,
        shots: int = 4,
        queries: int = 4,
        max_tokens_per_domain: int | None = 40_000,
        meta_batch_size: int = 4,
        batches_per_epoch: int = 100,
        num_val_tasks: int = 32,
        num_test_tasks: int = 64,
        eval_meta_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        allow_data_change: bool = False,
    ) -> None:
        super().__init__(
            meta_batch_size,
            batches_per_epoch,
            num_val_tasks,
            num_test_tasks,
            eval_meta_batch_size,
            seed,
            num_workers,
            allow_data_change,
        )
        if block_size < 2 or shots < 1 or queries < 1:
            raise ValueError(f"Need block_size >= 2, shots >= 1, queries >= 1; got {block_size}, {shots}, {queries}.")
        self.tokenizer = required_tokenizer(tokenizer, type(self).__name__)
        self.corpus = corpus
        self.text_column = text_column
        self.domain_column = domain_column
        self.val_domains = val_domains
        self.test_domains = test_domains
        self.block_size = block_size
        self.shots = shots
        self.queries = queries
        self.max_tokens_per_domain = max_tokens_per_domain
        self.save_hyperparameters(ignore=["allow_data_change"])  # a resume's choice, not carried to the next

    def prepare_data(self) -> None:
        load_tokenizer(self.tokenizer)  # trains and caches an embedded tokenizer once, before the ranks start

    def setup(self, stage: str) -> None:
        """Tokenize the corpus and split the domains (errors about the data surface here)."""
        self.split_domains  # noqa: B018 (computes and caches the blocks and the splits)

    def data_fingerprint(self) -> str:
        """Of every domain's token blocks and the split."""
        return data_fingerprint(self.split_domains, self.domain_blocks)

    @functools.cached_property
    def domain_blocks(self) -> dict[str, torch.Tensor]:
        """Token blocks ``(blocks, block_size)`` of every domain."""
        tokenizer = load_tokenizer(self.tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"Tokenizer {self.tokenizer!r} has no end-of-text token to separate documents.")
        blocks = {
            domain: cut_into_blocks(
                tokenize_documents(tokenizer, documents, tokenizer.eos_token_id, self.max_tokens_per_domain or None),
                self.block_size,
            )
            for domain, documents in read_corpus(self.corpus, self.text_column, self.domain_column).items()
        }
        needed = self.shots + self.queries
        small = {domain: len(b) for domain, b in blocks.items() if len(b) < needed}
        if small:
            raise ValueError(
                f"Domains with fewer than shots + queries = {needed} blocks of {self.block_size} tokens: {small}. "
                "Lower block_size, shots or queries, add text to those domains, or remove them from the corpus."
            )
        return blocks

    @functools.cached_property
    def split_domains(self) -> dict[str, list[str]]:
        """Domain names of each split; the three splits are disjoint."""
        domains = sorted(self.domain_blocks)
        embedded = self.corpus is None
        val = self.val_domains or (list(EMBEDDED_VAL_DOMAINS) if embedded else None)
        test = self.test_domains or (list(EMBEDDED_TEST_DOMAINS) if embedded else None)
        if val is None or test is None:
            if len(domains) < 3:
                raise ValueError(f"Need at least 3 domains (train, val, test), found {len(domains)}: {domains}.")
            generator = torch.Generator().manual_seed(self.seed)
            shuffled = [domains[i] for i in torch.randperm(len(domains), generator=generator)]
            held_out = max(1, len(domains) // 10)
            val = val or shuffled[:held_out]
            test = test or [d for d in shuffled[held_out:] if d not in val][:held_out]
        unknown = sorted((set(val) | set(test)) - set(domains))
        if unknown:
            raise ValueError(f"Unknown domains {unknown} in val_domains/test_domains; domains: {domains}.")
        if set(val) & set(test):
            raise ValueError(f"Domains {sorted(set(val) & set(test))} are in both val_domains and test_domains.")
        train = [d for d in domains if d not in set(val) | set(test)]
        if not train:
            raise ValueError("Every domain is held out: leave at least one domain for training.")
        rank_zero_info(f"LM tasks: {len(train)} training domains; validation {sorted(val)}; test {sorted(test)}.")
        return {"train": train, "val": sorted(val), "test": sorted(test)}

    def sample_episode(self, generator: torch.Generator, split: str) -> Episode:
        domains = self.split_domains[split]
        domain = domains[int(torch.randint(len(domains), (), generator=generator))]
        blocks = self.domain_blocks[domain]
        chosen = torch.randperm(len(blocks), generator=generator)[: self.shots + self.queries]
        support, query = blocks[chosen[: self.shots]], blocks[chosen[self.shots :]]
        return Episode(
            support={"input_ids": support, "attention_mask": torch.ones_like(support)},
            query={"input_ids": query, "attention_mask": torch.ones_like(query)},
            shots=self.shots,
            metadata={"domain": domain, "task": domain, "block_ids": chosen},  # the domain is the task
        )


def tokenize_documents(tokenizer: Any, texts: list[str], eos_token_id: int, budget: int | None) -> torch.Tensor:
    """The token ids of ``texts``, each followed by ``eos_token_id``, cut at ``budget`` tokens (``None``: all)."""
    ids: list[int] = []
    for text in texts:
        if budget is not None:  # tokens average ~3.5 characters: skip tokenizing what would be cut off
            text = text[: 5 * (budget - len(ids))]
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_token_id]
        if budget is not None and len(ids) >= budget:
            ids = ids[:budget]
            break
    return torch.tensor(ids, dtype=torch.long)


def cut_into_blocks(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """``ids`` as ``(blocks, block_size)``, dropping the incomplete last block."""
    count = len(ids) // block_size
    return ids[: count * block_size].view(count, block_size)


def read_corpus(
    corpus: str | None, text_column: str = "text", domain_column: str | None = None
) -> dict[str, list[str]]:
    """Documents by domain: the embedded corpus (``None``), a folder of text files (a domain per
    file or sub-folder), or a table (:func:`~lightning_meta.data.tables.read_table`: a file, a glob or a
    ``save_to_disk`` folder) whose ``domain_column`` names the domain (all rows in one domain ``"all"``
    when it is ``None``)."""
    if corpus is None:
        return {domain: [text] for domain, text in embedded_domains().items()}
    path = Path(corpus).expanduser()
    if path.is_dir() and not is_saved_dataset(path):
        return _domains_from_folder(path)
    if path.is_file() and path.suffix.lower() in _TEXT_SUFFIXES:
        raise ValueError(
            f"corpus={corpus!r} is a single file, not a table: give the folder holding the text files (a domain per "
            "file or per sub-folder), or a table (.json, .jsonl, .csv, .parquet) with a domain_column."
        )
    return _domains_from_table(read_table(corpus), corpus, text_column, domain_column)


def _domains_from_table(
    table: Dataset, corpus: str, text_column: str, domain_column: str | None
) -> dict[str, list[str]]:
    absent = [c for c in (text_column, domain_column) if c is not None and c not in table.column_names]
    if absent:
        raise ValueError(
            f"corpus table needs text_column={text_column!r} and domain_column={domain_column!r}; "
            f"its columns are {table.column_names}."
        )
    texts = table[text_column]
    domains = table[domain_column] if domain_column is not None else None
    # An empty text is an empty document (a table of lines has many); None or NaN is no text.
    missing = {text_column: [row for row, text in enumerate(texts) if not isinstance(text, str) and is_missing(text)]}
    if domains is not None:
        missing[domain_column] = [row for row, domain in enumerate(domains) if is_missing(domain)]
    if any(missing.values()):
        raise ValueError(
            f"Missing values in corpus {corpus!r} (rows counted from 0): {describe_missing(missing, len(texts))}. "
            "Every row needs a text and a domain: filter those rows out of the table first."
        )
    not_text = [row for row, text in enumerate(texts) if not isinstance(text, str)]
    if not_text:
        shown = ", ".join(f"{row} ({texts[row]!r:.30})" for row in not_text[:5])
        raise ValueError(
            f"Corpus {corpus!r}: column {text_column!r} holds values that are not text in {len(not_text)} of "
            f"{len(texts)} rows (counted from 0): {shown}. Write every text as a string, or filter those rows out."
        )
    if domains is None:
        return {"all": texts}
    by_domain: dict[str, list[str]] = {}
    for text, domain in zip(texts, domains, strict=True):
        by_domain.setdefault(str(domain), []).append(text)
    return by_domain


def _domains_from_folder(folder: Path) -> dict[str, list[str]]:
    """A domain per file, or per sub-folder (its files, at any depth). Hidden files and folders (``.git``,
    ``.DS_Store``) are left out, and so are files that are not text, with a warning."""
    domains: dict[str, list[str]] = {}
    sources: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = [f for f in sorted(entry.rglob("*")) if f.is_file() and not _hidden(f.relative_to(folder))]
        else:
            files = [entry]
        texts = [text for f in files if f.suffix.lower() in _TEXT_SUFFIXES and (text := _read_text(f)) is not None]
        if texts:
            name = entry.stem if entry.is_file() else entry.name
            claim_name(sources, name, entry, "domain", "put them in one sub-folder named after the domain")
            domains[name] = texts
    if not domains:
        raise ValueError(
            f"No text files (.txt, .md, .rst, .py, .text, or no suffix) in corpus folder {folder}, leaving out "
            "hidden files and files that are not text."
        )
    return domains


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _read_text(file: Path) -> str | None:
    """The text of ``file``; ``None``, with a warning naming it, when it is binary rather than text."""
    data = file.read_bytes()
    if b"\x00" in data:
        rank_zero_warn(f"Leaving {file} out of the corpus: it holds NUL bytes, so it is binary, not text.")
        return None
    text = data.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd")
    if replaced > _MAX_NOT_UTF8 * len(text):
        rank_zero_warn(
            f"Leaving {file} out of the corpus: {replaced / len(text):.0%} of it is not UTF-8, so it is binary, or "
            f"text in another encoding (re-encode that to UTF-8, e.g. {reencode_command(file)})."
        )
        return None
    if replaced:
        rank_zero_warn(
            f"{file}: {replaced} byte sequences are not UTF-8 and read as U+FFFD. Re-encode the file to UTF-8, e.g. "
            f"{reencode_command(file)}"
        )
    return text
