"""N-way K-shot episodes from any labelled text dataset (a ``datasets.Dataset``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_meta.data.episodic import EpisodicDataModule
from lightning_meta.data.stream import data_fingerprint
from lightning_meta.data.tables import describe_missing, is_missing
from lightning_meta.data.tasks import Episode

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

SPLITS = ("train", "val", "test")
_INTEGER = re.compile(r"-?\d+")


class EpisodicClassificationDataModule(EpisodicDataModule):
    """Few-shot classification episodes over a dataset with a text and a label column.

    The classes are divided into disjoint train / val / test sets (at random from ``seed`` in
    the proportions ``class_split``, or as listed in ``train_classes`` / ``val_classes`` /
    ``test_classes``). An episode draws ``ways`` classes of one split, then ``shots`` support and
    ``queries`` query examples of each (disjoint), and relabels the classes 0..ways-1 in a random
    order. Splits hold ``input_ids`` and ``attention_mask`` (tokenized with ``tokenizer``, truncated
    to ``max_length``, padded to the longest text of the batch rounded up to a multiple of 8) and
    ``labels``; ``metadata["classes"]`` gives each episode's original class ids (names:
    :attr:`class_names`).

    Training batches, validation and test episodes are seeded as in :class:`EpisodicDataModule`:
    the same for every run and worker count, different on each DDP rank, resumable.

    Args:
        dataset: a ``datasets.Dataset`` (subclasses load one from elsewhere: :meth:`load_dataset`).
        text_column: the column holding the text (strings).
        label_column: the column holding the class (``ClassLabel``, strings or integers).
        tokenizer: ``embedded-wordpiece-4096`` (ships with the package; other sizes are trained and cached),
            a local folder with a Hugging Face tokenizer (normally the encoder's), or
            ``pkg:PACKAGE/dir`` for a folder inside an installed package.
        max_length: tokens per text, after truncation; shorter texts are padded.
        ways: N, classes per episode.
        shots: K, support examples per class.
        queries: query examples per class.
        meta_batch_size: episodes per training step.
        batches_per_epoch: training batches per epoch.
        num_eval_episodes: fixed validation and test episodes (600 is the few-shot convention).
        num_val_tasks, num_test_tasks: override ``num_eval_episodes`` for one split.
        eval_meta_batch_size: episodes per evaluation batch (default: ``meta_batch_size``).
        train_classes, val_classes, test_classes: explicit class lists (label names or values);
            classes listed nowhere are shared at random among the splits not given.
        class_split: train/val/test proportions for the classes split at random.
        drop_small_classes: leave out classes with fewer than ``shots + queries`` examples instead
            of raising an error.
        drop_missing: drop rows with no text or no label (None, NaN, an empty string, or -1 for a
            ``ClassLabel``) and log how many, instead of raising an error that lists them.
        seed: seeds the class split and every episode.
        num_workers: ``DataLoader`` workers for the training stream.
        allow_data_change: resume ``fit`` on other data than the checkpoint was trained on, with a warning
            (see :class:`EpisodicDataModule`).
    """

    def __init__(
        self,
        dataset: Dataset | None = None,
        text_column: str = "text",
        label_column: str = "label",
        tokenizer: str = "embedded-wordpiece-4096",
        max_length: int = 64,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        meta_batch_size: int = 4,
        batches_per_epoch: int = 100,
        num_eval_episodes: int = 600,
        num_val_tasks: int | None = None,
        num_test_tasks: int | None = None,
        eval_meta_batch_size: int | None = None,
        train_classes: list[str | int] | None = None,
        val_classes: list[str | int] | None = None,
        test_classes: list[str | int] | None = None,
        class_split: tuple[float, float, float] = (0.6, 0.2, 0.2),
        drop_small_classes: bool = False,
        drop_missing: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        allow_data_change: bool = False,
    ) -> None:
        super().__init__(
            meta_batch_size,
            batches_per_epoch,
            num_val_tasks if num_val_tasks is not None else num_eval_episodes,
            num_test_tasks if num_test_tasks is not None else num_eval_episodes,
            eval_meta_batch_size,
            seed,
            num_workers,
            allow_data_change,
        )
        if ways < 2:
            raise ValueError(f"ways must be >= 2 (a 1-way episode has nothing to classify), got {ways}.")
        if shots < 1 or queries < 1:
            raise ValueError(f"shots and queries must be >= 1, got shots={shots}, queries={queries}.")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {max_length}.")
        if len(class_split) != 3 or min(class_split) < 0 or sum(class_split) <= 0:
            raise ValueError(
                f"class_split must be three non-negative train/val/test proportions, got {tuple(class_split)}."
            )
        self.dataset = dataset
        self.text_column = text_column
        self.label_column = label_column
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.ways = ways
        self.shots = shots
        self.queries = queries
        self.num_eval_episodes = num_eval_episodes
        self.train_classes = train_classes
        self.val_classes = val_classes
        self.test_classes = test_classes
        self.class_split = tuple(class_split)
        self.drop_small_classes = drop_small_classes
        self.drop_missing = drop_missing
        #: every class of the dataset, by id (the ids of ``metadata["classes"]``).
        self.class_names: list[str] = []
        #: the class ids of each split.
        self.split_classes: dict[str, list[int]] = {}
        self._rows: dict[int, Tensor] = {}
        self._tokens: dict[str, Tensor] = {}

    def load_dataset(self) -> Dataset:
        """The dataset to draw episodes from; subclasses load it from files or build it."""
        if self.dataset is None:
            raise ValueError("No dataset given: pass dataset=<a datasets.Dataset with text and label columns>.")
        return self.dataset

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer named by ``tokenizer``."""
        from lightning_meta.data.tokenization import load_tokenizer

        return load_tokenizer(self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def prepare(self) -> None:
        """Load, check, split and tokenize the dataset (once; before any episode is drawn)."""
        if self._tokens:
            return
        tokenizer = self.load_tokenizer()
        if tokenizer.pad_token is None:
            raise ValueError(f"Tokenizer {self.tokenizer!r} has no padding token: set one (tokenizer.pad_token).")
        texts, labels, self.class_names = self._read_columns(self.load_dataset())
        class_ids = {name: index for index, name in enumerate(self.class_names)}
        label_ids = torch.tensor([class_ids[str(label)] for label in labels])
        self.split_classes = self._split_classes()
        self._check_class_sizes(label_ids)
        used = torch.cat([torch.nonzero(label_ids == c).flatten() for s in SPLITS for c in self.split_classes[s]])
        used = used.sort().values
        encoded = tokenizer(
            [texts[i] for i in used.tolist()],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        # Row r of the tokenized tensors is dataset row used[r].
        self._tokens = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        used_labels = label_ids[used]
        self._rows = {c: torch.nonzero(used_labels == c).flatten() for s in SPLITS for c in self.split_classes[s]}

    def data_fingerprint(self) -> str:
        """Of the classes, their split and every tokenized example."""
        self.prepare()
        return data_fingerprint(self.class_names, self.split_classes, self._tokens, self._rows)

    def sample_episode(self, generator: torch.Generator, split: str) -> Episode:
        self.prepare()
        chosen = self.choose_classes(generator, split)
        support_rows, query_rows = [], []
        for class_id in chosen:
            rows = self._rows[class_id]
            picked = rows[torch.randperm(len(rows), generator=generator)[: self.shots + self.queries]]
            support_rows.append(picked[: self.shots])
            query_rows.append(picked[self.shots :])
        labels = torch.arange(self.ways)
        return Episode(
            support=self._split(torch.cat(support_rows), labels.repeat_interleave(self.shots)),
            query=self._split(torch.cat(query_rows), labels.repeat_interleave(self.queries)),
            ways=self.ways,
            shots=self.shots,
            metadata={"classes": torch.tensor(chosen)},
        )

    def choose_classes(self, generator: torch.Generator, split: str) -> list[int]:
        """The ``ways`` class ids of one episode, in label order: uniform over the split's classes."""
        classes = self.split_classes[split]
        return [classes[i] for i in torch.randperm(len(classes), generator=generator)[: self.ways].tolist()]

    def _split(self, rows: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return {name: tensor[rows] for name, tensor in self._tokens.items()} | {"labels": labels}

    def class_lists(self) -> dict[str, list[str | int] | None]:
        """The explicit class list of each split (``None``: split at random)."""
        return {"train": self.train_classes, "val": self.val_classes, "test": self.test_classes}

    def _read_columns(self, dataset: Any) -> tuple[list[str], list[Any], list[str]]:
        """Texts, labels as class names, and every class name in a fixed order."""
        from datasets import Dataset, DatasetDict

        if isinstance(dataset, DatasetDict):
            raise ValueError(
                f"Got a DatasetDict with splits {list(dataset)}; give one Dataset (dataset['train']): classes are "
                "split into train/val/test by this datamodule."
            )
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
        if dataset.num_rows == 0:
            raise ValueError("The dataset is empty (0 rows): check the files or the filter that produced it.")
        for role, column in (("text_column", self.text_column), ("label_column", self.label_column)):
            if column not in dataset.column_names:
                raise ValueError(
                    f"The dataset has no column {column!r} ({role}); its columns are {dataset.column_names}. "
                    f"Set {role}=<one of them>."
                )
        texts, labels = self._drop_missing(dataset)
        text_type = getattr(dataset.features[self.text_column], "dtype", None)
        if text_type not in ("string", "large_string"):
            raise TypeError(
                f"Column {self.text_column!r} holds {dataset.features[self.text_column]}, not text. Set "
                "text_column to the column of strings, or convert it first "
                f"(dataset.cast_column({self.text_column!r}, datasets.Value('string')))."
            )
        feature = dataset.features[self.label_column]
        if hasattr(feature, "int2str"):  # ClassLabel: its declared names, present in the rows or not
            return texts, feature.int2str(labels), list(feature.names)
        # An integer column with an empty cell is read as floats (CSV): class 3.0 is class 3 again.
        if all(isinstance(label, float) and label.is_integer() for label in labels):
            labels = [int(label) for label in labels]
        _check_labels(labels, self.label_column)
        return texts, labels, _class_names(labels)

    def _drop_missing(self, dataset: Dataset) -> tuple[list[Any], list[Any]]:
        """The texts and labels of the rows that have both; rows missing either are an error, or are
        dropped with ``drop_missing`` (else NaN labels would become classes named ``nan``)."""
        texts, labels = list(dataset[self.text_column]), list(dataset[self.label_column])
        no_label = -1 if hasattr(dataset.features[self.label_column], "int2str") else None  # ClassLabel's "no label"
        missing = {
            self.text_column: [row for row, text in enumerate(texts) if is_missing(text)],
            self.label_column: [row for row, label in enumerate(labels) if is_missing(label) or label == no_label],
        }
        dropped = set().union(*missing.values())
        if not dropped:
            return texts, labels
        source = f" of {self.dataset!r}" if isinstance(self.dataset, str) else ""
        found = describe_missing(missing, dataset.num_rows)
        if not self.drop_missing:
            raise ValueError(
                f"Missing values in the rows{source} (counted from 0): {found}. Pass drop_missing=True "
                "(--data.drop_missing=true) to drop those rows, or filter them out of the data first."
            )
        if len(dropped) == dataset.num_rows:
            raise ValueError(f"Every row{source} misses its text or its label: {found}.")
        rank_zero_info(f"Dropping {len(dropped)} of {dataset.num_rows} rows{source} (drop_missing=True): {found}.")
        kept = [row for row in range(dataset.num_rows) if row not in dropped]
        return [texts[row] for row in kept], [labels[row] for row in kept]

    def _split_classes(self) -> dict[str, list[int]]:
        """Class ids per split: explicit lists first, the rest divided at random by ``class_split``."""
        ids = {name: index for index, name in enumerate(self.class_names)}
        explicit = self.class_lists()
        result: dict[str, list[int]] = {}
        for split, names in explicit.items():
            if names is None:
                continue
            unknown = [name for name in names if str(name) not in ids]
            if unknown:
                raise ValueError(
                    f"{split}_classes names classes the dataset does not have: {unknown}. Known classes: "
                    f"{self.class_names[:50]}{' ...' if len(self.class_names) > 50 else ''}."
                )
            result[split] = sorted({ids[str(name)] for name in names})
        taken = [c for classes in result.values() for c in classes]
        if len(taken) != len(set(taken)):
            shared = sorted({self.class_names[c] for c in taken if taken.count(c) > 1})
            raise ValueError(f"Classes {shared} are listed in more than one split; splits must be class-disjoint.")
        open_splits = [s for s in SPLITS if s not in result]
        rest = [c for c in range(len(self.class_names)) if c not in set(taken)]
        if open_splits:
            order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(self.seed)).tolist()
            shuffled = [rest[i] for i in order]
            weights = torch.tensor([self.class_split[SPLITS.index(s)] for s in open_splits], dtype=torch.float64)
            if weights.sum() == 0:
                weights = torch.ones_like(weights)
            bounds = [0, *torch.round(torch.cumsum(weights / weights.sum(), 0) * len(rest)).long().tolist()]
            for split, start, end in zip(open_splits, bounds, bounds[1:], strict=False):
                result[split] = sorted(shuffled[start:end])
        return {split: result[split] for split in SPLITS}

    def _check_class_sizes(self, label_ids: Tensor) -> None:
        needed = self.shots + self.queries
        counts = torch.bincount(label_ids, minlength=len(self.class_names))
        small = {s: [c for c in self.split_classes[s] if counts[c] < needed] for s in SPLITS}
        if any(small.values()):
            listing = ", ".join(f"{self.class_names[c]!r} ({int(counts[c])})" for s in SPLITS for c in small[s])
            if not self.drop_small_classes:
                raise ValueError(
                    f"Each class needs shots + queries = {needed} examples; these have fewer: {listing}. Lower "
                    "shots or queries, or pass drop_small_classes=True (--data.drop_small_classes=true) to leave "
                    "them out."
                )
            rank_zero_info(f"Leaving out classes with fewer than {needed} examples: {listing}.")
            self.split_classes = {s: [c for c in self.split_classes[s] if c not in small[s]] for s in SPLITS}
        for split in SPLITS:
            available = len(self.split_classes[split])
            if available < self.ways:
                raise ValueError(
                    f"The {split} split has {available} classes with >= {needed} examples, but ways={self.ways}. "
                    f"Lower ways, give the {split} split more classes ({split}_classes=[...] or class_split), or "
                    "use a dataset with more classes."
                )


def _check_labels(labels: list[Any], column: str) -> None:
    """Refuses labels that are not one class each (a list would become a class named ``"['a', 'b']"``) and
    labels that differ only by spaces at their ends (``"intent_0"`` and ``"intent_0 "``: two classes)."""
    several = [row for row, label in enumerate(labels) if isinstance(label, list | tuple | dict)]
    if several:
        raise ValueError(
            f"Column {column!r} holds {type(labels[several[0]]).__name__}s, not one class per row (row "
            f"{several[0]}: {labels[several[0]]!r:.60}). Give each row one label (a string or an integer); for "
            "several labels per text, write one row per label."
        )
    by_stripped: dict[str, set[str]] = {}
    for label in {label for label in labels if isinstance(label, str)}:
        by_stripped.setdefault(label.strip(), set()).add(label)
    spaced = sorted(sorted(variants) for variants in by_stripped.values() if len(variants) > 1)
    if spaced:
        raise ValueError(
            f"Column {column!r} has labels that differ only by spaces at their ends, which would be separate "
            f"classes: {', '.join(' and '.join(map(repr, pair)) for pair in spaced[:3])}. Strip the labels "
            "(dataset.map), or fix those rows."
        )


def _class_names(labels: list[Any]) -> list[str]:
    """Distinct labels as strings, in a fixed order: numeric for integer labels, also when a CSV gave them as
    text (``2`` before ``10``, as before CSV cells were read as text); else by text."""
    distinct = {str(label) for label in labels}
    if all(_INTEGER.fullmatch(label) for label in distinct):
        return sorted(distinct, key=lambda label: (int(label), label))  # "7" and "07": both kept, in a fixed order
    return sorted(distinct)
