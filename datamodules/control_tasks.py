"""Control task families: every task draws its rule afresh, so only learning from the support can beat chance.

A positive control for the language-model path. In these families nothing that training can store in the
weights answers a query: each task's rule (a label assignment, a constant, a position) is drawn anew, and only
the task's own support examples tell it. A model at chance on them has learned nothing from the context; a
model near the **ceiling**, the accuracy of the Bayes-optimal reader of ``shots`` support examples (computed
exactly from the generator, :meth:`ControlFamily.ceiling`), has learned to learn. Zero-shot (no support), every
model is at **chance**. Families:

| family | a task | input -> output | options | ceiling with K shots |
|---|---|---|---|---|
| ``label_mapping`` | N input words, each given a label word | ``dog`` -> ``bind`` | the task's N labels | see below |
| ``arithmetic`` | a constant c | ``3`` -> ``(3 + c) mod m`` | the m residues | 1 (K >= 1) |
| ``selection`` | a position p | ``dog cat sun`` -> the word at p | the input's L words | 1 (K >= 1) |

Label mapping (symbol tuning's setting, Wei et al. 2023): the support and the queries are drawn from the N
(input, label) pairs with replacement, so a query's input may be missing from the support; the Bayes-optimal
reader then answers it with one of the labels no support example shows. With D the number of distinct inputs
among the K support examples, it is right with probability ``D/N + (N - D)/N * 1/(N - D)`` (the last term 0
when D = N), averaged over the exact distribution of D (occupancy of N boxes by K balls): for N = 4,
K = 8, 0.994 (:func:`label_mapping_ceiling`; a reader that only copies a seen input's label and guesses among all
N otherwise gets 0.925).

Every input and output is one token of the embedded BPE tokenizer (``embedded-bpe-4096``), both at the start
of a text and after a space, and the template is ``{input}`` alone: an example is ``input output<end>``, three
tokens (``selection``: L + 2). Training tasks draw their words from one half of :data:`CONTROL_WORDS`,
validation and test tasks from the other half (``held_out_words``), so that evaluation asks for label words
and inputs no training task used; ``arithmetic`` has only m rules, so its held-out tasks are new draws of the
constant. Every episode is a fresh task: there are far more distinct training tasks than any run sees.

Example::

    from lightning_meta.datamodules import TextToTextTasksDataModule

    data = TextToTextTasksDataModule(tokenizer="embedded-bpe-4096", dataset="control", shots=8)
    data.setup("fit")
    episode = data.sample_episode(torch.Generator().manual_seed(0), "test")
    episode.metadata["ceiling"], episode.metadata["chance"]  # 0.994, 0.25
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

#: The ``dataset`` value that selects the control families as a text-to-text datamodule's source.
CONTROL = "control"

#: Lowercase words that are one token of ``embedded-bpe-4096`` both at the start of a text and after a space
#: (559, sorted). Split four ways by position (every fourth word): training inputs and labels, held-out inputs
#: and labels.
CONTROL_WORDS: tuple[str, ...] = tuple(
    """
abs accept act add addr address after all allow allowed and angle any app append arch are arg args argument
array assert async atom attr attribute attrs auth authkey auto back base before bind bit block body break
buffer build builtin byte bytes cache cal call callback can cancel cancelled cannot cap case cause cer char
chars charset check child children chunk circ class classes clear client close closed cls cnf code col
collections color colorizing com command comment common comp compare compat compile compiler comple complete
completion con cond condition config conn connection cont contain contains content context convert copy cor
coro count cre create ctypes cur current data date datetime debug decimal decode def default defaults defined
del dict diff dir direct dis dispatch display div doc doctype document domain done dot double down dst dump
edit elem element else empty encode encoded encoding end ensure ent entity env environ err error errors escape
event exact exc except exception exec execut executable executor exist exists exit exp expected expr
expression ext extension extra factory fail failure family field fields file filename filter fin find first
fix fixer flags float focus for form format fragment frame framework from frozen full fullname fun func
function future futures get getattr global got gra grid group hand handle handler handlers has hash head
header headers height here host http https icon ident idle idx ign imp implement import include ind indent
index info init input insert install instance int inter internal invalid ite item items iter iterable
iterator its json just keep key keys kwargs lang last lat left len length level lib libraries library like
limit line lines link list literal load loader local location lock log logger long loop macro macros mailbox
main make manager map mark mat match max member message meta method min mod mode module modules mon most msg
mult multip name names namespace net new next node non normal not now num number obj object objects off
offset old once one only open opener oper opt option options ord order origin other out output over own pack
package pairs par param parameter params parent parse parser part parts pass path paths pattern pend pending
per pipe pla place platform point port pos position power pre prec prefix present previous print pro process
protocol proxy put python query queue quot quote quoted raise range raw rawdata read ready real record redu
ref reg register release remove replace repr req request res reset response rest result return right root
round row run running safe scheme screen script search second section see sel self sen send separator seq
ser server set shared show shutdown side sign simple sing size skip sock socket sort source spa space spe
spec speci specifi specified split src ssl stack start state static status std stderr stdout stop str stream
strict string strip sub subprocess suite sup support supported sure syms syn sys system tag tail target task
temp termin test tests text that the this thread time timeout token top tra traceback trailer trans transport
tree try tuple tur type types und until update uri url use used user utcoff util val valid value values ver
version view wait waiter warning warnings way what when which widget width window winfo with word work
wrapper writ write writer wsgi xml zero zip zone
""".split()
)
#: The template of every control task: the input alone; the output follows after a space.
TEMPLATE = "{input}"


@dataclass(frozen=True)
class WordPools:
    """The words a split's tasks draw from: inputs and labels, disjoint."""

    inputs: tuple[str, ...]
    labels: tuple[str, ...]


def word_pools(split: str, held_out_words: bool = True, words: int | None = None) -> WordPools:
    """Training tasks' words (``train``), or the held-out ones (``val``/``test``, with ``held_out_words``); with
    ``words``, the first ``words`` inputs and labels of each pool."""
    offset = 2 if held_out_words and split != "train" else 0
    return WordPools(CONTROL_WORDS[offset::4][:words], CONTROL_WORDS[offset + 1 :: 4][:words])


@dataclass(frozen=True)
class ControlTask:
    """One task: its distinct (input, output) examples, each example's options, and the task's metrics.

    An episode draws its support and its queries from ``examples`` uniformly *with replacement*
    (:meth:`ControlFamily.ceiling` assumes it).
    """

    name: str
    family: str
    examples: tuple[tuple[str, str], ...]
    options: tuple[tuple[str, ...], ...]  # per example
    ceiling: float
    chance: float

    def as_examples(self) -> dict[str, Any]:
        """The task in the text-to-text datamodule's form (``family``, ``templates``, ``inputs``, ...)."""
        return {
            "family": self.family,
            "templates": [TEMPLATE] * len(self.examples),
            "inputs": [text for text, _ in self.examples],
            "outputs": [[output] for _, output in self.examples],
            "options": list(self.options),
            "ceiling": self.ceiling,
        }


class ControlFamily(ABC):
    """A family of tasks whose rule is drawn afresh per task: :meth:`draw` one, :meth:`ceiling` given K shots."""

    name: ClassVar[str]

    @abstractmethod
    def draw(self, generator: torch.Generator, words: WordPools, shots: int, name: str) -> ControlTask:
        """A fresh task from ``words``, using only ``generator``."""

    @abstractmethod
    def ceiling(self, shots: int) -> float:
        """The Bayes-optimal accuracy on a query after ``shots`` support examples drawn with replacement."""

    @abstractmethod
    def chance(self) -> float:
        """The accuracy of a uniform guess among a query's options (also the best zero-shot accuracy)."""

    @property
    @abstractmethod
    def options(self) -> int:
        """Options per example."""


def _sample(generator: torch.Generator, items: tuple[str, ...], count: int) -> list[str]:
    """``count`` distinct items, in random order."""
    return [items[i] for i in torch.randperm(len(items), generator=generator)[:count].tolist()]


@dataclass(frozen=True)
class LabelMapping(ControlFamily):
    """``classes`` input words, each given a distinct label word drawn afresh per task."""

    classes: int = 4
    name: ClassVar[str] = "label_mapping"

    def draw(self, generator: torch.Generator, words: WordPools, shots: int, name: str) -> ControlTask:
        inputs, labels = _sample(generator, words.inputs, self.classes), _sample(generator, words.labels, self.classes)
        options = tuple(sorted(labels))
        return ControlTask(
            name,
            self.name,
            tuple(zip(inputs, labels, strict=True)),
            (options,) * self.classes,
            self.ceiling(shots),
            self.chance(),
        )

    def ceiling(self, shots: int) -> float:
        return label_mapping_ceiling(self.classes, shots)

    def chance(self) -> float:
        return 1 / self.classes

    @property
    def options(self) -> int:
        return self.classes


@dataclass(frozen=True)
class Arithmetic(ControlFamily):
    """``x -> (x + c) mod modulus`` for the digits ``0 .. modulus - 1``, with c drawn afresh per task."""

    modulus: int = 8
    name: ClassVar[str] = "arithmetic"

    def draw(self, generator: torch.Generator, words: WordPools, shots: int, name: str) -> ControlTask:
        constant = int(torch.randint(self.modulus, (), generator=generator))
        options = tuple(str(value) for value in range(self.modulus))
        examples = tuple((str(x), str((x + constant) % self.modulus)) for x in range(self.modulus))
        return ControlTask(name, self.name, examples, (options,) * self.modulus, self.ceiling(shots), self.chance())

    def ceiling(self, shots: int) -> float:
        return 1.0 if shots >= 1 else self.chance()  # one example gives c = y - x

    def chance(self) -> float:
        return 1 / self.modulus

    @property
    def options(self) -> int:
        return self.modulus


@dataclass(frozen=True)
class Selection(ControlFamily):
    """``length`` distinct words -> the word at a position drawn afresh per task (a string function)."""

    length: int = 3
    examples: int = 16
    name: ClassVar[str] = "selection"

    def draw(self, generator: torch.Generator, words: WordPools, shots: int, name: str) -> ControlTask:
        position = int(torch.randint(self.length, (), generator=generator))
        rows = [_sample(generator, words.inputs, self.length) for _ in range(self.examples)]
        examples = tuple((" ".join(row), row[position]) for row in rows)
        options = tuple(tuple(sorted(row)) for row in rows)
        return ControlTask(name, self.name, examples, options, self.ceiling(shots), self.chance())

    def ceiling(self, shots: int) -> float:
        return 1.0 if shots >= 1 else self.chance()  # the words of an input differ: one example gives p

    def chance(self) -> float:
        return 1 / self.length

    @property
    def options(self) -> int:
        return self.length


def label_mapping_ceiling(classes: int, shots: int) -> float:
    """The Bayes-optimal accuracy of a label-mapping query after ``shots`` support examples (see the module)."""
    if classes < 2 or shots < 0:
        raise ValueError(f"label_mapping_ceiling needs classes >= 2 and shots >= 0, got {classes} and {shots}.")
    total = 0.0
    for distinct in range(min(classes, shots) + 1):
        # P(D = d): choose the d inputs seen, times the surjections of the shots onto them.
        surjections = sum((-1) ** j * math.comb(distinct, j) * (distinct - j) ** shots for j in range(distinct + 1))
        probability = math.comb(classes, distinct) * surjections / classes**shots
        correct = 1.0 if distinct == classes else (distinct + 1) / classes
        total += probability * correct
    return total


@dataclass
class ControlSettings:
    """Which control families a text-to-text datamodule draws its tasks from, and their sizes.

    Args:
        families: ``label_mapping``, ``arithmetic``, ``selection`` (each episode picks one uniformly).
        classes: label mapping's inputs (and labels) per task.
        modulus: arithmetic's modulus (its inputs and outputs are the digits below it: at most 9).
        length: selection's words per input.
        held_out_words: validation and test tasks draw their words from the half of
            :data:`CONTROL_WORDS` that training never uses.
        words: how many input words and label words each split's tasks draw from (default: all, 139 or 140).
    """

    families: list[str] = field(default_factory=lambda: ["label_mapping"])
    classes: int = 4
    modulus: int = 8
    length: int = 3
    held_out_words: bool = True
    words: int | None = None


class ControlTasks:
    """The control families of ``settings``: :meth:`draw` gives a fresh task of a split per call."""

    def __init__(self, settings: ControlSettings, shots: int) -> None:
        known = {"label_mapping": LabelMapping, "arithmetic": Arithmetic, "selection": Selection}
        unknown = [name for name in settings.families if name not in known]
        if unknown or not settings.families:
            raise ValueError(
                f"Unknown control families {unknown or settings.families}; known: {', '.join(known)} (e.g. "
                "--data.init_args.control.families=[label_mapping,arithmetic])."
            )
        if settings.classes < 2 or settings.length < 2 or not 2 <= settings.modulus <= 9:
            raise ValueError(
                f"Control families need classes >= 2, length >= 2 and 2 <= modulus <= 9 (one digit each), got "
                f"classes={settings.classes}, length={settings.length}, modulus={settings.modulus}."
            )
        pools = word_pools("test", settings.held_out_words, settings.words)
        if settings.classes > len(pools.labels) or settings.length > len(pools.inputs):
            raise ValueError(
                f"classes={settings.classes} or length={settings.length} is more than the {len(pools.labels)} words "
                "a split's tasks draw from: lower it, or raise words."
            )
        sizes = {
            "label_mapping": {"classes": settings.classes},
            "arithmetic": {"modulus": settings.modulus},
            "selection": {"length": settings.length},
        }
        self.families: list[ControlFamily] = [known[name](**sizes[name]) for name in dict.fromkeys(settings.families)]
        self.settings = settings
        self.shots = shots

    @property
    def options(self) -> int:
        """The most options of the families' examples: episodes pad their option rows to it, so that they stack."""
        return max(family.options for family in self.families)

    def draw(self, generator: torch.Generator, split: str) -> ControlTask:
        """A fresh task of ``split`` (a family first, uniformly), using only ``generator``."""
        family = self.families[int(torch.randint(len(self.families), (), generator=generator))]
        number = int(torch.randint(2**62, (), generator=generator))
        words = word_pools(split, self.settings.held_out_words, self.settings.words)
        return family.draw(generator, words, self.shots, f"{family.name}/{split}/{number:016x}")
