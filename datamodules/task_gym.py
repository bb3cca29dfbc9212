"""The built-in task gym: text-to-text tasks built offline, for meta-training on many tasks.

A task is a prompt template with one ``{input}`` and its (input, output) examples; tasks come in
families (one kind of question asked of one source), and the default split holds out whole
families, so that validation and test tasks are new kinds of task, not new data of a seen kind.
Everything is built at run time, deterministically, from text already on the machine: the Python
standard library (read with ``ast``, see :mod:`lightning_meta.data.corpus`), the language reference
topics (``pydoc_data.topics``), WordNet 3.0 when Debian's ``wordnet-base`` is installed, and
generated rules. Example::

    from lightning_meta.datamodules.task_gym import DEFAULT_SPLIT, gym_tasks

    train_tasks = gym_tasks(DEFAULT_SPLIT["train"])  # WordNet families only where installed
    task = train_tasks[0]
    prompt = task.template.format(input=task.examples[0][0]) + " " + task.examples[0][1]

Every task has at least 40 examples with distinct inputs (tasks with fewer are dropped), inputs
of at most ``max_input_chars`` (text cut at a word boundary, code at a line boundary) and outputs
of at most ``max_output_chars`` (longer ones are dropped, not cut), and no input with two
different outputs. Left out as giving the answer away: in every family but the rule families,
examples whose input holds the output as whole words (ignoring case); besides, the examples each
family's description names (``GYM_FAMILIES[name].description``: a docstring naming a module, a
compound holding its hypernym, ...); in ``string_transform``, outputs equal to their input. No
input of a validation or test task is an input of a training task under :data:`DEFAULT_SPLIT`
(``label_permutation``'s docstrings are left out of ``docstring_to_module`` and ``summary_to_name``).

Families (``families_markdown()``; tasks and examples per task with the default limits on
Python 3.11 and WordNet 3.0):

| family | kind | source | tasks | examples per task | default split |
|---|---|---|---|---|---|
| `code_to_summary` | summarization | stdlib functions (ast) | 31 | 43-200 | train |
| `code_to_name` | generation | stdlib functions (ast) | 41 | 41-200 | train |
| `summary_to_name` | generation | stdlib functions (ast) | 20 | 41-200 | train |
| `name_to_module` | qa | stdlib definitions (ast) | 16 | 119-200 | val |
| `docstring_to_module` | classification | stdlib docstrings (ast) | 9 | 57-200 | train |
| `topic_to_title` | classification | pydoc_data.topics | 13 | 42-147 | test |
| `word_map` | rule induction | generated | 12 | 200 | train |
| `label_permutation` | rule induction | stdlib docstrings (ast) | 12 | 54-200 | val |
| `string_transform` | rule induction | generated | 12 | 200 | test |
| `gloss_to_word` | generation | WordNet 3.0 | 45 | 42-200 | train |
| `word_to_gloss` | generation | WordNet 3.0 | 43 | 55-200 | train |
| `word_to_hypernym` | generation | WordNet 3.0 | 40 | 45-200 | train |
| `word_to_antonym` | generation | WordNet 3.0 | 19 | 41-200 | train |
| `word_to_supersense` | classification | WordNet 3.0 | 8 | 200 | train |

Without WordNet: 166 tasks in 9 families (20,802 examples); with it: 321 tasks in 14 families (48,795).

Default split, and why: test holds ``topic_to_title`` (natural: the only family reading the
language reference, so no training family saw its text) and ``string_transform`` (rule
induction: a kind of rule no training family has); validation holds ``name_to_module`` (QA) and
``label_permutation`` (rule induction), for choosing hyper-parameters without touching the test
families. The three families built from stdlib functions (``code_to_summary``,
``code_to_name``, ``summary_to_name``) share their functions, so they all train: a held-out one
would be answered by memory. Every WordNet family trains, so that validation and test are the
same on machines with and without WordNet.

No WordNet text ships with this package: its tasks are read from the installed files at run time.
WordNet 3.0 is Copyright 2006 by Princeton University; its license (the header of every
``data.*`` file, and ``/usr/share/doc/wordnet-base/copyright``) permits copies that keep the
notice: keep it with any table of WordNet tasks you save or share.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_meta.data.corpus import WORDNET, wordnet_synsets
from lightning_meta.data.local_files import CACHE_FULL_REMEDY, cache_dir, write_file_atomically
from lightning_meta.datamodules.gym_builders import (  # noqa: F401 (the word lists: public names of this module)
    BUILDERS,
    ENGLISH_WORDS,
    MADE_UP_LABELS,
    MADE_UP_WORDS,
    WORDNET_BUILDERS,
    Limits,
    contains_words,
)

if TYPE_CHECKING:
    from datasets import Dataset

#: Fewer examples than this and a task is dropped.
MIN_EXAMPLES = 40


@dataclass(frozen=True)
class GymTask:
    """One task: a template with one ``{input}`` and (input, output) examples with distinct inputs."""

    name: str  # unique, e.g. "code_to_summary/email"
    family: str
    template: str  # e.g. "Code:\n{input}\nSummary:"
    examples: tuple[tuple[str, str], ...]  # outputs have no leading space
    options: tuple[str, ...] | None = None  # classification: every output of the task, sorted


@dataclass(frozen=True)
class GymFamily:
    name: str
    kind: str  # "summarization", "qa", "classification", "generation" or "rule induction"
    source: str
    description: str
    needs_wordnet: bool


GYM_FAMILIES: dict[str, GymFamily] = {
    family.name: family
    for family in (
        GymFamily(
            "code_to_summary",
            "summarization",
            "stdlib functions (ast)",
            "Code of a function (its name kept, its docstring removed, cut at a line) -> the first paragraph of its "
            "docstring, on one line. A task per top-level package or module.",
            False,
        ),
        GymFamily(
            "code_to_name",
            "generation",
            "stdlib functions (ast)",
            "Code of a public function with its name replaced by ___ everywhere (docstring removed) -> the name. A "
            "task per top-level package or module.",
            False,
        ),
        GymFamily(
            "summary_to_name",
            "generation",
            "stdlib functions (ast)",
            "First paragraph of a public function's docstring -> the function's name (not when the name, or its "
            "words, appear in the text). A task per top-level package or module.",
            False,
        ),
        GymFamily(
            "name_to_module",
            "qa",
            "stdlib definitions (ast)",
            "Public function, class or method name (Class.method) -> the top-level module defining it; names that "
            "contain the module's name are left out. A task per 5 modules (its options).",
            False,
        ),
        GymFamily(
            "docstring_to_module",
            "classification",
            "stdlib docstrings (ast)",
            "A docstring's first paragraph -> its top-level module; docstrings naming any of the task's modules are "
            "left out. A task per 5 modules (its options).",
            False,
        ),
        GymFamily(
            "topic_to_title",
            "classification",
            "pydoc_data.topics",
            "A paragraph of the language reference -> the title of its topic. A task per 6 topics (its options).",
            False,
        ),
        GymFamily(
            "word_map",
            "rule induction",
            "generated",
            "2-3 words of a fixed made-up vocabulary -> their translation, word by word, by a hidden per-task "
            "dictionary into English words; every task has the same inputs.",
            False,
        ),
        GymFamily(
            "label_permutation",
            "rule induction",
            "stdlib docstrings (ast)",
            "docstring_to_module with the modules renamed by made-up labels, a different assignment per task; "
            "tasks share module sets, so the same docstring has different labels in different tasks. Its "
            "docstrings (half of its groups', by a hash) are no training family's inputs.",
            False,
        ),
        GymFamily(
            "string_transform",
            "rule induction",
            "generated",
            "3-5 English words -> the same words under a hidden per-task composition of two string operations "
            "(reverse, sort, swap, case, shift letters, ...); every task has the same inputs.",
            False,
        ),
        GymFamily(
            "gloss_to_word",
            "generation",
            "WordNet 3.0",
            "A synset's definition -> its first word, unless the definition contains it (a reverse dictionary). A "
            "task per lexicographer file (noun.food, verb.motion, ...).",
            True,
        ),
        GymFamily(
            "word_to_gloss",
            "generation",
            "WordNet 3.0",
            "A word -> its definition; words with several senses in the task are left out. A task per lexicographer "
            "file.",
            True,
        ),
        GymFamily(
            "word_to_hypernym",
            "generation",
            "WordNet 3.0",
            "A noun or verb -> the first word of its hypernym (instance hypernym for named entities), unless the "
            "word contains it. A task per lexicographer file.",
            True,
        ),
        GymFamily(
            "word_to_antonym",
            "generation",
            "WordNet 3.0",
            "A word -> its antonym, unless the word contains it (unhappy -> happy). A task per lexicographer file.",
            True,
        ),
        GymFamily(
            "word_to_supersense",
            "classification",
            "WordNet 3.0",
            "A noun or verb -> its lexicographer file; words in several of the task's files are left out. A task "
            "per 5 files of one part of speech (its options).",
            True,
        ),
    )
}

DEFAULT_SPLIT: dict[str, tuple[str, ...]] = {
    "train": (
        "code_to_summary",
        "code_to_name",
        "summary_to_name",
        "docstring_to_module",
        "word_map",
        "gloss_to_word",
        "word_to_gloss",
        "word_to_hypernym",
        "word_to_antonym",
        "word_to_supersense",
    ),
    "val": ("name_to_module", "label_permutation"),
    "test": ("topic_to_title", "string_transform"),
}


def gym_tasks(
    families: Sequence[str] | None = None,
    *,
    wordnet: str | Path | None = WORDNET,
    max_examples_per_task: int = 200,
    max_input_chars: int = 200,
    max_output_chars: int = 80,
) -> list[GymTask]:
    """The tasks of ``families`` (default: every family), in family then task-name order.

    WordNet families are read from the folder ``wordnet``. With ``families=None`` or one of the
    :data:`DEFAULT_SPLIT` lists, WordNet families are skipped where WordNet is missing; asking for
    one by name without WordNet raises ``FileNotFoundError``.
    """
    if isinstance(families, str):
        raise TypeError(f"families={families!r} is one name: give a list, e.g. families=[{families!r}].")
    requested = tuple(GYM_FAMILIES) if families is None else tuple(dict.fromkeys(families))
    if unknown := [name for name in requested if name not in GYM_FAMILIES]:
        raise ValueError(f"Unknown gym families {unknown}; known: {', '.join(GYM_FAMILIES)}.")
    if max_examples_per_task < MIN_EXAMPLES:
        raise ValueError(f"max_examples_per_task={max_examples_per_task} is below {MIN_EXAMPLES}, a task's minimum.")
    folder = None if wordnet is None else Path(wordnet).expanduser()
    has_wordnet = folder is not None and all((folder / f"data.{p}").is_file() for p in ("noun", "verb", "adj", "adv"))
    if not has_wordnet:
        optional = families is None or requested in DEFAULT_SPLIT.values()
        needing = [name for name in requested if GYM_FAMILIES[name].needs_wordnet]
        if needing and not optional:
            where = "wordnet=None" if folder is None else f"no WordNet data.* files in {folder}"
            raise FileNotFoundError(
                f"Gym families {needing} need WordNet 3.0 but got {where}: install it with "
                f"`apt-get install wordnet-base` (files in {WORDNET}) and pass wordnet='{WORDNET}', or leave these "
                "families out."
            )
        requested = tuple(name for name in requested if not GYM_FAMILIES[name].needs_wordnet)
    limits = Limits(max_examples_per_task, max_input_chars, max_output_chars)
    wordnet_folder = str(folder.resolve()) if has_wordnet else None
    return [task for name in requested for task in _family_tasks(name, limits, wordnet_folder)]


def gym_table(
    families: Sequence[str] | None = None,
    *,
    wordnet: str | Path | None = WORDNET,
    max_examples_per_task: int = 200,
    max_input_chars: int = 200,
    max_output_chars: int = 80,
) -> Dataset:
    """:func:`gym_tasks` as a table, one row per example.

    Columns ``task``, ``family``, ``template``, ``input``, ``output`` and ``options`` (``None``
    unless the task is a classification).
    """
    from datasets import Dataset, Features, Sequence, Value

    tasks = gym_tasks(
        families,
        wordnet=wordnet,
        max_examples_per_task=max_examples_per_task,
        max_input_chars=max_input_chars,
        max_output_chars=max_output_chars,
    )
    rows = [(task, example) for task in tasks for example in task.examples]
    columns = {
        "task": [task.name for task, _ in rows],
        "family": [task.family for task, _ in rows],
        "template": [task.template for task, _ in rows],
        "input": [example[0] for _, example in rows],
        "output": [example[1] for _, example in rows],
        "options": [None if task.options is None else list(task.options) for task, _ in rows],
    }
    features = Features({name: Value("string") for name in columns if name != "options"})
    features["options"] = Sequence(Value("string"))
    return Dataset.from_dict(columns, features=features)


def families_markdown(wordnet: str | Path | None = WORDNET) -> str:
    """The table of families (kind, source, tasks, examples per task, default split) as markdown."""
    split_of = {name: split for split, names in DEFAULT_SPLIT.items() for name in names}
    lines = ["| family | kind | source | tasks | examples per task | default split |", "|---|---|---|---|---|---|"]
    for family in GYM_FAMILIES.values():
        try:
            tasks = gym_tasks([family.name], wordnet=wordnet)
        except FileNotFoundError:
            count, sizes = "needs WordNet", "-"
        else:
            counts = sorted(len(task.examples) for task in tasks)
            count, sizes = str(len(tasks)), f"{counts[0]}-{counts[-1]}" if counts[0] != counts[-1] else str(counts[0])
        row = [f"`{family.name}`", family.kind, family.source, count, sizes, split_of[family.name]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


#: Part of the on-disk cache key: raise it when a builder changes what it makes.
_CACHE_VERSION = 2


@functools.cache
def _family_tasks(family: str, limits: Limits, wordnet_folder: str | None) -> tuple[GymTask, ...]:
    """A family's tasks, built once and kept under ``$LIGHTNING_META_CACHE/task_gym`` (the stdlib parse is slow).

    The key holds the Python version (the stdlib is the source), the limits, and WordNet's folder.
    """
    key = f"{family}|{sys.version_info[:3]}|{limits}|{wordnet_folder}|{_CACHE_VERSION}"
    path = cache_dir() / "task_gym" / f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        try:
            return tuple(
                GymTask(
                    t["name"],
                    t["family"],
                    t["template"],
                    tuple(map(tuple, t["examples"])),
                    None if t["options"] is None else tuple(t["options"]),
                )
                for t in json.loads(path.read_text(encoding="utf-8"))
            )
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache file is rebuilt
    tasks = _build_family(family, limits, wordnet_folder)
    text = json.dumps([dataclasses.asdict(task) for task in tasks])
    # Atomic: concurrent processes never read half a file.
    write_file_atomically(
        path, lambda partial: partial.write_text(text, encoding="utf-8"), "the task gym cache", CACHE_FULL_REMEDY
    )
    return tasks


def _build_family(family: str, limits: Limits, wordnet_folder: str | None) -> tuple[GymTask, ...]:
    if GYM_FAMILIES[family].needs_wordnet:  # gym_tasks only asks for these with a WordNet folder
        pairs_by_task = WORDNET_BUILDERS[family](wordnet_synsets(wordnet_folder), limits)
    else:
        pairs_by_task = BUILDERS[family](limits)
    tasks = []
    for suffix, template, pairs, is_classification in pairs_by_task:
        drop_leaks = GYM_FAMILIES[family].kind != "rule induction"
        task = _task(f"{family}/{suffix}", family, template, pairs, limits, is_classification, drop_leaks)
        if task is not None:
            tasks.append(task)
    return tuple(sorted(tasks, key=lambda task: task.name))


def _task(
    name: str,
    family: str,
    template: str,
    pairs: list[tuple[str, str]],
    limits: Limits,
    is_classification: bool,
    drop_leaks: bool,
) -> GymTask | None:
    """The task of ``pairs`` within ``limits``, inputs distinct, or ``None`` with fewer than MIN_EXAMPLES.

    With ``drop_leaks``, examples whose input contains the output as whole words are left out.
    """
    outputs_of: dict[str, set[str]] = {}
    for text, output in pairs:
        outputs_of.setdefault(text, set()).add(output)
    # An input with two outputs is ambiguous: leave it out rather than pick one.
    unique = sorted((text, next(iter(outputs))) for text, outputs in outputs_of.items() if len(outputs) == 1)
    random.Random(name).shuffle(unique)

    def fits(example: tuple[str, str]) -> bool:
        text, output = example
        within = 0 < len(text) <= limits.max_input_chars and 0 < len(output) <= limits.max_output_chars
        return within and not (drop_leaks and contains_words(text, output))

    # Checked lazily, as the families have up to 18,000 candidates for 200 places.
    if is_classification:
        by_class: dict[str, list[tuple[str, str]]] = {}
        for example in unique:
            by_class.setdefault(example[1], []).append(example)
        kept = [itertools.islice(filter(fits, by_class[label]), limits.max_examples) for label in sorted(by_class)]
        # Round-robin over the classes, so that capping the examples keeps the classes balanced.
        candidates = (example for round_ in itertools.zip_longest(*kept) for example in round_ if example is not None)
    else:
        candidates = filter(fits, unique)
    examples = tuple(itertools.islice(candidates, limits.max_examples))
    if len(examples) < MIN_EXAMPLES:
        return None
    options = tuple(sorted({output for _, output in examples})) if is_classification else None
    return GymTask(name, family, template, examples, options)
