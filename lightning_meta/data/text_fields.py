"""The fields of a text split, by name: token rows and their labels, the options (read and written through
:class:`Choices`), calibration and channel rows, packed rows, BIG-bench's demonstrations and task prefix, and the
episode metadata that grades or cuts what a model writes (:class:`GenerationRule`). Splits carry them as flat
tensors (:mod:`~lightning_meta.data.tasks`), the form that stacking episodes, padding, device moves and
``torch.func.vmap`` walk by key."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: Labels a loss ignores (prompt tokens of a text-to-text example, padding).
IGNORE_INDEX = -100


#: Fields of a split that lists each example's options (text-to-text classification), each shaped
#: ``(examples, options, tokens)``: every option written after the example's prompt, its ``labels``
#: on the option's tokens only (all ``IGNORE_INDEX`` for padding options). Read them, and the fields below that
#: describe them, through :class:`Choices`.
CHOICE_INPUT_IDS, CHOICE_ATTENTION_MASK, CHOICE_LABELS = "choice_input_ids", "choice_attention_mask", "choice_labels"


CHOICE_FIELDS = (CHOICE_INPUT_IDS, CHOICE_ATTENTION_MASK, CHOICE_LABELS)


#: ``(examples,)`` bool: whether the example is answered by choosing one of its options (graded by :data:`CREDIT`);
#: where false, its choice rows are its correct outputs, any of which greedy decoding may write (exact match).
MULTIPLE_CHOICE = "multiple_choice"


#: An earlier version's ``(examples,)`` index of the right option (-1 where the example lists no options), which
#: repeated :data:`CORRECT`. Splits built by the datamodules no longer carry it; :meth:`Choices.read` still reads
#: a split that has it instead of :data:`MULTIPLE_CHOICE` (and without :data:`CORRECT`, the one option it names).
ANSWER = "answer"


#: Episode metadata of a control task (:mod:`lightning_meta.datamodules.control_tasks`, or a table's ``ceiling``
#: column): the best accuracy a reader of the support can reach, and a uniform guess's, as 0-dim tensors.
CEILING, CHANCE = "ceiling", "chance"


#: ``(examples, options)`` bool: which choice rows are correct outputs. An example without options but with
#: several correct outputs lists those outputs as its choice rows (:data:`MULTIPLE_CHOICE` false), so that exact match
#: accepts any of them; a multiple-choice example may mark several options correct.
CORRECT = "correct"


#: ``(examples, options)`` float: the grade an example earns when its option is chosen: BIG-bench's
#: ``target_scores`` (partial credit, ``multiple_choice_grade``) where the task gives them; a split without it
#: grades 1 for a :data:`CORRECT` option and 0 otherwise.
CREDIT = "credit"


#: ``(examples, options)`` float: each option's length in characters (its own text, without the space before
#: it), for the ``per_char`` scoring rule (lm-eval's ``acc_norm``).
CHOICE_CHARACTERS = "choice_characters"


#: Fields of an evaluation split that list each option written after the content-free prompt (the task's template
#: with an empty input), shaped like :data:`CHOICE_FIELDS`, labels on the option's tokens: the ``calibrated`` rule
#: (domain-conditional PMI, Holtzman et al. 2021) subtracts their scores from the options'.
CALIBRATION_FIELDS = ("calibration_input_ids", "calibration_attention_mask", "calibration_labels")


#: Fields of an evaluation split that list each option written first, then the example's prompt (its input written
#: by the template), shaped like :data:`CHOICE_FIELDS`, labels on the prompt's tokens: the ``channel`` rule
#: (noisy channel, Min et al. 2022) scores log p(input | option).
CHANNEL_FIELDS = ("channel_input_ids", "channel_attention_mask", "channel_labels")


#: Fields of a split (every split, with the datamodule's ``channel``) holding each example's channel training
#: sequence ``(examples, tokens)``: its output, then its prompt and the end token, labels on the prompt and end token.
CHANNEL_SEQUENCE_FIELDS = ("channel_sequence_input_ids", "channel_sequence_attention_mask", "channel_sequence_labels")


#: Fields of a packed split (MetaICL's one row per episode: several sequences sharing their first tokens), shaped
#: like its ``input_ids``: each token's position in its own sequence; its segment (0: the shared tokens, which every
#: segment reads; s > 0: one sequence's own tokens, read only by that segment; -1: padding); and each label's weight
#: in the loss (how many of the sequences hold that token: a shared label counts once per sequence).
POSITION_IDS, SEGMENT_IDS, LABEL_WEIGHTS = "position_ids", "segment_ids", "label_weights"


#: Fields of an evaluation split (the datamodule's ``demonstrations="bigbench"``) holding each example written as a
#: BIG-bench demonstration ``(examples, tokens)``: its prompt without the task prefix, its output and the task's
#: example separator, no end token (``bigbench/api/json_task.py``). MetaICL's evaluation writes the support so.
DEMONSTRATION_FIELDS = ("demonstration_input_ids", "demonstration_attention_mask")


#: ``(examples,)``: how many of the first tokens of each row (its sequence, options and calibration rows) are the
#: task prefix, which BIG-bench writes once, before the demonstrations (with :data:`DEMONSTRATION_FIELDS`).
TASK_PREFIX_LENGTH = "task_prefix_length"


#: Episode metadata of an evaluation episode (text): its task's stop string and output regular expression, ``""``
#: where the task gives none (BIG-bench's ``stop_string`` and ``output_regex``; :func:`generation_rule` reads them).
STOP_STRING, OUTPUT_REGEX = "stop_string", "output_regex"


@dataclass(frozen=True)
class Choices:
    """A split's options, typed: the rows each example's options are scored on and what grades them, the right
    answers encoded once (:attr:`correct`).

    A split carries them as flat fields (:data:`CHOICE_FIELDS`, :data:`MULTIPLE_CHOICE`, :data:`CORRECT`,
    :data:`CREDIT`, :data:`CHOICE_CHARACTERS`): the form that stacking episodes, padding, device moves and
    ``torch.func.vmap`` walk by key. :meth:`read` and :meth:`fields` are the one reader and the one writer of that
    form: the datamodules write a split's options with ``split | Choices(...).fields()``, and the learner and
    MetaICL read them with ``Choices.read(split)``. The tensors' leading dimensions are the split's (``(examples,
    ...)`` for one episode; a stacked batch has an episode dimension first).
    """

    input_ids: Tensor  #: ``(examples, options, tokens)``: each option written after the example's prompt
    attention_mask: Tensor
    labels: Tensor  #: on the option's own tokens; all ``IGNORE_INDEX`` for a padding option
    correct: Tensor  #: ``(examples, options)`` bool: which rows are right (several may be)
    multiple_choice: Tensor  #: ``(examples,)`` bool: see :data:`MULTIPLE_CHOICE`
    credit: Tensor  #: ``(examples, options)`` float: the grade for choosing each row
    characters: Tensor  #: ``(examples, options)`` float: each option's length in characters

    @classmethod
    def read(cls, split: Mapping[str, Tensor]) -> Choices | None:
        """The options ``split`` lists, or ``None`` where it lists none. Defaults, for splits written by hand: the
        credit of a correct row is 1 and of the others 0; an option's characters are its labelled tokens (so
        ``per_char`` reads as ``per_token``). A split of an earlier version (:data:`ANSWER` instead of
        :data:`MULTIPLE_CHOICE`) reads as the same choices."""
        if CHOICE_INPUT_IDS not in split:
            return None
        input_ids, attention_mask, labels = (split[name] for name in CHOICE_FIELDS)
        answer, multiple_choice, correct = split.get(ANSWER), split.get(MULTIPLE_CHOICE), split.get(CORRECT)
        if answer is None and (multiple_choice is None or correct is None):
            given = ", ".join(name for name in (MULTIPLE_CHOICE, CORRECT) if name in split) or "neither"
            raise ValueError(
                f"The split lists options ({CHOICE_INPUT_IDS}) but not which are right: it has {given} of "
                f"{MULTIPLE_CHOICE!r} and {CORRECT!r}. Write the options with lightning_meta.data.tasks.Choices"
                "(...).fields(), which writes both."
            )
        if multiple_choice is None:
            multiple_choice = answer >= 0
        if correct is None:
            options = input_ids.shape[-2]
            correct = torch.nn.functional.one_hot(answer.clamp_min(0), options).bool() & multiple_choice[..., None]
        credit = split.get(CREDIT)
        characters = split.get(CHOICE_CHARACTERS)
        return cls(
            input_ids,
            attention_mask,
            labels,
            correct.bool(),
            multiple_choice.bool(),
            correct.float() if credit is None else credit.float(),
            (labels != IGNORE_INDEX).sum(-1).float() if characters is None else characters,
        )

    def fields(self) -> dict[str, Tensor]:
        """The split fields that carry these choices (what :meth:`read` reads back)."""
        return {
            CHOICE_INPUT_IDS: self.input_ids,
            CHOICE_ATTENTION_MASK: self.attention_mask,
            CHOICE_LABELS: self.labels,
            MULTIPLE_CHOICE: self.multiple_choice,
            CORRECT: self.correct,
            CREDIT: self.credit,
            CHOICE_CHARACTERS: self.characters,
        }

    def rows(self, index: Tensor) -> Choices:
        """The choices of the examples ``index`` selects (along the first dimension)."""
        return Choices(*(getattr(self, name.name)[index] for name in dataclasses.fields(self)))

    @property
    def scored(self) -> Tensor:
        """``(examples,)`` bool: examples with at least one correct row (only they are scored)."""
        return self.correct.any(-1)


@dataclass(frozen=True)
class GenerationRule:
    """How a generated output is cut before it is compared with the correct outputs, as BIG-bench's
    ``postprocess_output`` (``bigbench/models/model_utils.py``) cuts it: at the first ``stop_string`` found past
    the output's first character, keeping the stop string, then to the first match of ``output_regex`` (``""``
    without one). An exact match then asks only that the cut text be a correct output, not that the end token follow.
    """

    stop_string: str | None = None
    output_regex: str | None = None

    def __post_init__(self) -> None:
        if self.output_regex:
            try:
                groups = re.compile(self.output_regex).groups
            except re.error as error:
                raise ValueError(f"output_regex {self.output_regex!r} is not a regular expression ({error}).") from None
            if groups > 1:
                raise ValueError(
                    f"output_regex {self.output_regex!r} has {groups} capturing groups, so its match is not one text: "
                    "make the others non-capturing ((?:...)), as BIG-bench asks."
                )

    @property
    def cuts(self) -> bool:
        """Whether the rule changes anything (without either part, a generated output is compared as it is)."""
        return bool(self.stop_string or self.output_regex)

    def apply(self, text: str) -> str:
        """``text`` cut by the rule (BIG-bench's ``postprocess_output`` without ``max_length``)."""
        if self.stop_string:
            index = text.find(self.stop_string)
            if index > 0:  # BIG-bench's test: a stop string at the very start cuts nothing
                text = text[: index + len(self.stop_string)]
        if self.output_regex:
            text = next(iter(re.findall(self.output_regex, text)), "")
        return text


def generation_rule(metadata: Mapping[str, Any]) -> GenerationRule | None:
    """The :class:`GenerationRule` of an episode's metadata (:data:`STOP_STRING`, :data:`OUTPUT_REGEX`), or ``None``
    where it gives none."""
    stop, regex = (metadata.get(name) for name in (STOP_STRING, OUTPUT_REGEX))
    # One episode's values are texts (a stacked batch holds lists of them: no one rule).
    rule = GenerationRule(
        stop if isinstance(stop, str) and stop else None, regex if isinstance(regex, str) and regex else None
    )
    return rule if rule.cuts else None


def channel_sequences(split: Mapping[str, Tensor], who: str) -> dict[str, Tensor]:
    """``split`` with its channel sequences (:data:`CHANNEL_SEQUENCE_FIELDS`) as its ``input_ids``,
    ``attention_mask`` and ``labels``: what ``who`` (an algorithm with ``direction="channel"``) trains on; an
    error naming the datamodule's flag when the split has none."""
    if CHANNEL_SEQUENCE_FIELDS[0] not in split:
        raise ValueError(
            f"{who} needs the channel sequences that TextToTextTasksDataModule writes with channel=true: set "
            "--data.init_args.channel=true."
        )
    fields = zip(("input_ids", "attention_mask", "labels"), CHANNEL_SEQUENCE_FIELDS, strict=True)
    return dict(split) | {name: split[field] for name, field in fields}
