"""BIG-bench's JSON tasks, read from a source archive (as a stream), a source folder or a folder of task folders,
or from the hub mirrors' tables: one row per example (:class:`~lightning_meta.datamodules.collection_rows.
CollectionRows`). The layouts and rules are described in :mod:`~lightning_meta.datamodules.task_collections`."""

from __future__ import annotations

import ast
import functools
import json
import os
import posixpath
import random
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_meta.data.tables import TABLE_FORMATS, is_saved_dataset, read_table, table_columns
from lightning_meta.data.tasks import OUTPUT_REGEX, STOP_STRING
from lightning_meta.datamodules.collection_rows import (
    EXAMPLE_SEPARATOR,
    OTHER_FAMILY,
    TASK_FIELDS,
    TASK_PREFIX,
    CollectionRows,
    Example,
    is_hidden,
    sample_examples,
)
from lightning_meta.datamodules.natural_instructions import NI_FILE
from lightning_meta.datamodules.templates import literal_template_text

#: BIG-bench's defaults for absent task fields (``bigbench/api/json_task.py``, ``JsonTask``).
BIGBENCH_INPUT_PREFIX = "\nQ: "
BIGBENCH_OUTPUT_PREFIX = "\nA: "
BIGBENCH_CHOICE_PREFIX = "\n  choice: "
BIGBENCH_EXAMPLE_SEPARATOR = "\n"

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

_TASK_FILE = "task.json"
_PROGRAMMATIC_FILE = "task.py"
_TASK_FILES = (_TASK_FILE, _PROGRAMMATIC_FILE)
_LITE_FILE = "bbseqio/bigbench_lite.py"

#: The columns of BIG-bench's hub mirrors (``tasksource/bigbench``, ``google/bigbench``); ``inputs`` is the prompt.
BIGBENCH_MIRROR_COLUMNS = ("inputs", "targets", "multiple_choice_targets", "multiple_choice_scores")

#: A mirror's split folders: their tables belong to the task whose folder holds them.
_SPLIT_FOLDERS = frozenset({"train", "validation", "test", "default"})


def bigbench_root(folder: Path) -> Path | None:
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
    examples: list[Example] | None  # None: a parent of subtasks
    fields: dict[str, str] = field(default_factory=dict)  # the TASK_FIELDS it gives


class BigBenchReader:
    def __init__(self, cap: int | None, seed: int, family_keywords: tuple[str, ...]) -> None:
        self.cap = cap
        self.seed = seed
        self.family_keywords = family_keywords
        self.rows = CollectionRows()

    def read(self, path: Path) -> tuple[dict[str, list[Any]], dict[str, Any]]:
        """Rows and a summary (``message``, ``problems``, ``presets``) of the archive or folder at ``path``."""
        if path.is_dir() and bigbench_root(path) is None:
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
            if is_hidden((entry.name,)):
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
            if is_hidden((entry.name,)):
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
                        and not is_hidden(file.relative_to(entry).parts)
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
        examples: list[Example] = []
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
        kept = sample_examples(len(examples), self.cap, self.seed, name)
        fields = {name: texts[name] for name in TASK_FIELDS if name in data}
        return _TaskFile(keywords or [], template, [examples[index] for index in kept], fields)

    def _example(self, example: Any, append_choices: bool, choice_prefix: str) -> Example | None:
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
                holds_ni_files |= NI_FILE.fullmatch(parts[-1]) is not None
                if parts[0] != ".." and is_hidden(parts):
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
    root = bigbench_root(folder)
    for file in sorted(root.rglob("*")):
        if (file.is_file() or file.is_symlink()) and not is_hidden(file.relative_to(root).parts):
            yield file.relative_to(root).parts, file.read_bytes
    lite = root.parent / _LITE_FILE
    if lite.is_file():
        yield ("..", *lite.parts), lite.read_bytes


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
