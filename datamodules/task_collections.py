"""Task collections as users have them: BIG-bench JSON tasks and Natural-Instructions v2 task files.

Both become the text-to-text datamodule's table rows, one per example: ``task``, ``family``,
``input``, ``output`` (a list: every listed output counts as correct, the first is trained on),
``options`` (a multiple-choice example's options, else ``None``) and ``template`` (the prompt, with
``{input}`` where the input goes). A collection is read once, with a seeded per-task example cap,
into a table cached under :func:`~lightning_meta.data.local_files.cache_dir` (``task_collections/``), so
a second run starts in seconds. Nothing is downloaded.

**BIG-bench** (a source tarball of the google/BIG-bench repository, or the ``bigbench`` 1.0.0 source
archive the package index once served): the
``dataset`` is the ``.tar.gz`` itself (read as a stream, never extracted), the extracted source
folder, or any folder laid out like ``bigbench/benchmark_tasks`` (``NAME/task.json``, and
``NAME/SUBTASK/task.json`` for a task with subtasks, named ``NAME:SUBTASK``; as in BIG-bench, only a
``NAME/task.json`` without examples has subtasks). A linked ``task.json`` is read as its target, from
a folder and an archive alike. Prompts follow ``bigbench/api/json_task.py``: ``task_prefix +
example_input_prefix + input [+ choices] + example_output_prefix``, with its defaults (``"\\nQ: "``,
``"\\nA: "``, choices after ``"\\n  choice: "`` in a seeded order); the output follows the output prefix
directly, as in BIG-bench (the datamodule writes a space only after a prompt that does not end in
whitespace). The rows also carry the task's ``task_prefix``, ``few_shot_example_separator``,
``stop_string`` and ``output_regex`` (:data:`TASK_FIELDS`, where the task gives them): the datamodule writes
BIG-bench's K-shot prompts (``demonstrations="bigbench"``) and cuts generated outputs with them. ``target`` (a string
or a list) gives the outputs; ``target_scores`` gives the options (its keys, per example) and the
outputs (the options with the highest score, whatever its sign), and ``scores`` each option's score (the
grade for choosing it: BIG-bench's partial credit); an example with an empty input is
kept when its options carry it (``append_choices_to_input: false``). A task's family is the first of
``family_keywords`` among its keywords (a task with subtasks: the parent's), else ``"other"``. The
``canary`` field is never read into a prompt. Tasks with a ``task.py`` and no ``task.json``
(programmatic tasks) are skipped and counted.

**BIG-bench as its hub mirrors ship it** (``tasksource/bigbench``, ``google/bigbench``: columns ``inputs``, the
whole prompt, ``targets``, ``multiple_choice_targets``, ``multiple_choice_scores``, ``idx``): a folder holding one
folder or table file per task, as ``huggingface-cli download --repo-type dataset tasksource/bigbench`` lays it out
(``NAME/train-00000-of-00001.parquet``, ``NAME/validation-...``), or as ``load_dataset(MIRROR, NAME)
.save_to_disk(FOLDER/NAME)`` writes it, or ``NAME.parquet``/``NAME.jsonl``. A task's split files (beside each
other, or in ``train/``, ``validation/``, ``test/``, ``default/`` folders) are one task, an example in two
splits once; another folder inside a task's folder, holding no tables of its own, is a subtask
(``NAME:SUBTASK``). The text every prompt of a task starts and ends with (cut at whitespace: mostly ``Q: `` and
``\nA:``) becomes its template, the rest its input, so that a long input is cut between them; the options and
scores are read as from ``target_scores`` (the mirrors' scores are whole numbers: no partial credit). The mirrors
carry no keywords, so every task's family is ``"other"`` (hold tasks out by name), and no BIG-bench Lite list: the
preset is :data:`BIGBENCH_LITE_TASKS`.

**Natural-Instructions v2**: a folder of ``taskNNN_name.json`` files (or its parent, holding
``tasks/``). The prompt is the ``Definition`` and the first ``positive_examples`` of the
``Positive Examples``; ``Instances`` give the inputs and their outputs (an instance without a text
input and output is dropped, and counted); the family is the first of the ``Categories``. Or as its hub mirror
ships it (``Muennighoff/natural-instructions``: one row per instance and output, columns ``task_name``,
``definition``, ``inputs``, ``targets``, ``id``): its ``train/``/``test/`` JSON-lines files, or a ``save_to_disk``
folder; the mirror has no positive examples and no categories, so the prompt is the definition alone and the
family ``"other"``.

A task's own text goes into its template literally: a ``{word}`` in it is text, never a placeholder
(its braces are doubled, :func:`~lightning_meta.datamodules.templates.literal_template_text`).

A file with bad data is skipped with one warning naming the file and the fix; the rest loads, and
the count of skipped files is logged.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_meta.data.local_files import CACHE_FULL_REMEDY, cache_entry, write_folder_atomically
from lightning_meta.data.tables import column_names, read_table
from lightning_meta.datamodules.bigbench import (
    BIGBENCH_CHOICE_PREFIX,
    BIGBENCH_EXAMPLE_SEPARATOR,
    BIGBENCH_INPUT_PREFIX,
    BIGBENCH_LITE,
    BIGBENCH_LITE_TASKS,
    BIGBENCH_MIRROR_COLUMNS,
    BIGBENCH_NEAR_DUPLICATES,
    BIGBENCH_OUTPUT_PREFIX,
    FAMILY_KEYWORDS,
    BigBenchReader,
    bigbench_root,
)
from lightning_meta.datamodules.collection_rows import (
    COLUMNS,
    EXAMPLE_SEPARATOR,
    OTHER_FAMILY,
    TASK_FIELDS,
    TASK_PREFIX,
    mirror_tables,
)
from lightning_meta.datamodules.natural_instructions import (
    NI_DEFINITION,
    NI_EXAMPLE,
    NI_MIRROR_COLUMNS,
    NI_QUERY,
    ni_files,
    read_natural_instructions,
)

if TYPE_CHECKING:
    from datasets import Dataset

#: The public names: the reader's entry points, and the collections' constants, defined by the reader of each
#: (:mod:`~lightning_meta.datamodules.bigbench`, :mod:`~lightning_meta.datamodules.natural_instructions`,
#: :mod:`~lightning_meta.datamodules.collection_rows`) and importable from here as before.
__all__ = [
    "BIGBENCH_CHOICE_PREFIX",
    "BIGBENCH_EXAMPLE_SEPARATOR",
    "BIGBENCH_INPUT_PREFIX",
    "BIGBENCH_LITE",
    "BIGBENCH_LITE_TASKS",
    "BIGBENCH_MIRROR_COLUMNS",
    "BIGBENCH_NEAR_DUPLICATES",
    "BIGBENCH_OUTPUT_PREFIX",
    "COLUMNS",
    "EXAMPLE_SEPARATOR",
    "FAMILY_KEYWORDS",
    "NI_DEFINITION",
    "NI_EXAMPLE",
    "NI_MIRROR_COLUMNS",
    "NI_QUERY",
    "OTHER_FAMILY",
    "TASK_FIELDS",
    "TASK_PREFIX",
    "TaskCollection",
    "collection_kind",
    "near_duplicates",
    "read_task_collection",
    "resolve_task_names",
]

#: Part of the cache key: raise it when the rows a reader makes change.
_CACHE_VERSION = 5  # 3: the scores column; 4: BIG-bench's task fields (TASK_FIELDS); 5: NI repeated inputs merged


@dataclass(frozen=True)
class TaskCollection:
    """A task collection's rows (columns :data:`COLUMNS`) and its named task lists (``bigbench_lite``)."""

    kind: str  # "bigbench" or "natural_instructions"
    source: str
    table: Dataset
    presets: dict[str, list[str]] = field(default_factory=dict)


def collection_kind(path: Path) -> str | None:
    """``"bigbench"`` or ``"natural_instructions"`` when ``path`` holds that collection, else ``None``."""
    if path.is_file():
        return "bigbench" if path.name.endswith((".tar.gz", ".tgz")) else None
    if not path.is_dir():
        return None
    if bigbench_root(path) is not None:
        return "bigbench"
    return "natural_instructions" if ni_files(path) else _mirror_kind(path)


def check_max_examples_per_task(value: int | None) -> None:
    """Refuses a cap on each task's examples below 1 (a slice would read -1 as "all but the last", 0 as none)."""
    if value is not None and value < 1:
        raise ValueError(f"max_examples_per_task must be at least 1 or null (every example); got {value}.")


def read_task_collection(
    dataset: str,
    max_examples_per_task: int | None = None,
    seed: int = 0,
    family_keywords: list[str] | None = None,
    positive_examples: int = 2,
    min_examples: int = 1,
) -> TaskCollection | None:
    """The collection at ``dataset`` (``None`` when it is not one), from the cache when it was read before.

    ``max_examples_per_task`` keeps a seeded sample of each task's examples (their order kept);
    ``family_keywords`` overrides :data:`FAMILY_KEYWORDS`; ``positive_examples`` is how many of a
    Natural-Instructions task's positive examples go into its prompt. Tasks with fewer than
    ``min_examples`` distinct examples (an episode's ``shots + queries``) are left out and logged.
    """
    check_max_examples_per_task(max_examples_per_task)
    path = Path(dataset).expanduser()
    kind = collection_kind(path)
    if kind is None:
        return None
    if positive_examples < 0:  # a slice would read -1 as "all but the last"
        raise ValueError(
            f"positive_examples must be 0 or more (a task's positive examples in each prompt); got {positive_examples}."
        )
    keywords = tuple(FAMILY_KEYWORDS if family_keywords is None else family_keywords)
    settings = (kind, max_examples_per_task, seed, keywords if kind == "bigbench" else positive_examples)
    cached = cache_entry("task_collections", path.name, _cache_key(path, settings))
    if not (cached / "collection.json").is_file():
        if kind == "bigbench":
            reader = BigBenchReader(max_examples_per_task, seed, keywords)
            rows, summary = reader.read(path)
        else:
            rows, summary = read_natural_instructions(path, max_examples_per_task, seed, positive_examples)
        if not rows["task"]:
            raise ValueError(f"No usable task in {dataset}: {summary['message']}")

        def write(staging: Path) -> None:
            from datasets import Dataset

            Dataset.from_dict(rows).save_to_disk(str(staging))
            (staging / "collection.json").write_text(json.dumps(summary), encoding="utf-8")

        write_folder_atomically(cached, write, what="the collection's cache", remedy=CACHE_FULL_REMEDY)
    summary = json.loads((cached / "collection.json").read_text(encoding="utf-8"))
    for problem in summary["problems"]:  # also from the cache: the data is still bad
        rank_zero_warn(problem)
    rank_zero_info(f"{summary['message']} (cached in {cached})")
    table = read_table(str(cached))
    counts = Counter(table["task"])
    small = sorted(task for task, count in counts.items() if count < min_examples)
    if small:
        rank_zero_info(f"Left out {len(small)} tasks with fewer than {min_examples} examples: {small}.")
        table = table.select([row for row, task in enumerate(table["task"]) if counts[task] >= min_examples])
    return TaskCollection(kind, str(dataset), table, summary["presets"])


def resolve_task_names(
    names: list[str] | str, tasks: Collection[str], collection: TaskCollection | None, split: str
) -> list[str]:
    """``names`` with a preset (a string such as ``bigbench_lite``) replaced by its tasks, and a task
    (``NAME``) by itself and its subtasks (``NAME:SUBTASK``); names matching nothing are kept, for
    the caller's unknown-task error. A preset's tasks missing from ``tasks`` are left out and logged."""
    matches = _names_of(tasks)
    if isinstance(names, str):
        presets = collection.presets if collection is not None else {}
        if names not in presets:
            raise ValueError(
                f"Unknown preset {names!r} in {split}_tasks; presets of this data: {sorted(presets)} "
                f"({BIGBENCH_LITE!r} needs a BIG-bench source archive or folder). Or list task names."
            )
        wanted = presets[names]
        found = [name for name in wanted if name in matches]
        absent = sorted(set(wanted) - set(found))
        if not found:
            raise ValueError(f"None of the {len(wanted)} tasks of preset {names!r} ({split}_tasks) is in the data.")
        if absent:
            rank_zero_info(f"{split}_tasks={names}: {len(absent)} of its tasks are not in the data: {absent}.")
        names = found
    resolved: list[str] = []
    for name in names:
        resolved += matches.get(name, [name])
    return sorted(set(resolved))


def near_duplicates(
    held_out: Collection[str], tasks: Collection[str], collection: TaskCollection | None
) -> dict[str, str]:
    """Each of ``tasks`` that :data:`BIGBENCH_NEAR_DUPLICATES` groups with a ``held_out`` task (or a subtask of
    one), with that task: they stay out of training."""
    if collection is None or collection.kind != "bigbench":
        return {}
    held = {name.partition(":")[0]: name for name in sorted(held_out, reverse=True)}
    matches = _names_of(tasks)
    found: dict[str, str] = {}
    for group in BIGBENCH_NEAR_DUPLICATES:
        for source in sorted(group & held.keys()):
            for other in sorted(group - {source}):
                found |= {task: held[source] for task in matches.get(other, []) if task not in found}
    return found


def _names_of(tasks: Collection[str]) -> dict[str, list[str]]:
    """The tasks each name stands for: a task itself, and a parent (``NAME`` of ``NAME:SUBTASK``) all of its own:
    holding a task out holds out its subtasks too, even where a table lists both."""
    names: dict[str, list[str]] = {}
    for task in sorted(tasks):
        parent = task.partition(":")[0]
        names.setdefault(parent, []).append(task)
        if parent != task:
            names.setdefault(task, []).append(task)
    return names


def _mirror_kind(folder: Path) -> str | None:
    """``"natural_instructions"`` or ``"bigbench"`` when ``folder`` holds a collection as its hub mirrors ship it
    (recognised by the columns of one of its first tables), else ``None``."""
    for table in mirror_tables(folder):
        columns = set(column_names(table))
        if columns >= set(NI_MIRROR_COLUMNS):
            return "natural_instructions"
        if columns >= set(BIGBENCH_MIRROR_COLUMNS):
            if table == folder:
                raise ValueError(
                    f"{folder} is one BIG-bench task as its mirrors ship it; give the folder that holds one folder or "
                    "file per task (load_dataset(MIRROR, NAME).save_to_disk(FOLDER/NAME) for each task)."
                )
            return "bigbench"
    return None


def _cache_key(path: Path, settings: tuple) -> str:
    """Source path, size and modification time (of each task file, for a folder) and the settings."""
    resolved = path.resolve()
    if resolved.is_file():
        stats = [(str(resolved), resolved.stat().st_size, resolved.stat().st_mtime_ns)]
    else:
        stats = [
            (str(file), file.stat().st_size, file.stat().st_mtime_ns)
            for file in sorted(resolved.rglob("*"))
            if file.is_file()
        ]
    text = json.dumps([stats, settings, _CACHE_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
