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
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_meta.data.corpus import SUPERSENSES, WORDNET, Synset, stdlib_definitions, wordnet_synsets
from lightning_meta.data.local_files import CACHE_FULL_REMEDY, cache_dir, write_file_atomically

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

#: Made-up words: the source vocabulary of ``word_map``.
MADE_UP_WORDS: tuple[str, ...] = ("dax", "wug", "blicket", "fep", "zorp", "toma")
#: Made-up class labels of ``label_permutation`` (one per module of a task).
MADE_UP_LABELS: tuple[str, ...] = ("kiki", "lug", "mib", "tufa", "gazzer")
#: Common English words: the meanings of ``word_map`` and the inputs of ``string_transform``.
ENGLISH_WORDS: tuple[str, ...] = (
    "apple",
    "bird",
    "blue",
    "boat",
    "bread",
    "chair",
    "cloud",
    "cold",
    "dog",
    "door",
    "dream",
    "fast",
    "fire",
    "fish",
    "flower",
    "game",
    "glass",
    "green",
    "happy",
    "horse",
    "house",
    "lamp",
    "light",
    "moon",
    "music",
    "night",
    "ocean",
    "paper",
    "rain",
    "red",
    "river",
    "road",
    "salt",
    "sand",
    "slow",
    "snow",
    "song",
    "stone",
    "storm",
    "sun",
    "table",
    "tall",
    "tree",
    "warm",
    "water",
    "wind",
    "winter",
    "wood",
    "yellow",
    "young",
)
_WORD_MAP_TASKS = 12
_LABEL_PERMUTATION_GROUPS, _LABEL_PERMUTATIONS_PER_GROUP = 3, 4
_STRING_TRANSFORM_TASKS = 12


@dataclass(frozen=True)
class _Limits:
    max_examples: int
    max_input_chars: int
    max_output_chars: int


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
    limits = _Limits(max_examples_per_task, max_input_chars, max_output_chars)
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
def _family_tasks(family: str, limits: _Limits, wordnet_folder: str | None) -> tuple[GymTask, ...]:
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


def _build_family(family: str, limits: _Limits, wordnet_folder: str | None) -> tuple[GymTask, ...]:
    if GYM_FAMILIES[family].needs_wordnet:  # gym_tasks only asks for these with a WordNet folder
        pairs_by_task = _WORDNET_BUILDERS[family](wordnet_synsets(wordnet_folder), limits)
    else:
        pairs_by_task = _BUILDERS[family](limits)
    tasks = []
    for suffix, template, pairs, is_classification in pairs_by_task:
        drop_leaks = GYM_FAMILIES[family].kind != "rule induction"
        task = _task(f"{family}/{suffix}", family, template, pairs, limits, is_classification, drop_leaks)
        if task is not None:
            tasks.append(task)
    return tuple(sorted(tasks, key=lambda task: task.name))


# One task before its final filtering: (name suffix, template, (input, output) pairs, is classification).
_Draft = tuple[str, str, list[tuple[str, str]], bool]


def _task(
    name: str,
    family: str,
    template: str,
    pairs: list[tuple[str, str]],
    limits: _Limits,
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
        return within and not (drop_leaks and _contains(text, output))

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


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _clip(text: str, limit: int) -> str:
    """``text`` on one line, cut at the last word boundary within ``limit`` characters."""
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit + 1].rsplit(" ", 1)[0]


def _clip_code(code: str, limit: int) -> str:
    """The first lines of ``code`` that fit ``limit`` characters; "" unless two lines fit."""
    kept: list[str] = []
    for line in (line.rstrip() for line in code.splitlines()):
        if not line:
            continue
        if sum(len(k) + 1 for k in kept) + len(line) > limit:
            break
        kept.append(line)
    return "\n".join(kept) if len(kept) >= 2 else ""


def _contains(text: str, phrase: str) -> bool:
    """Whether ``phrase`` is in ``text`` as whole words, ignoring case."""
    # The substring test first: it is fast, and most pairs fail it.
    return phrase.lower() in text.lower() and re.search(rf"(?i)(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


def _summary(docstring: str) -> str:
    """A docstring's first paragraph on one line."""
    return _one_line(docstring.strip().split("\n\n")[0])


def _group(module: str) -> str:
    return module.split(".")[0]


def _is_public(qualname: str) -> bool:
    return not any(part.startswith("_") for part in qualname.split("."))


def _by_group(pairs: list[tuple[str, tuple[str, str]]], template: str) -> list[_Draft]:
    groups: dict[str, list[tuple[str, str]]] = {}
    for group, pair in pairs:
        groups.setdefault(group, []).append(pair)
    return [(group, template, groups[group], False) for group in sorted(groups)]


def _code_to_summary(limits: _Limits) -> list[_Draft]:
    pairs = []
    for definition in stdlib_definitions():
        if definition.is_class or not definition.docstring or not definition.code:
            continue
        code = _clip_code(definition.code, limits.max_input_chars)
        if code:
            pairs.append((_group(definition.module), (code, _summary(definition.docstring))))
    return _by_group(pairs, "Code:\n{input}\nSummary:")


def _code_to_name(limits: _Limits) -> list[_Draft]:
    pairs = []
    for definition in stdlib_definitions():
        name = definition.qualname.rsplit(".", 1)[-1]
        if definition.is_class or not definition.code or not _is_public(definition.qualname):
            continue
        code = _clip_code(re.sub(rf"\b{re.escape(name)}\b", "___", definition.code), limits.max_input_chars)
        if code:
            pairs.append((_group(definition.module), (code, name)))
    return _by_group(pairs, "Code:\n{input}\nName of ___:")


def _summary_to_name(limits: _Limits) -> list[_Draft]:
    pairs = []
    for definition in stdlib_definitions():
        name = definition.qualname.rsplit(".", 1)[-1]
        if definition.is_class or not definition.docstring or not _is_public(definition.qualname):
            continue
        summary = _clip(_summary(definition.docstring), limits.max_input_chars)
        if not _contains(summary, name.replace("_", " ")) and summary not in _validation_docstrings(limits):
            pairs.append((_group(definition.module), (summary, name)))
    return _by_group(pairs, "Description: {input}\nFunction name:")


def _mentions(text: str, module: str) -> bool:
    """Whether ``text`` names ``module``: anywhere for long names, as a word for short ones (re, os)."""
    return module.lower() in text.lower() if len(module) >= 4 else _contains(text, module)


def _module_groups(family: str, texts_by_module: dict[str, list[str]], minimum: int) -> list[list[str]]:
    """Modules with at least ``minimum`` texts, shuffled by ``family``, in groups of 5 (a smaller rest is dropped)."""
    modules = sorted(module for module, texts in texts_by_module.items() if len(texts) >= minimum)
    random.Random(family).shuffle(modules)
    return [sorted(modules[i : i + 5]) for i in range(0, len(modules) - 4, 5)]


def _top_level_texts(text_of: Callable[[str, str, str], str | None]) -> dict[str, list[str]]:
    """``text_of(module, qualname, docstring)`` of public definitions of public top-level modules, by module."""
    texts: dict[str, list[str]] = {}
    for definition in stdlib_definitions():
        if "." in definition.module or not _is_public(definition.module + "." + definition.qualname):
            continue
        text = text_of(definition.module, definition.qualname, definition.docstring or "")
        if text:
            texts.setdefault(definition.module, []).append(text)
    return texts


def _name_to_module(limits: _Limits) -> list[_Draft]:
    def name(module: str, qualname: str, docstring: str) -> str | None:
        return None if _mentions(qualname, module) else qualname

    names = _top_level_texts(name)
    drafts = []
    for modules in _module_groups("name_to_module", names, minimum=12):
        pairs = [(text, module) for module in modules for text in names[module]]
        template = "Question: Which standard-library module defines {input}?\nAnswer:"
        drafts.append(("-".join(modules), template, pairs, True))
    return drafts


@functools.cache
def _docstring_groups(limits: _Limits) -> list[tuple[list[str], list[tuple[str, str]]]]:
    """Groups of 5 modules and their (docstring, module) pairs, docstrings that name a group's module left out."""
    limit = limits.max_input_chars
    docstrings = _top_level_texts(lambda module, qualname, docstring: _clip(_summary(docstring), limit))
    groups = []
    for modules in _module_groups("docstring_to_module", docstrings, minimum=20):
        pairs = [
            (text, module)
            for module in modules
            for text in docstrings[module]
            if not any(_mentions(text, other) for other in modules)
        ]
        groups.append((modules, pairs))
    return groups


def _label_permutation_groups(limits: _Limits) -> list[tuple[list[str], list[tuple[str, str]]]]:
    """The module groups of ``label_permutation`` (validation), with half of their docstrings (chosen by a hash).

    The other half stays with ``docstring_to_module`` (training), and no training family uses these
    docstrings as inputs (:func:`_validation_docstrings`): validation then measures learning the
    task's labels from the support, not recalling a docstring seen in training.
    """
    return [
        (modules, [pair for pair in pairs if hashlib.sha256(pair[0].encode()).digest()[0] % 2 == 0])
        for modules, pairs in _docstring_groups(limits)[:_LABEL_PERMUTATION_GROUPS]
    ]


@functools.cache
def _validation_docstrings(limits: _Limits) -> frozenset[str]:
    """The inputs of ``label_permutation``: training families leave these texts out."""
    return frozenset(text for _, pairs in _label_permutation_groups(limits) for text, _ in pairs)


def _docstring_to_module(limits: _Limits) -> list[_Draft]:
    template = "Docstring: {input}\nModule:"
    held_out = _validation_docstrings(limits)
    return [
        ("-".join(modules), template, [pair for pair in pairs if pair[0] not in held_out], True)
        for modules, pairs in _docstring_groups(limits)
    ]


def _label_permutation(limits: _Limits) -> list[_Draft]:
    drafts = []
    for group, (modules, pairs) in enumerate(_label_permutation_groups(limits)):
        assignments = random.Random(f"label_permutation/{group}").sample(
            list(itertools.permutations(MADE_UP_LABELS)), _LABEL_PERMUTATIONS_PER_GROUP
        )
        for index, assignment in enumerate(assignments):
            label_of = dict(zip(modules, assignment, strict=True))
            renamed = [(text, label_of[module]) for text, module in pairs]
            name = f"{group * _LABEL_PERMUTATIONS_PER_GROUP + index:02d}"
            drafts.append((name, "Text: {input}\nLabel:", renamed, True))
    return drafts


def _topic_to_title(limits: _Limits) -> list[_Draft]:
    from pydoc_data.topics import topics  # plain data: a dict of topic name -> text

    paragraphs_of: dict[str, list[str]] = {}
    for key in sorted(topics):
        title = topics[key].splitlines()[0].strip()
        if title in paragraphs_of:  # "else" and "if" share their text
            continue
        paragraphs_of[title] = [
            _clip(paragraph, limits.max_input_chars)
            for paragraph in re.split(r"\n\s*\n", topics[key])
            # Prose only: not headings (a line of *, = or -), grammar and code (indented), or signatures.
            if len(paragraph.split()) >= 8
            and not paragraph.startswith(" ")
            and paragraph.rstrip().endswith((".", ":"))
            and not re.search(r"^[*=\-~^]+$", paragraph, re.MULTILINE)
        ]
    # Dealt like cards, largest topics first and the order reversed every round, so that every
    # task of 6 topics gets about as many paragraphs.
    count = len(paragraphs_of) // 6
    titles = sorted(paragraphs_of, key=lambda title: (-len(paragraphs_of[title]), title))[: 6 * count]
    groups: list[list[str]] = [[] for _ in range(count)]
    for index, title in enumerate(titles):
        seat = index % count
        groups[seat if (index // count) % 2 == 0 else count - 1 - seat].append(title)
    return [
        (
            f"{index:02d}",
            "Passage: {input}\nSection:",
            [(p, title) for title in group for p in paragraphs_of[title]],
            True,
        )
        for index, group in enumerate(groups)
    ]


def _word_map(limits: _Limits) -> list[_Draft]:
    phrases = [p for length in (2, 3) for p in itertools.product(MADE_UP_WORDS, repeat=length)]
    drafts = []
    for index in range(_WORD_MAP_TASKS):
        name = f"{index:02d}"
        meanings = random.Random(f"word_map/{name}").sample(ENGLISH_WORDS, len(MADE_UP_WORDS))
        meaning = dict(zip(MADE_UP_WORDS, meanings, strict=True))
        pairs = [(" ".join(phrase), " ".join(meaning[word] for word in phrase)) for phrase in phrases]
        drafts.append((name, "Input: {input}\nOutput:", pairs, False))
    return drafts


def _caesar(text: str, shift: int) -> str:
    return "".join(chr((ord(c) - 97 + shift) % 26 + 97) if "a" <= c <= "z" else c for c in text)


#: String operations on a list of words; ``string_transform`` composes two per task.
_STRING_OPERATIONS: dict[str, Callable[[list[str]], list[str]]] = {
    "reverse word order": lambda words: words[::-1],
    "reverse each word": lambda words: [word[::-1] for word in words],
    "sort letters": lambda words: ["".join(sorted(word)) for word in words],
    "swap first and last": lambda words: [words[-1], *words[1:-1], words[0]],
    "uppercase every other word": lambda words: [w.upper() if i % 2 == 0 else w for i, w in enumerate(words)],
    "sort words": sorted,
    "drop first word": lambda words: words[1:],
    "double last word": lambda words: [*words, words[-1]],
    "first letters": lambda words: ["".join(word[0] for word in words)],
    "shift letters by 1": lambda words: [_caesar(word, 1) for word in words],
    "shift letters by 3": lambda words: [_caesar(word, 3) for word in words],
}


def _string_transform(limits: _Limits) -> list[_Draft]:
    rng = random.Random("string_transform/inputs")
    inputs = sorted({" ".join(rng.sample(ENGLISH_WORDS, rng.randint(3, 5))) for _ in range(4 * limits.max_examples)})
    pairs_of_operations = list(itertools.combinations(sorted(_STRING_OPERATIONS), 2))
    chosen = random.Random("string_transform/rules").sample(pairs_of_operations, _STRING_TRANSFORM_TASKS)
    drafts = []
    for index, operations in enumerate(chosen):
        order = random.Random(f"string_transform/{index:02d}").sample(operations, 2)
        pairs = []
        for text in inputs:
            words = text.split()
            for operation in order:
                words = _STRING_OPERATIONS[operation](words)
            if " ".join(words) != text:
                pairs.append((text, " ".join(words)))
        drafts.append((f"{index:02d}", "Input: {input}\nOutput:", pairs, False))
    return drafts


def _definition(synset: Synset) -> str:
    """The gloss without its quoted examples."""
    return synset.gloss.split('; "')[0].strip().rstrip(";").strip()


def _by_supersense(synsets: tuple[Synset, ...], pairs_of: Callable[[Synset], list[tuple[str, str]]], template: str):
    groups: dict[str, list[tuple[str, str]]] = {}
    for synset in synsets:
        groups.setdefault(synset.supersense, []).extend(pairs_of(synset))
    return [(supersense, template, groups[supersense], False) for supersense in sorted(groups)]


def _gloss_to_word(synsets: tuple[Synset, ...], limits: _Limits) -> list[_Draft]:
    def pairs(synset: Synset) -> list[tuple[str, str]]:
        return [(_clip(_definition(synset), limits.max_input_chars), synset.words[0])]

    return _by_supersense(synsets, pairs, "Definition: {input}\nWord:")


def _word_to_gloss(synsets: tuple[Synset, ...], limits: _Limits) -> list[_Draft]:
    return _by_supersense(synsets, lambda s: [(s.words[0], _definition(s))], "Word: {input}\nDefinition:")


def _word_to_hypernym(synsets: tuple[Synset, ...], limits: _Limits) -> list[_Draft]:
    first_word = {(synset.part, synset.offset): synset.words[0] for synset in synsets}

    def pairs(synset: Synset) -> list[tuple[str, str]]:
        targets = [(part, offset) for symbol, offset, part, _, _ in synset.pointers if symbol in ("@", "@i")]
        # A hypernym inside a compound (bluebird -> bird) is given away: leave it out.
        if not targets or first_word[targets[0]].lower() in synset.words[0].lower():
            return []
        return [(synset.words[0], first_word[targets[0]])]

    return _by_supersense(synsets, pairs, "Word: {input}\nHypernym:")


def _word_to_antonym(synsets: tuple[Synset, ...], limits: _Limits) -> list[_Draft]:
    words_of = {(synset.part, synset.offset): synset.words for synset in synsets}

    def pairs(synset: Synset) -> list[tuple[str, str]]:
        antonyms = [
            (synset.words[source - 1], words_of[part, offset][target - 1])
            for symbol, offset, part, source, target in synset.pointers
            if symbol == "!"
        ]
        # An antonym inside the word (unhappy -> happy) is given away: leave it out.
        return [(word, antonym) for word, antonym in antonyms if antonym.lower() not in word.lower()]

    return _by_supersense(synsets, pairs, "Word: {input}\nAntonym:")


def _word_to_supersense(synsets: tuple[Synset, ...], limits: _Limits) -> list[_Draft]:
    words_of: dict[str, list[str]] = {}
    for synset in synsets:
        words_of.setdefault(synset.supersense, []).extend(synset.words)
    drafts = []
    for part in ("noun", "verb"):
        supersenses = sorted(name for name in SUPERSENSES if name.startswith(part + ".") and name != "noun.Tops")
        random.Random(f"word_to_supersense/{part}").shuffle(supersenses)
        for index in range(0, len(supersenses) - 4, 5):
            group = supersenses[index : index + 5]
            pairs = [(word, supersense) for supersense in group for word in words_of[supersense]]
            drafts.append((f"{part}-{index // 5}", "Word: {input}\nCategory:", pairs, True))
    return drafts


_BUILDERS: dict[str, Callable[[_Limits], list[_Draft]]] = {
    "code_to_summary": _code_to_summary,
    "code_to_name": _code_to_name,
    "summary_to_name": _summary_to_name,
    "name_to_module": _name_to_module,
    "docstring_to_module": _docstring_to_module,
    "topic_to_title": _topic_to_title,
    "word_map": _word_map,
    "label_permutation": _label_permutation,
    "string_transform": _string_transform,
}
_WORDNET_BUILDERS: dict[str, Callable[[tuple[Synset, ...], _Limits], list[_Draft]]] = {
    "gloss_to_word": _gloss_to_word,
    "word_to_gloss": _word_to_gloss,
    "word_to_hypernym": _word_to_hypernym,
    "word_to_antonym": _word_to_antonym,
    "word_to_supersense": _word_to_supersense,
}
