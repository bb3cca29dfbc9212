"""Language-modelling tasks: one task is one domain of text; support and query are token blocks."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_meta.corpus import embedded_domains
from lightning_meta.datamodules.base import EpisodicDataModule
from lightning_meta.tasks import Episode
from lightning_meta.tokenization import load_tokenizer

#: Held-out embedded domains: library code of unseen packages, and the language reference (prose).
EMBEDDED_VAL_DOMAINS = ("json", "wsgiref", "xmlrpc")
EMBEDDED_TEST_DOMAINS = ("email", "html", "tomllib", "reference")
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ""}
_TABLE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class LanguageModelingTasksDataModule(EpisodicDataModule):
    """Episodes of causal-LM adaptation to a domain.

    Each domain's text is tokenized, joined with end-of-text tokens and cut into blocks of
    ``block_size`` tokens. An episode picks one domain and ``shots + queries`` distinct blocks of
    it: adaptation sees the ``shots`` support blocks, the query blocks measure the adapted model.
    Training, validation and test domains are disjoint.

    Args:
        tokenizer: ``embedded-bpe-4096`` (trained locally and cached) or a local tokenizer folder.
        corpus: ``None`` for the embedded corpus (Python's standard-library code by package, its
            language reference, its docstrings); a folder (one domain per file, or per
            sub-folder); a ``json``/``jsonl``/``csv``/``parquet`` file or a ``save_to_disk``
            folder with a ``domain_column``.
        text_column: column holding the text, for tables.
        domain_column: column whose values are the domains, for tables.
        val_domains, test_domains: held-out domains; by default a fixed list for the embedded
            corpus and a seeded draw of 10% each (at least one) otherwise.
        block_size: tokens per block (per sequence).
        shots: support blocks per episode.
        queries: query blocks per episode.
        max_tokens_per_domain: tokenize at most this many tokens of each domain.
        meta_batch_size, batches_per_epoch, num_val_tasks, num_test_tasks, eval_meta_batch_size,
        seed, num_workers: see :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        tokenizer: str = "embedded-bpe-4096",
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
    ) -> None:
        super().__init__(
            meta_batch_size, batches_per_epoch, num_val_tasks, num_test_tasks, eval_meta_batch_size, seed, num_workers
        )
        if block_size < 2 or shots < 1 or queries < 1:
            raise ValueError(f"Need block_size >= 2, shots >= 1, queries >= 1; got {block_size}, {shots}, {queries}.")
        self.tokenizer = tokenizer
        self.corpus = corpus
        self.text_column = text_column
        self.domain_column = domain_column
        self.val_domains = val_domains
        self.test_domains = test_domains
        self.block_size = block_size
        self.shots = shots
        self.queries = queries
        self.max_tokens_per_domain = max_tokens_per_domain
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        load_tokenizer(self.tokenizer)  # trains and caches an embedded tokenizer once, before the ranks start

    def setup(self, stage: str) -> None:
        """Tokenize the corpus and split the domains (errors about the data surface here)."""
        self.split_domains  # noqa: B018 (computes and caches the blocks and the splits)

    @functools.cached_property
    def domain_blocks(self) -> dict[str, torch.Tensor]:
        """Token blocks ``(blocks, block_size)`` of every domain."""
        tokenizer = load_tokenizer(self.tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"Tokenizer {self.tokenizer!r} has no end-of-text token to separate documents.")
        blocks = {}
        for domain, documents in read_corpus(self.corpus, self.text_column, self.domain_column).items():
            ids: list[int] = []
            for document in documents:
                if self.max_tokens_per_domain:  # tokens average ~3.5 characters here: skip tokenizing the rest
                    document = document[: 5 * (self.max_tokens_per_domain - len(ids))]
                ids += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                if self.max_tokens_per_domain and len(ids) >= self.max_tokens_per_domain:
                    ids = ids[: self.max_tokens_per_domain]
                    break
            count = len(ids) // self.block_size
            blocks[domain] = torch.tensor(ids[: count * self.block_size], dtype=torch.long).view(count, self.block_size)
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
            support={"input_ids": support, "attention_mask": torch.ones_like(support), "labels": support.clone()},
            query={"input_ids": query, "attention_mask": torch.ones_like(query), "labels": query.clone()},
            shots=self.shots,
            metadata={"domain": domain, "block_ids": chosen},
        )


def read_corpus(
    corpus: str | None, text_column: str = "text", domain_column: str | None = None
) -> dict[str, list[str]]:
    """Documents by domain: the embedded corpus (``None``), a folder of text files (a domain per
    file or sub-folder), or a ``json``/``jsonl``/``csv``/``parquet`` file or ``save_to_disk`` folder
    whose ``domain_column`` names the domain (all rows in one domain ``"all"`` when it is ``None``)."""
    if corpus is None:
        return {domain: [text] for domain, text in embedded_domains().items()}
    path = Path(corpus).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus={corpus!r} does not exist.")
    if path.is_file() and path.suffix in _TABLE_FORMATS:
        import datasets

        table = datasets.load_dataset(_TABLE_FORMATS[path.suffix], data_files=str(path), split="train")
        return _domains_from_table(table, text_column, domain_column)
    if path.is_dir() and (path / "dataset_info.json").exists():
        import datasets

        return _domains_from_table(datasets.load_from_disk(str(path)), text_column, domain_column)
    if path.is_dir():
        return _domains_from_folder(path)
    raise ValueError(
        f"corpus={corpus!r}: give a folder of text files, a json/jsonl/csv/parquet file, or a save_to_disk folder."
    )


def _domains_from_table(table, text_column: str, domain_column: str | None) -> dict[str, list[str]]:  # noqa: ANN001
    missing = [c for c in (text_column, domain_column) if c is not None and c not in table.column_names]
    if missing:
        raise ValueError(
            f"corpus table needs text_column={text_column!r} and domain_column={domain_column!r}; "
            f"its columns are {table.column_names}."
        )
    if domain_column is None:
        return {"all": list(table[text_column])}
    domains: dict[str, list[str]] = {}
    for text, domain in zip(table[text_column], table[domain_column], strict=True):
        domains.setdefault(str(domain), []).append(text)
    return domains


def _domains_from_folder(folder: Path) -> dict[str, list[str]]:
    domains: dict[str, list[str]] = {}
    for entry in sorted(folder.iterdir()):
        files = sorted(f for f in entry.rglob("*") if f.is_file()) if entry.is_dir() else [entry]
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files if f.suffix in _TEXT_SUFFIXES]
        if texts:
            domains[entry.stem if entry.is_file() else entry.name] = texts
    if not domains:
        raise ValueError(f"No text files (.txt, .md, .rst, .py) in corpus folder {folder}.")
    return domains
