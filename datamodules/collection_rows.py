"""What every task-collection reader builds (:mod:`~lightning_meta.datamodules.bigbench`,
:mod:`~lightning_meta.datamodules.natural_instructions`): the table's columns, one row per example, a seeded
per-task sample, and the files of a hub mirror's folder."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_meta.data.tables import TABLE_FORMATS, is_saved_dataset
from lightning_meta.data.tasks import OUTPUT_REGEX, STOP_STRING

#: BIG-bench's task-level fields that a text-to-text table carries as columns of the same names: the text every
#: prompt of the task starts with (written once before in-context demonstrations), the text between demonstrations
#: (default :data:`BIGBENCH_EXAMPLE_SEPARATOR`), and the stop string and regular expression that cut a generated
#: output before it is compared (``bigbench/api/json_task.py``, ``model_utils.postprocess_output``).
TASK_PREFIX, EXAMPLE_SEPARATOR = "task_prefix", "few_shot_example_separator"
TASK_FIELDS = (TASK_PREFIX, EXAMPLE_SEPARATOR, STOP_STRING, OUTPUT_REGEX)

#: The family of a task its collection names none for: a BIG-bench task with none of the family keywords, a
#: Natural-Instructions task without categories, every task of a hub mirror.
OTHER_FAMILY = "other"

#: How many of a folder's first tables are opened to recognise a mirror (a stray table may come first).
_MIRROR_TABLES_PROBED = 3
#: ``scores``: each option's BIG-bench ``target_scores`` value (the grade for choosing it), else ``None``.
COLUMNS = ("task", "family", "input", "output", "options", "template", "scores", *TASK_FIELDS)


def mirror_tables(folder: Path) -> Iterator[Path]:
    """The first few tables in ``folder``: itself when ``save_to_disk`` wrote it, else its first ``save_to_disk``
    folders and table files (dot files left out)."""
    if is_saved_dataset(folder):
        yield folder
        return
    found = 0
    for entry in sorted(folder.rglob("*")):
        if found == _MIRROR_TABLES_PROBED:
            return
        if is_hidden(entry.relative_to(folder).parts):
            continue
        if (entry.is_dir() and is_saved_dataset(entry)) or (
            entry.is_file() and entry.suffix.lower() in TABLE_FORMATS and not is_saved_dataset(entry.parent)
        ):
            found += 1
            yield entry


def sample_examples(count: int, cap: int | None, seed: int, task: str) -> list[int]:
    """Indices of a seeded sample of ``cap`` of ``count`` examples, in their order (all without a cap)."""
    if cap is None or count <= cap:
        return list(range(count))
    return sorted(random.Random(f"{seed}:{task}").sample(range(count), cap))


#: One example of a collection: input, outputs, options (or ``None``) and the options' scores (or ``None``).
Example = tuple[str, list[str], list[str] | None, list[float] | None]


class CollectionRows:
    """The table a collection reader builds: its columns (:data:`COLUMNS`), the problems found on the way and the
    count of examples dropped."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {column: [] for column in COLUMNS}
        self.problems: list[str] = []
        self.dropped = 0  # examples without the text they need (an empty input or target), left out

    def add(
        self, task: str, family: str, template: str, examples: list[Example], fields: dict[str, str] | None = None
    ) -> None:
        """One row per example; ``fields``: the task's :data:`TASK_FIELDS` that it gives."""
        task_values = tuple((fields or {}).get(name) for name in TASK_FIELDS)
        for text, outputs, options, scores in examples:
            values = (task, family, text, outputs, options, template, scores, *task_values)
            for column, value in zip(COLUMNS, values, strict=True):
                self.columns[column].append(value)

    def problem(self, message: str) -> None:
        self.problems.append(message)


def is_hidden(parts: tuple[str, ...]) -> bool:
    """Dot files and Python's own (``__init__.py``, ``__pycache__``): never task data."""
    return any(part.startswith((".", "__")) for part in parts)
