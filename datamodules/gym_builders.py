"""How each family of the task gym (:mod:`~lightning_meta.datamodules.task_gym`) is built from its source: the
candidate (input, output) pairs of each of its tasks, before the gym's common filtering (limits, distinct inputs,
leaks) makes them tasks. A builder per family (:data:`BUILDERS`, :data:`WORDNET_BUILDERS`)."""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from lightning_meta.data.corpus import SUPERSENSES, Synset, stdlib_definitions

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
class Limits:
    max_examples: int
    max_input_chars: int
    max_output_chars: int


# One task before its final filtering: (name suffix, template, (input, output) pairs, is classification).
Draft = tuple[str, str, list[tuple[str, str]], bool]


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


def contains_words(text: str, phrase: str) -> bool:
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


def _by_group(pairs: list[tuple[str, tuple[str, str]]], template: str) -> list[Draft]:
    groups: dict[str, list[tuple[str, str]]] = {}
    for group, pair in pairs:
        groups.setdefault(group, []).append(pair)
    return [(group, template, groups[group], False) for group in sorted(groups)]


def _code_to_summary(limits: Limits) -> list[Draft]:
    pairs = []
    for definition in stdlib_definitions():
        if definition.is_class or not definition.docstring or not definition.code:
            continue
        code = _clip_code(definition.code, limits.max_input_chars)
        if code:
            pairs.append((_group(definition.module), (code, _summary(definition.docstring))))
    return _by_group(pairs, "Code:\n{input}\nSummary:")


def _code_to_name(limits: Limits) -> list[Draft]:
    pairs = []
    for definition in stdlib_definitions():
        name = definition.qualname.rsplit(".", 1)[-1]
        if definition.is_class or not definition.code or not _is_public(definition.qualname):
            continue
        code = _clip_code(re.sub(rf"\b{re.escape(name)}\b", "___", definition.code), limits.max_input_chars)
        if code:
            pairs.append((_group(definition.module), (code, name)))
    return _by_group(pairs, "Code:\n{input}\nName of ___:")


def _summary_to_name(limits: Limits) -> list[Draft]:
    pairs = []
    for definition in stdlib_definitions():
        name = definition.qualname.rsplit(".", 1)[-1]
        if definition.is_class or not definition.docstring or not _is_public(definition.qualname):
            continue
        summary = _clip(_summary(definition.docstring), limits.max_input_chars)
        if not contains_words(summary, name.replace("_", " ")) and summary not in _validation_docstrings(limits):
            pairs.append((_group(definition.module), (summary, name)))
    return _by_group(pairs, "Description: {input}\nFunction name:")


def _mentions(text: str, module: str) -> bool:
    """Whether ``text`` names ``module``: anywhere for long names, as a word for short ones (re, os)."""
    return module.lower() in text.lower() if len(module) >= 4 else contains_words(text, module)


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


def _name_to_module(limits: Limits) -> list[Draft]:
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
def _docstring_groups(limits: Limits) -> list[tuple[list[str], list[tuple[str, str]]]]:
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


def _label_permutation_groups(limits: Limits) -> list[tuple[list[str], list[tuple[str, str]]]]:
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
def _validation_docstrings(limits: Limits) -> frozenset[str]:
    """The inputs of ``label_permutation``: training families leave these texts out."""
    return frozenset(text for _, pairs in _label_permutation_groups(limits) for text, _ in pairs)


def _docstring_to_module(limits: Limits) -> list[Draft]:
    template = "Docstring: {input}\nModule:"
    held_out = _validation_docstrings(limits)
    return [
        ("-".join(modules), template, [pair for pair in pairs if pair[0] not in held_out], True)
        for modules, pairs in _docstring_groups(limits)
    ]


def _label_permutation(limits: Limits) -> list[Draft]:
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


def _topic_to_title(limits: Limits) -> list[Draft]:
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


def _word_map(limits: Limits) -> list[Draft]:
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


def _string_transform(limits: Limits) -> list[Draft]:
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


def _gloss_to_word(synsets: tuple[Synset, ...], limits: Limits) -> list[Draft]:
    def pairs(synset: Synset) -> list[tuple[str, str]]:
        return [(_clip(_definition(synset), limits.max_input_chars), synset.words[0])]

    return _by_supersense(synsets, pairs, "Definition: {input}\nWord:")


def _word_to_gloss(synsets: tuple[Synset, ...], limits: Limits) -> list[Draft]:
    return _by_supersense(synsets, lambda s: [(s.words[0], _definition(s))], "Word: {input}\nDefinition:")


def _word_to_hypernym(synsets: tuple[Synset, ...], limits: Limits) -> list[Draft]:
    first_word = {(synset.part, synset.offset): synset.words[0] for synset in synsets}

    def pairs(synset: Synset) -> list[tuple[str, str]]:
        targets = [(part, offset) for symbol, offset, part, _, _ in synset.pointers if symbol in ("@", "@i")]
        # A hypernym inside a compound (bluebird -> bird) is given away: leave it out.
        if not targets or first_word[targets[0]].lower() in synset.words[0].lower():
            return []
        return [(synset.words[0], first_word[targets[0]])]

    return _by_supersense(synsets, pairs, "Word: {input}\nHypernym:")


def _word_to_antonym(synsets: tuple[Synset, ...], limits: Limits) -> list[Draft]:
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


def _word_to_supersense(synsets: tuple[Synset, ...], limits: Limits) -> list[Draft]:
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


BUILDERS: dict[str, Callable[[Limits], list[Draft]]] = {
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


WORDNET_BUILDERS: dict[str, Callable[[tuple[Synset, ...], Limits], list[Draft]]] = {
    "gloss_to_word": _gloss_to_word,
    "word_to_gloss": _word_to_gloss,
    "word_to_hypernym": _word_to_hypernym,
    "word_to_antonym": _word_to_antonym,
    "word_to_supersense": _word_to_supersense,
}
