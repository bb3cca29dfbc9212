"""Few-shot text classification on the embedded standard-library docstrings, or on your own files."""

from __future__ import annotations

import json
import re
import sys
from typing import TYPE_CHECKING

from lightning_meta.data.tables import read_table
from lightning_meta.datamodules.episodic_classification import EpisodicClassificationDataModule

if TYPE_CHECKING:
    from datasets import Dataset

#: The name of the embedded dataset (no files needed).
STDLIB_DOCSTRINGS = "stdlib-docstrings"
#: Its classes, fixed so that tasks do not shift between Python versions: top-level standard-library
#: modules with >= 25 docstrings on Python 3.11 that are neither private, deprecated, nor turned into
#: packages in later versions. Split once, class-disjoint, 23 / 8 / 8.
STDLIB_DOCSTRING_CLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "ast",
        "bdb",
        "codecs",
        "configparser",
        "difflib",
        "doctest",
        "fractions",
        "functools",
        "inspect",
        "numbers",
        "operator",
        "optparse",
        "pdb",
        "pickletools",
        "platform",
        "pydoc",
        "random",
        "smtplib",
        "socketserver",
        "ssl",
        "subprocess",
        "tarfile",
        "turtle",
    ),
    "val": ("calendar", "contextlib", "enum", "ipaddress", "socket", "statistics", "traceback", "typing"),
    "test": ("dis", "ftplib", "imaplib", "mailbox", "os", "shutil", "symtable", "threading"),
}
MASK = "[MASK]"
_CACHE_VERSION = 1


def stdlib_docstrings() -> Dataset:
    """Docstrings of the modules in :data:`STDLIB_DOCSTRING_CLASSES`, labelled by module.

    Columns ``text`` and ``label`` (a ``ClassLabel`` over the module names, in sorted order).
    Every listed module name is replaced by ``[MASK]`` in every text, case-insensitively, with the
    identifier around it (``TarFile``, ``SSLSocket``, ``ssl_version``; names under five letters only
    as a word or a prefix such as ``SSLError``), so neither the name nor the place of the mask gives
    the label away. The docstrings are read with ``ast`` (see
    :func:`lightning_meta.data.corpus.module_docstrings`) and cached, as the whole parse takes seconds.
    """
    from datasets import ClassLabel, Dataset, Features, Value

    modules = sorted(name for names in STDLIB_DOCSTRING_CLASSES.values() for name in names)
    by_module = _cached_docstrings(modules)
    long_names = "|".join(re.escape(m) for m in sorted(modules, key=len, reverse=True) if len(m) >= 5)
    short_names = "|".join(re.escape(m) for m in modules if len(m) < 5)
    # Whole identifiers: `TarFile`, `SSLSocket` and `ssl_version` go, `enumerate` and `posix` stay.
    mask = re.compile(rf"\w*(?i:{long_names})\w*|\b(?i:{short_names})(?:[A-Z0-9_]\w*)?\b")
    texts, labels = [], []
    for label, module in enumerate(modules):
        for docstring in by_module.get(module, []):
            texts.append(mask.sub(MASK, docstring))
            labels.append(label)
    features = Features({"text": Value("string"), "label": ClassLabel(names=modules)})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


class TextClassificationDataModule(EpisodicClassificationDataModule):
    """N-way K-shot text classification episodes from the embedded dataset or local files.

    ``dataset="stdlib-docstrings"`` (the default) is :func:`stdlib_docstrings`: 39 standard-library
    modules as classes, with the fixed class-disjoint split :data:`STDLIB_DOCSTRING_CLASSES` (unless
    class lists are given). Anything else is a local file, glob or ``save_to_disk`` folder
    (:func:`~lightning_meta.data.tables.read_table`), split by ``seed``/``class_split`` or the class lists.

    Args:
        dataset: ``"stdlib-docstrings"``, a ``.json``/``.jsonl``/``.csv``/``.parquet`` file (suffix in
            any case) or a glob of them, or a ``save_to_disk`` folder.
        drop_missing: drop rows with no text or no label (None, NaN, empty) and log how many,
            instead of raising an error that lists them.
        Others: see :class:`EpisodicClassificationDataModule`.

    Example::

        lightning-meta fit --config configs/text_protonet.yaml --data.dataset=intents.jsonl \\
            --data.text_column=utterance --data.label_column=intent
    """

    def __init__(
        self,
        dataset: str = STDLIB_DOCSTRINGS,
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
        if not isinstance(dataset, str):
            raise TypeError(
                "TextClassificationDataModule takes a dataset name or path; for a datasets.Dataset object use "
                "EpisodicClassificationDataModule(dataset=...)."
            )
        super().__init__(
            dataset=dataset,
            text_column=text_column,
            label_column=label_column,
            tokenizer=tokenizer,
            max_length=max_length,
            ways=ways,
            shots=shots,
            queries=queries,
            meta_batch_size=meta_batch_size,
            batches_per_epoch=batches_per_epoch,
            num_eval_episodes=num_eval_episodes,
            num_val_tasks=num_val_tasks,
            num_test_tasks=num_test_tasks,
            eval_meta_batch_size=eval_meta_batch_size,
            train_classes=train_classes,
            val_classes=val_classes,
            test_classes=test_classes,
            class_split=class_split,
            drop_small_classes=drop_small_classes,
            drop_missing=drop_missing,
            seed=seed,
            num_workers=num_workers,
            allow_data_change=allow_data_change,
        )
        self.save_hyperparameters(ignore=["allow_data_change"])  # a resume's choice, not carried to the next

    def load_dataset(self) -> Dataset:
        if self.dataset == STDLIB_DOCSTRINGS:
            return stdlib_docstrings()
        return read_table(self.dataset)

    def class_lists(self) -> dict[str, list[str | int] | None]:
        lists = super().class_lists()
        if self.dataset == STDLIB_DOCSTRINGS and all(value is None for value in lists.values()):
            return {split: list(names) for split, names in STDLIB_DOCSTRING_CLASSES.items()}
        return lists


def _cached_docstrings(modules: list[str]) -> dict[str, list[str]]:
    """``module_docstrings()`` for ``modules``, cached on disk per Python version."""
    from lightning_meta.data.corpus import module_docstrings
    from lightning_meta.data.local_files import CACHE_FULL_REMEDY, cache_dir, write_file_atomically

    version = ".".join(map(str, sys.version_info[:3]))
    path = cache_dir() / "datasets" / f"{STDLIB_DOCSTRINGS}-py{version}-v{_CACHE_VERSION}.json"
    if path.exists():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if sorted(cached["modules"]) == modules:
            return cached["docstrings"]
    every = module_docstrings()
    docstrings = {module: every[module] for module in modules if module in every}
    text = json.dumps({"modules": modules, "docstrings": docstrings})
    # Write then rename: parallel processes never read a half-written file.
    write_file_atomically(
        path, lambda partial: partial.write_text(text, encoding="utf-8"), "the docstring cache", CACHE_FULL_REMEDY
    )
    return docstrings
