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

import ast
import functools
import hashlib
import json
import os
import posixpath
import random
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_meta.data.local_files import CACHE_FULL_REMEDY, cache_entry, write_folder_atomically
from lightning_meta.data.tables import TABLE_FORMATS, column_names, is_saved_dataset, read_table, table_columns
from lightning_meta.data.tasks import OUTPUT_REGEX, STOP_STRING
from lightning_meta.datamodules.templates import literal_template_text

if TYPE_CHECKING:
    from datasets import Dataset

#: BIG-bench's defaults for absent task fields (``bigbench/api/json_task.py``, ``JsonTask``).
BIGBENCH_INPUT_PREFIX = "\nQ: "
BIGBENCH_OUTPUT_PREFIX = "\nA: "
BIGBENCH_CHOICE_PREFIX = "\n  choice: "
BIGBENCH_EXAMPLE_SEPARATOR = "\n"
#: BIG-bench's task-level fields that a text-to-text table carries as columns of the same names: the text every
#: prompt of the task starts with (written once before in-context demonstrations), the text between demonstrations
#: (default :data:`BIGBENCH_EXAMPLE_SEPARATOR`), and the stop string and regular expression that cut a generated
#: output before it is compared (``bigbench/api/json_task.py``, ``model_utils.postprocess_output``).
TASK_PREFIX, EXAMPLE_SEPARATOR = "task_prefix", "few_shot_example_separator"
TASK_FIELDS = (TASK_PREFIX, EXAMPLE_SEPARATOR, STOP_STRING, OUTPUT_REGEX)

#: BIG-bench keywords that name a task's family, in order of precedence: a task's family is the
#: first of these among its keywords. They say what skill a task tests; format keywords
#: (``multiple choice``, ``zero-shot``, ...) are left out, since they would put most tasks in one family.
FAMILY_KEYWORDS: tuple[str, ...] = (
    "translation",
    "summarization",
    "computer code",
    "algorithms",
    "arithmetic",
    "mathematics",
    "logical reasoning",
    "reading comprehension",
    "contextual question-answering",
    "context-free question answering",
    "common sense",
    "causal reasoning",
    "physical reasoning",
    "analogical reasoning",
    "social reasoning",
    "emotional understanding",
    "theory of mind",
    "word sense disambiguation",
    "paraphrase",
    "linguistics",
    "morphology",
    "multilingual",
    "writing style",
    "creativity",
    "visual reasoning",
    "memorization",
    "truthfulness",
    "social bias",
    "gender bias",
    "racial bias",
    "religious bias",
)
#: The family of a BIG-bench task with none of the family keywords.
OTHER_FAMILY = "other"
#: The preset naming BIG-bench Lite's tasks, read from the source's ``bigbench/bbseqio/bigbench_lite.py``.
BIGBENCH_LITE = "bigbench_lite"
#: BIG-bench Lite's 24 tasks (the last list of ``bigbench/bbseqio/bigbench_lite.py``), for the hub mirrors, which
#: do not carry the list; a source archive or folder gives its own.
BIGBENCH_LITE_TASKS: tuple[str, ...] = (
    "auto_debugging",
    "bbq_lite_json",
    "code_line_description",
    "conceptual_combinations",
    "conlang_translation",
    "emoji_movie",
    "formal_fallacies_syllogisms_negation",
    "hindu_knowledge",
    "known_unknowns",
    "language_identification",
    "linguistics_puzzles",
    "logic_grid_puzzle",
    "logical_deduction",
    "misconceptions_russian",
    "novel_concepts",
    "operators",
    "parsinlu_reading_comprehension",
    "play_dialog_same_or_different",
    "repeat_copy_logic",
    "strange_stories",
    "strategyqa",
    "symbol_interpretation",
    "vitaminc_fact_verification",
    "winowhy",
)
#: BIG-bench tasks made from one another's examples (a translation, a reformatting): while one of a group is held
#: out, the others stay out of training, which would see its questions under another name and another wording (so
#: that the split's check of equal inputs misses them).
BIGBENCH_NEAR_DUPLICATES: tuple[frozenset[str], ...] = (
    frozenset({"misconceptions", "misconceptions_russian"}),  # the Lite task translates the other's statements
)
#: Natural-Instructions prompt, as in the Tk-Instruct paper (definition, positive examples, input).
NI_DEFINITION = "Definition: {definition}\n\n"
NI_EXAMPLE = "Positive Example {number} -\nInput: {input}\nOutput: {output}\n\n"
NI_QUERY = "Now complete the following example -\nInput: {input}\nOutput:"

#: Part of the cache key: raise it when the rows a reader makes change.
_CACHE_VERSION = 4  # 3: the scores column; 4: BIG-bench's task fields (TASK_FIELDS)
_TASK_FILE = "task.json"
_PROGRAMMATIC_FILE = "task.py"
_TASK_FILES = (_TASK_FILE, _PROGRAMMATIC_FILE)
_LITE_FILE = "bbseqio/bigbench_lite.py"
_NI_FILE = re.compile(r"task\d+_.*\.json")
#: How many of a folder's first task files are opened to recognise Natural-Instructions (one may be broken).
_NI_FILES_PROBED = 3
#: The columns of BIG-bench's hub mirrors (``tasksource/bigbench``, ``google/bigbench``); ``inputs`` is the prompt.
BIGBENCH_MIRROR_COLUMNS = ("inputs", "targets", "multiple_choice_targets", "multiple_choice_scores")
#: The columns of Natural-Instructions' hub mirror (``Muennighoff/natural-instructions``), one row per output.
NI_MIRROR_COLUMNS = ("task_name", "definition", "inputs", "targets")
#: A mirror's split folders: their tables belong to the task whose folder holds them.
_SPLIT_FOLDERS = frozenset({"train", "validation", "test", "default"})
#: How many of a folder's first tables are opened to recognise a mirror (a stray table may come first).
_MIRROR_TABLES_PROBED = 3
#: ``scores``: each option's BIG-bench ``target_scores`` value (the grade for choosing it), else ``None``.
COLUMNS = ("task", "family", "input", "output", "options", "template", "scores", *TASK_FIELDS)


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
    if _bigbench_root(path) is not None:
        return "bigbench"
    return "natural_instructions" if _ni_files(path) else _mirror_kind(path)


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
    path = Path(dataset).expanduser()
    kind = collection_kind(path)
    if kind is None:
        return None
    if max_examples_per_task is not None and max_examples_per_task < 1:
        raise ValueError(f"max_examples_per_task must be at least 1 or null; got {max_examples_per_task}.")
    if positive_examples < 0:  # a slice would read -1 as "all but the last"
        raise ValueError(
            f"positive_examples must be 0 or more (a task's positive examples in each prompt); got {positive_examples}."
        )
    keywords = tuple(FAMILY_KEYWORDS if family_keywords is None else family_keywords)
    settings = (kind, max_examples_per_task, seed, keywords if kind == "bigbench" else positive_examples)
    cached = cache_entry("task_collections", path.name, _cache_key(path, settings))
    if not (cached / "collection.json").is_file():
        if kind == "bigbench":
            reader = _BigBenchReader(max_examples_per_task, seed, keywords)
            rows, summary = reader.read(path)
        else:
            rows, summary = _read_natural_instructions(path, max_examples_per_task, seed, positive_examples)
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
    for table in _mirror_tables(folder):
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


def _mirror_tables(folder: Path) -> Iterator[Path]:
    """The first few tables in ``folder``: itself when ``save_to_disk`` wrote it, else its first ``save_to_disk``
    folders and table files (dot files left out)."""
    if is_saved_dataset(folder):
        yield folder
        return
    found = 0
    for entry in sorted(folder.rglob("*")):
        if found == _MIRROR_TABLES_PROBED:
            return
        if _hidden(entry.relative_to(folder).parts):
            continue
        if (entry.is_dir() and is_saved_dataset(entry)) or (
            entry.is_file() and entry.suffix.lower() in TABLE_FORMATS and not is_saved_dataset(entry.parent)
        ):
            found += 1
            yield entry


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


def _sample(count: int, cap: int | None, seed: int, task: str) -> list[int]:
    """Indices of a seeded sample of ``cap`` of ``count`` examples, in their order (all without a cap)."""
    if cap is None or count <= cap:
        return list(range(count))
    return sorted(random.Random(f"{seed}:{task}").sample(range(count), cap))


#: One example of a collection: input, outputs, options (or ``None``) and the options' scores (or ``None``).
_Example = tuple[str, list[str], list[str] | None, list[float] | None]


class _Rows:
    """Columns of the table being built, the problems found on the way and the count of examples dropped."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {column: [] for column in COLUMNS}
        self.problems: list[str] = []
        self.dropped = 0  # examples without the text they need (an empty input or target), left out

    def add(
        self, task: str, family: str, template: str, examples: list[_Example], fields: dict[str, str] | None = None
    ) -> None:
        """One row per example; ``fields``: the task's :data:`TASK_FIELDS` that it gives."""
        task_values = tuple((fields or {}).get(name) for name in TASK_FIELDS)
        for text, outputs, options, scores in examples:
            values = (task, family, text, outputs, options, template, scores, *task_values)
            for column, value in zip(COLUMNS, values, strict=True):
                self.columns[column].append(value)

    def problem(self, message: str) -> None:
        self.problems.append(message)


# BIG-bench


def _bigbench_root(folder: Path) -> Path | None:
    """The folder of task folders: ``folder`` itself, or its ``benchmark_tasks`` inside the source tree."""
    for candidate in (folder / "bigbench" / "benchmark_tasks", folder / "benchmark_tasks", folder):
        if candidate.is_dir() and any(
            (task / _TASK_FILE).is_file() or (task / _PROGRAMMATIC_FILE).is_file()
            for task in candidate.iterdir()
            if task.is_dir()
        ):
            return candidate
    return None


class _BadExample(ValueError):
    """What is wrong with an example (``what``, completing "it ...") and the ``fix``."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix


@dataclass
class _TaskFile:
    """One ``task.json``'s examples (capped) and the fields the prompt and family need."""

    keywords: list[str]
    template: str
    examples: list[_Example] | None  # None: a parent of subtasks
    fields: dict[str, str] = field(default_factory=dict)  # the TASK_FIELDS it gives


class _BigBenchReader:
    def __init__(self, cap: int | None, seed: int, family_keywords: tuple[str, ...]) -> None:
        self.cap = cap
        self.seed = seed
        self.family_keywords = family_keywords
        self.rows = _Rows()

    def read(self, path: Path) -> tuple[dict[str, list[Any]], dict[str, Any]]:
        """Rows and a summary (``message``, ``problems``, ``presets``) of the archive or folder at ``path``."""
        if path.is_dir() and _bigbench_root(path) is None:
            return self._read_mirror(path)
        files: set[tuple[str, ...]] = set()  # every file under the task root, as path parts
        tasks: dict[tuple[str, ...], _TaskFile] = {}
        lite: list[str] | None = None
        for parts, read in _archive_members(path) if path.is_file() else _folder_members(path):
            if parts[0] == "..":  # a file of the source tree outside the task root
                if "/".join(parts[1:]).endswith(_LITE_FILE):
                    lite = self._lite_names(read, path)
                continue
            files.add(parts)
            if parts[-1] == _TASK_FILE and len(parts) in (2, 3):
                where = f"{path}: {'/'.join(parts)}"
                if any(":" in part for part in parts[:-1]):  # else NAME:SUB and NAME/SUB would be one task
                    self._bad(
                        where,
                        "is in a folder whose name holds ':', which separates a task from its subtask "
                        "(NAME:SUBTASK is NAME/SUBTASK/task.json)",
                        "rename the folder without ':'",
                    )
                    continue
                try:
                    raw = read()
                except OSError as error:  # a link to a file that is not there
                    self._bad(where, f"cannot be read ({error})", "replace the link by the file itself")
                    continue
                task = self._task_file(parts, raw, where)
                if task is not None:
                    tasks[parts[:-1]] = task
        programmatic = self._assemble(files, tasks, path)
        presets = {BIGBENCH_LITE: lite} if lite is not None else {}
        return self._summary(path, f"; skipped {programmatic} programmatic tasks (task.py, no task.json),", presets)

    def _summary(self, path: Path, skipped: str, presets: dict[str, list[str]]) -> tuple[dict[str, list[Any]], dict]:
        task_count = len(set(self.rows.columns["task"]))
        message = (
            f"BIG-bench: {task_count} tasks, {len(self.rows.columns['task'])} examples from {path}"
            + (f" (at most {self.cap} per task)" if self.cap is not None else "")
            + f"{skipped} {len(self.rows.problems)} files with bad data (warned above)"
            + f" and {self.rows.dropped} examples with an empty target, or an empty input and no options"
        )
        return self.rows.columns, {"message": message, "problems": self.rows.problems, "presets": presets}

    def _read_mirror(self, root: Path) -> tuple[dict[str, list[Any]], dict[str, Any]]:
        """The rows of a folder of tasks as BIG-bench's hub mirrors ship them (see the module's docstring)."""
        sources: dict[tuple[str, ...], list[Path]] = {}
        for entry in sorted(root.iterdir()):
            if _hidden((entry.name,)):
                continue
            if entry.is_dir():
                self._mirror_folder(entry, (entry.name,), sources)
            elif entry.suffix.lower() in TABLE_FORMATS:
                sources[(entry.name[: -len(entry.suffix)],)] = [entry]
        for parts, tables in sorted(sources.items()):
            rows: list[dict[str, Any]] = []
            for table in tables:
                try:
                    read = read_table(str(table))
                except (ValueError, FileNotFoundError) as error:
                    self._bad(f"{table}", f"cannot be read ({error})", "fix or remove it")
                    continue
                missing = [column for column in BIGBENCH_MIRROR_COLUMNS if column not in read.column_names]
                if missing:
                    self._bad(
                        f"{table}",
                        f"lacks the column(s) {missing} of BIG-bench's mirrors",
                        f"give it {list(BIGBENCH_MIRROR_COLUMNS)}, or move it out of {root}",
                    )
                    continue
                columns = table_columns(read, list(BIGBENCH_MIRROR_COLUMNS))
                rows += [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
            prefix, suffix = _shared_ends([row["inputs"] for row in rows if isinstance(row["inputs"], str)])
            # The shared start is no task_prefix: the mirror's prompts cannot tell the task's prefix from the input's.
            task = {
                "example_input_prefix": prefix,
                "example_output_prefix": suffix,
                "append_choices_to_input": False,
                "examples": rows,
            }
            where = f"{root}: {'/'.join(parts)}"
            convert = functools.partial(_from_mirror, start=len(prefix), end=len(suffix))
            read_task = self._task_data(":".join(parts), task, where, convert) if rows else None
            if read_task is not None:
                self.rows.add(":".join(parts), OTHER_FAMILY, read_task.template, read_task.examples)
        return self._summary(root, ";", {BIGBENCH_LITE: list(BIGBENCH_LITE_TASKS)})

    def _mirror_folder(self, folder: Path, parts: tuple[str, ...], sources: dict[tuple[str, ...], list[Path]]) -> None:
        """Record the tables of the task in ``folder`` (its own and its split folders'), or of its subtasks."""
        if is_saved_dataset(folder):
            sources[parts] = [folder]
            return
        own: list[Path] = []
        subtasks: list[Path] = []
        for entry in sorted(folder.iterdir()):
            if _hidden((entry.name,)):
                continue
            if entry.is_file() and entry.suffix.lower() in TABLE_FORMATS:
                own.append(entry)
            elif entry.is_dir() and entry.name in _SPLIT_FOLDERS:
                own += (
                    [entry]
                    if is_saved_dataset(entry)
                    else sorted(
                        file
                        for file in entry.rglob("*")
                        if file.is_file()
                        and file.suffix.lower() in TABLE_FORMATS
                        and not _hidden(file.relative_to(entry).parts)
                    )
                )
            elif entry.is_dir():
                subtasks.append(entry)
        if own:
            sources[parts] = own
            if subtasks:
                self.rows.problem(
                    f"{folder} holds tables of its own, so its folders {[sub.name for sub in subtasks]} are left out "
                    f"(a task's folder holds its tables, or its subtasks' folders). To use them, move {parts[-1]}'s "
                    "tables into a subtask folder of their own."
                )
        elif len(parts) == 1:
            for subtask in subtasks:
                self._mirror_folder(subtask, (*parts, subtask.name), sources)

    def _assemble(self, files: set[tuple[str, ...]], tasks: dict[tuple[str, ...], _TaskFile], path: Path) -> int:
        """Add each task's rows; report subtask folders without ``task.json``; count programmatic tasks."""
        folders: dict[tuple[str, ...], set[str]] = {}
        for parts in files:
            for depth in (1, 2):
                if len(parts) > depth:
                    folders.setdefault(parts[:depth], set()).add(parts[depth] if len(parts) == depth + 1 else "/")
        programmatic = 0
        for folder, names in sorted(folders.items()):
            if _TASK_FILE in names:
                continue
            parent = tasks.get(folder[:1]) if len(folder) == 2 else None
            if len(folder) == 2 and (parent is None or parent.examples is not None):
                continue  # a helper folder of a task (scripts, data), or of a programmatic task
            if _PROGRAMMATIC_FILE in names:
                programmatic += 1
            elif "README.md" in names or any(name.endswith(".json") for name in names):
                self.rows.problem(
                    f"{path}: {'/'.join(folder)} has no {_TASK_FILE}: it looks like a task folder (it holds "
                    f"{sorted(names - {'/'})[:3]}). Add its {_TASK_FILE}, or move the folder out of the collection."
                )
        ignored: dict[str, list[str]] = {}  # a parent with examples -> its subtask folders, which are no tasks
        for folder, task in sorted(tasks.items()):
            name = ":".join(folder)
            parent = tasks.get(folder[:1]) if len(folder) == 2 else None
            if parent is not None and parent.examples is not None:
                ignored.setdefault(folder[0], []).append(folder[1])
                continue
            if task.examples is None:
                if not any(len(parts) == 3 and parts[0] == folder[0] and parts[2] in _TASK_FILES for parts in files):
                    self.rows.problem(
                        f"{path}: {folder[0]}/{_TASK_FILE} has no 'examples' and no subtask folders "
                        f"({folder[0]}/SUBTASK/{_TASK_FILE}). Add examples, or the subtasks' folders."
                    )
                continue
            keywords = parent.keywords if parent is not None else task.keywords
            family = next((keyword for keyword in self.family_keywords if keyword in keywords), OTHER_FAMILY)
            self.rows.add(name, family, task.template, task.examples, task.fields)
        for name, subtasks in sorted(ignored.items()):
            self.rows.problem(
                f"{path}: {name}/{_TASK_FILE} has 'examples', so its subtask folders {subtasks} are left out, as "
                f"BIG-bench leaves them (it reads a task's subtasks only when its {_TASK_FILE} has no examples). To "
                f"use them, move {name}'s examples into a subtask folder of their own, or the subtask folders out of "
                f"{name}."
            )
        return programmatic

    def _task_file(self, parts: tuple[str, ...], raw: bytes, where: str) -> _TaskFile | None:
        """The task in ``raw``, or ``None`` after reporting what is wrong with it."""
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return self._bad(where, f"is not valid JSON ({error})", "fix the file")
        if not isinstance(data, dict):
            return self._bad(where, "is not a JSON object", 'write one object {"examples": [...], ...}')
        keywords = data.get("keywords", [])
        if isinstance(keywords, str):  # "arithmetic, zero-shot": the keywords written as one text
            keywords = [keyword.strip() for keyword in keywords.split(",")]
        elif not isinstance(keywords, list):
            self.rows.problem(
                f"{where}: its 'keywords' ({keywords!r}) is not a list, so its family is {OTHER_FAMILY!r}. To give it "
                'one, write "keywords": ["arithmetic", ...].'
            )
            keywords = []
        keywords = [str(keyword) for keyword in keywords]
        if "examples" not in data:
            return (
                _TaskFile(keywords, "", None)
                if len(parts) == 2
                else self._bad(where, "has no 'examples'", 'add them: [{"input": ..., "target": ...}, ...]')
            )
        return self._task_data(":".join(parts[:-1]), data, where, keywords=keywords)

    def _task_data(
        self,
        name: str,
        data: dict[str, Any],
        where: str,
        convert: Callable[[Any], Any] | None = None,
        keywords: list[str] | None = None,
    ) -> _TaskFile | None:
        """The task ``name`` whose ``task.json`` fields are ``data`` (with ``examples``; each example as ``convert``
        makes it, when given, raising :class:`_BadExample` for a bad one), or ``None`` after reporting what is wrong."""
        texts = {
            key: data.get(key, default)
            for key, default in (
                (TASK_PREFIX, ""),
                ("example_input_prefix", BIGBENCH_INPUT_PREFIX),
                ("example_output_prefix", BIGBENCH_OUTPUT_PREFIX),
                ("choice_prefix", BIGBENCH_CHOICE_PREFIX),
                (EXAMPLE_SEPARATOR, BIGBENCH_EXAMPLE_SEPARATOR),
                (STOP_STRING, ""),
                (OUTPUT_REGEX, ""),
            )
        }
        not_text = [key for key, value in texts.items() if not isinstance(value, str)]
        if not_text or not isinstance(data["examples"], list):
            field_name = not_text[0] if not_text else "examples"
            return self._bad(
                where,
                f"has a {field_name!r} that is not {'text' if not_text else 'a list'}",
                f"make {field_name!r} a {'string' if not_text else 'list of examples'}",
            )
        template = (
            literal_template_text(texts["task_prefix"] + texts["example_input_prefix"])
            + "{input}"
            + literal_template_text(texts["example_output_prefix"])
        )
        append_choices = data.get("append_choices_to_input", True)
        examples: list[_Example] = []
        seen: set[tuple[str, tuple[str, ...] | None]] = set()
        bad: list[tuple[int, _BadExample]] = []
        for index, example in enumerate(data["examples"]):
            try:
                example = convert(example) if convert is not None else example
                converted = self._example(example, append_choices, texts["choice_prefix"])
            except _BadExample as error:
                bad.append((index, error))
                continue
            if converted is None:
                self.rows.dropped += 1
                continue
            # One example twice could land in an episode's support and query. Its options count: without
            # append_choices_to_input, examples with one (empty) input differ only in their options.
            key = (converted[0], tuple(sorted(converted[2])) if converted[2] else None)  # as the datamodule's
            if key not in seen:
                seen.add(key)
                examples.append(converted)
        if bad:
            index, first = bad[0]
            kept_all = f"skipped {len(bad)} of its {len(data['examples'])} examples"
            self.rows.problem(
                f"{where}: {kept_all if examples else 'skipped the task'}: example {index} {first.what}. To use "
                f"{'them' if len(bad) > 1 else 'it'}, {first.fix}."
            )
        if not examples:
            return None
        kept = _sample(len(examples), self.cap, self.seed, name)
        fields = {name: texts[name] for name in TASK_FIELDS if name in data}
        return _TaskFile(keywords or [], template, [examples[index] for index in kept], fields)

    def _example(self, example: Any, append_choices: bool, choice_prefix: str) -> _Example | None:
        """(input, outputs, options, the options' scores) of one example, as BIG-bench's ``default_format_fn``
        makes them (without the prefixes); ``None`` for an example with an empty target, or an empty input and no
        options to score (BIG-bench has a few)."""
        if not isinstance(example, dict) or not isinstance(example.get("input"), str):
            raise _BadExample("has no text 'input'", 'give every example an "input" string, or delete those examples')
        text = example["input"]
        scores = example.get("target_scores")
        if scores is not None and not (
            isinstance(scores, dict)
            and scores
            and all(isinstance(score, int | float) and not isinstance(score, bool) for score in scores.values())
        ):
            raise _BadExample(
                "has a 'target_scores' that is not a map of options to numbers",
                'write it as {"option": 1, "other option": 0, ...}',
            )
        best = max(scores.values()) if scores else 0
        # The highest score marks the correct options, whatever its sign (BIG-bench's grade is the chosen
        # option's score): {"a": 0, "b": -1} makes "a" correct.
        if scores and (best > min(scores.values()) or (len(scores) == 1 and best > 0)):
            options = list(scores)
            if append_choices:
                shuffled = sorted(options)
                # The right one is not always first. Seeded by the input, not the task: one question under two
                # task names reads the same, so that the split's overlap check sees it.
                random.Random(f"{self.seed}:{text}").shuffle(shuffled)
                text = text + choice_prefix + choice_prefix.join(shuffled)
            outputs, choices = [option for option in options if scores[option] == best], options
            # BIG-bench's multiple_choice_grade is the chosen option's score: partial credit where scores are graded.
            grades: list[float] | None = [float(scores[option]) for option in options]
        elif "target" in example:  # BIG-bench, too, takes the target when the scores name no correct option
            target = example["target"]
            outputs, choices, grades = target if isinstance(target, list) else [target], None, None
            if not all(isinstance(output, str) for output in outputs):
                raise _BadExample(
                    "has a 'target' that is not text", 'make it a string or a list of strings ("target": "...")'
                )
        elif scores:
            raise _BadExample(
                "has a 'target_scores' with no option scored above the others (and no 'target')",
                "give the correct options the highest score (e.g. 1), the others less (0)",
            )
        else:
            raise _BadExample(
                "has neither 'target' nor 'target_scores'",
                'give it "target": "..." (or a list of strings), or "target_scores"',
            )
        outputs = [output for output in outputs if output.strip()]
        return (text, outputs, choices, grades) if outputs and (text.strip() or choices) else None

    def _bad(self, where: str, what: str, fix: str) -> None:
        self.rows.problem(f"Skipped {where}: it {what}. To use it, {fix}.")

    def _lite_names(self, read: Callable[[], bytes], path: Path) -> list[str] | None:
        """BIG-bench Lite's task names: the last list in ``BIGBENCH_LITE_TASK_NAMES`` (a literal, read, never run)."""
        try:
            tree = ast.parse(read().decode("utf-8"))
            for node in tree.body:
                if isinstance(node, ast.Assign) and any(
                    isinstance(target, ast.Name) and target.id == "BIGBENCH_LITE_TASK_NAMES" for target in node.targets
                ):
                    versions = ast.literal_eval(node.value)
                    return [str(name) for name in list(versions.values())[-1]]
        except (SyntaxError, ValueError, UnicodeDecodeError, AttributeError, IndexError, OSError):
            pass
        self.rows.problem(
            f"{path}: cannot read the BIG-bench Lite task list in {_LITE_FILE}; the preset "
            f"{BIGBENCH_LITE!r} is unavailable (list test_tasks by name instead)."
        )
        return None


def _archive_members(archive: Path) -> Iterator[tuple[tuple[str, ...], Callable[[], bytes]]]:
    """(parts below ``benchmark_tasks``, reader) of each file of a BIG-bench source archive, read as a stream;
    parts start with ``..`` for files elsewhere (``bigbench/bbseqio/...``). A link is read as its target, as the
    folder reader reads it, from a second pass (the target may come before it); one whose target the archive does
    not hold reads as a missing file."""
    links: dict[str, list[tuple[str, ...]]] = {}  # a link's target (a member name) -> the parts of its links
    holds_tasks = holds_ni_files = False
    try:
        with tarfile.open(archive, "r|*") as members:  # a stream: each member is read once, in order
            for member in members:
                parts = _member_parts(member.name)
                holds_tasks |= parts[0] != ".."
                holds_ni_files |= _NI_FILE.fullmatch(parts[-1]) is not None
                if parts[0] != ".." and _hidden(parts):
                    continue
                if member.issym() or member.islnk():
                    links.setdefault(_link_target(member), []).append(parts)
                elif member.isfile():
                    yield parts, functools.partial(_read_member, archive, members, member)
        if links:
            with tarfile.open(archive, "r|*") as members:
                for member in members:
                    name = posixpath.normpath(member.name)
                    if name in links and member.isfile():
                        data = _read_member(archive, members, member)
                        for parts in links.pop(name):
                            yield parts, lambda data=data: data
            for target, sources in links.items():
                for parts in sources:
                    yield parts, functools.partial(_missing_target, target)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise _unreadable_archive(archive, error) from error
    if not holds_tasks:
        natural_instructions = (
            " (it holds Natural-Instructions task files: extract it, tar -xzf ARCHIVE, and give the folder of "
            "taskNNN_name.json files)"
        )
        raise ValueError(
            f"{archive} holds no benchmark_tasks/ folder, so it is not BIG-bench's source archive"
            + (natural_instructions if holds_ni_files else "")
            + ". Give a BIG-bench source archive (a google/BIG-bench source tarball) or a folder of task folders."
        )


def _member_parts(name: str) -> tuple[str, ...]:
    """An archive member's path parts below ``benchmark_tasks``, or ``..`` and all its parts for a file elsewhere."""
    name = posixpath.normpath(name)
    _, marker, tail = f"/{name}".partition("/benchmark_tasks/")
    return tuple(tail.split("/")) if marker else ("..", *name.split("/"))


def _link_target(member: tarfile.TarInfo) -> str:
    """The member name a link points at: a hard link names it, a symbolic link is relative to its folder."""
    if member.islnk():
        return posixpath.normpath(member.linkname)
    return posixpath.normpath(posixpath.join(posixpath.dirname(member.name), member.linkname))


def _read_member(archive: Path, members: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    try:
        return members.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:  # a truncated archive fails here
        raise _unreadable_archive(archive, error) from error


def _missing_target(target: str) -> bytes:
    raise FileNotFoundError(f"it links to {target}, which the archive does not hold")


def _unreadable_archive(archive: Path, error: BaseException) -> ValueError:
    return ValueError(
        f"Cannot read {archive} as a .tar.gz archive ({error}; a download cut short?). Download it again "
        "(a google/BIG-bench source tarball), or give the extracted folder."
    )


def _folder_members(folder: Path) -> Iterator[tuple[tuple[str, ...], Callable[[], bytes]]]:
    """Like :func:`_archive_members`, for an extracted source tree or a folder of task folders (a link to a file
    that is not there reads as a missing file)."""
    root = _bigbench_root(folder)
    for file in sorted(root.rglob("*")):
        if (file.is_file() or file.is_symlink()) and not _hidden(file.relative_to(root).parts):
            yield file.relative_to(root).parts, file.read_bytes
    lite = root.parent / _LITE_FILE
    if lite.is_file():
        yield ("..", *lite.parts), lite.read_bytes


def _hidden(parts: tuple[str, ...]) -> bool:
    """Dot files and Python's own (``__init__.py``, ``__pycache__``): never task data."""
    return any(part.startswith((".", "__")) for part in parts)


def _shared_ends(texts: list[str]) -> tuple[str, str]:
    """The text that every one of ``texts`` starts with, and ends with, each cut at whitespace so that no word is
    split, and dropped where a text would keep no non-blank middle; empty for fewer than two distinct texts."""
    if len(set(texts)) < 2:
        return "", ""
    start = os.path.commonprefix(texts)
    start = start[: len(start) - len(re.search(r"\S*$", start).group())]
    end = os.path.commonprefix([text[::-1] for text in texts])[::-1]
    end = end[len(re.match(r"\S*", end).group()) :]
    for prefix, suffix in ((start, end), (start, ""), ("", end)):
        if all(
            len(prefix) + len(suffix) <= len(text) and text[len(prefix) : len(text) - len(suffix)].strip()
            for text in texts
        ):
            return prefix, suffix
    return "", ""


def _from_mirror(row: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """A BIG-bench mirror's row as a ``task.json`` example: its prompt without the task's shared ``start`` and
    ``end`` characters, its targets, and its options with their scores as ``target_scores``."""
    text, options, scores = row["inputs"], row["multiple_choice_targets"] or [], row["multiple_choice_scores"] or []
    if not isinstance(text, str):
        raise _BadExample("has no text 'inputs'", 'give every row an "inputs" string, or delete those rows')
    if not isinstance(options, list) or not isinstance(scores, list) or len(options) != len(scores):
        raise _BadExample(
            "has 'multiple_choice_targets' and 'multiple_choice_scores' of different lengths",
            "give each option its score (1 for a correct option, 0 for the others)",
        )
    example = {"input": text[start : len(text) - end], "target": row["targets"] or []}
    if options:
        example["target_scores"] = dict(zip(options, scores, strict=True))
    return example


# Natural-Instructions v2


def _ni_files(folder: Path) -> list[Path]:
    """The Natural-Instructions task files in ``folder`` (or its ``tasks/``): files ``taskNNN_name.json``, one of
    the first few of which holds a ``"Definition"``."""
    for candidate in (folder / "tasks", folder):
        files = sorted(file for file in candidate.glob("task*.json") if _NI_FILE.fullmatch(file.name))
        if any(map(_holds_definition, files[:_NI_FILES_PROBED])):
            return files
    return []


def _holds_definition(file: Path) -> bool:
    """Whether ``file`` is a JSON object with a ``"Definition"``: seen in its opening, or (its keys in another
    order) in the whole file."""
    with file.open("rb") as opening:
        if b'"Definition"' in opening.read(1 << 16):
            return True
    try:
        data = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(data, dict) and "Definition" in data


def _read_natural_instructions(
    folder: Path, cap: int | None, seed: int, positive_examples: int
) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    rows = _Rows()
    files = _ni_files(folder)
    for file in files:
        problem = _ni_task(file, rows, cap, seed, positive_examples)
        if problem is not None:
            rows.problem(f"Skipped {file}: {problem}.")
    if not files:
        _read_ni_mirror(folder, rows, cap, seed, positive_examples)
    message = (
        f"Natural Instructions: {len(set(rows.columns['task']))} tasks, {len(rows.columns['task'])} examples from "
        f"{folder}"
        + (f" (at most {cap} per task)" if cap is not None else "")
        + f"; skipped {len(rows.problems)} files with bad data"
        + f" and {rows.dropped} instances without a text input and output"
    )
    return rows.columns, {"message": message, "problems": rows.problems, "presets": {}}


def _ni_task(file: Path, rows: _Rows, cap: int | None, seed: int, positive_examples: int) -> str | None:
    """Add the task in ``file`` to ``rows`` (its instances without a text input and output dropped and counted);
    or what is wrong with it and the fix."""
    try:
        data = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"it is not valid JSON ({error}). Fix the file"
    if not isinstance(data, dict):
        return "it is not a JSON object. Write one object with Definition, Positive Examples, Instances"
    return _ni_data(file.stem, data, rows, cap, seed, positive_examples)


def _read_ni_mirror(folder: Path, rows: _Rows, cap: int | None, seed: int, positive_examples: int) -> None:
    """Add the tasks of Natural-Instructions' hub mirror in ``folder`` (a ``save_to_disk`` folder, or its JSON-lines
    files in any of its folders) to ``rows``: one row per instance and output, gathered into the task's data."""
    first = next(_mirror_tables(folder))
    table = read_table(str(first if first == folder else folder / "**" / f"*{first.suffix}"))
    missing = [column for column in NI_MIRROR_COLUMNS if column not in table.column_names]
    if missing:
        raise ValueError(
            f"{folder}: a table of it lacks the column(s) {missing} of Natural-Instructions' mirror; "
            f"give every table {list(NI_MIRROR_COLUMNS)}."
        )
    tasks: dict[str, dict[str, Any]] = {}
    instances: dict[str, dict[str, list[Any]]] = {}  # task -> input -> its outputs, in order
    columns = table_columns(table, list(NI_MIRROR_COLUMNS))
    for name, definition, text, target in zip(*columns.values(), strict=True):
        if not isinstance(name, str) or not name.strip():
            rows.dropped += 1
            continue
        tasks.setdefault(name, {"Definition": definition})
        outputs = instances.setdefault(name, {}).setdefault(text if isinstance(text, str) else "", [])
        outputs += target if isinstance(target, list) else [target]
    for name, data in tasks.items():
        data["Instances"] = [{"input": text, "output": outputs} for text, outputs in instances[name].items()]
        problem = _ni_data(name, data, rows, cap, seed, positive_examples)
        if problem is not None:
            rows.problem(f"Skipped task {name} of {folder}: {problem}.")


def _ni_data(
    name: str, data: dict[str, Any], rows: _Rows, cap: int | None, seed: int, positive_examples: int
) -> str | None:
    """Add the task ``name`` whose fields are ``data`` (a task file's) to ``rows``; or what is wrong with it."""
    definition = data.get("Definition")
    definition = [definition] if isinstance(definition, str) else definition
    if not isinstance(definition, list) or not definition or not all(isinstance(part, str) for part in definition):
        return 'its "Definition" is not text. Make it a list of strings, ["Given a ..., answer ..."]'
    demonstrations = [example for example in data.get("Positive Examples") or [] if isinstance(example, dict)]
    # The task's own text is taken literally: a "{word}" in it is text, never a placeholder.
    definition_text = literal_template_text(" ".join(part.strip() for part in definition))
    prompt = NI_DEFINITION.format(definition=definition_text)
    for number, example in enumerate(demonstrations[:positive_examples], 1):
        if not isinstance(example.get("input"), str) or not isinstance(example.get("output"), str):
            return f'its positive example {number} lacks a text "input" or "output". Fix it, or use positive_examples=0'
        prompt += NI_EXAMPLE.format(
            number=number,
            input=literal_template_text(example["input"].strip()),
            output=literal_template_text(example["output"].strip()),
        )
    template = prompt + NI_QUERY
    instances = data.get("Instances")
    if not isinstance(instances, list) or not instances:
        return 'it has no "Instances". Add them: [{"id": ..., "input": ..., "output": [...]}, ...]'
    examples: list[_Example] = []
    seen: set[str] = set()
    for instance in instances:
        text = instance.get("input") if isinstance(instance, dict) else None
        outputs = instance.get("output") if isinstance(instance, dict) else None
        outputs = [outputs] if isinstance(outputs, str) else outputs if isinstance(outputs, list) else []
        outputs = [output for output in outputs if isinstance(output, str) and output.strip()]
        if not isinstance(text, str) or not text.strip() or not outputs:
            rows.dropped += 1
        elif text not in seen:
            seen.add(text)
            examples.append((text, outputs, None, None))
    if not examples:
        return 'none of its "Instances" has a text "input" and "output". Fix them: {"input": "...", "output": ["..."]}'
    categories = data.get("Categories")
    family = str(categories[0]) if isinstance(categories, list) and categories else OTHER_FAMILY
    rows.add(name, family, template, [examples[index] for index in _sample(len(examples), cap, seed, name)])
    return None
