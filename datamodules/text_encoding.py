"""Text-to-text tasks as tensors: prompt templates, and every example of a task encoded once (prompt, output,
options and their scores, calibration and channel rows, BIG-bench demonstrations).

Used by :class:`~lightning_meta.datamodules.text_to_text.TextToTextTasksDataModule` (reading and splitting tasks,
sampling episodes) and by the task collections' readers (templates).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_meta.data.tasks import (
    CALIBRATION_FIELDS,
    CHANNEL_FIELDS,
    CHANNEL_SEQUENCE_FIELDS,
    DEMONSTRATION_FIELDS,
    IGNORE_INDEX,
    OUTPUT_REGEX,
    STOP_STRING,
    TASK_PREFIX_LENGTH,
    Choices,
    GenerationRule,
)
from lightning_meta.data.tokenization import load_tokenizer
from lightning_meta.datamodules.bigbench import BIGBENCH_EXAMPLE_SEPARATOR
from lightning_meta.datamodules.collection_rows import EXAMPLE_SEPARATOR, TASK_PREFIX
from lightning_meta.datamodules.templates import (
    output_joint,
    template_parts,
    written_template_parts,
)


@dataclass
class TextTask:
    """One task's examples as token tensors, padded to ``max_length`` (see :class:`TextToTextTasksDataModule`)."""

    name: str
    family: str | None
    input_ids: Tensor  # (examples, max_length)
    attention_mask: Tensor
    labels: Tensor  # IGNORE_INDEX except on the output tokens (and the end token)
    choice_input_ids: Tensor | None = None  # (examples, options, max_length): each option after the prompt
    choice_attention_mask: Tensor | None = None
    choice_labels: Tensor | None = None  # on the option's own tokens (no end token); on an output's and its end token
    # (examples,): index of the option that is the first output; -1 without options (a split carries only whether
    # it is >= 0, Choices.multiple_choice, beside correct: the right answers once)
    answer: Tensor | None = None
    correct: Tensor | None = None  # (examples, options): which choice rows are correct outputs
    credit: Tensor | None = None  # (examples, options): the grade for choosing each row (BIG-bench's target_scores)
    characters: Tensor | None = None  # (examples, options): each row's text length (lm-eval's acc_norm)
    # (examples, 3, options, max_length): ids, mask and labels of each option after the content-free prompt
    calibration: Tensor | None = None
    channel: Tensor | None = None  # (examples, 3, options, max_length): each option, then the prompt (labelled)
    channel_sequence: Tensor | None = None  # (examples, 3, max_length): the output, then the prompt (labelled)
    # (examples, 2, max_length): ids and mask of each example as a BIG-bench demonstration (demonstrations="bigbench")
    demonstration: Tensor | None = None
    task_prefix_length: Tensor | None = None  # (examples,): the task prefix's tokens at the start of each prompt
    stop_string: str | None = None  # the task's, cutting generated outputs (GenerationRule)
    output_regex: str | None = None
    inputs: list[str] = field(default_factory=list)  # each example's input text, for the held-out overlap check
    ceiling: float | None = None  # the best accuracy a reader of the support can reach (a control task's)

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, rows: list[int]) -> TextTask:
        """The task with only the examples at ``rows``."""
        index = torch.tensor(rows, dtype=torch.long)
        tensors = {
            item.name: getattr(self, item.name)[index]
            for item in fields(self)
            if isinstance(getattr(self, item.name), Tensor)
        }
        return replace(self, **tensors, inputs=[self.inputs[row] for row in rows])


def encode_tasks(
    examples: dict[str, dict[str, Any]],
    tokenizer_name: str,
    max_length: int,
    truncate_inputs: bool,
    skip_long_examples: bool = False,
    channel: bool = False,
    calibration: bool = True,
    demonstrations: str = "metaicl",
) -> dict[str, TextTask]:
    """Every task's examples as tensors; with ``skip_long_examples`` those that do not fit are left out
    (a task none of whose examples fits, too), with one log line; with ``channel`` also channel-style; with
    ``calibration`` the options after the content-free prompt; with ``demonstrations="bigbench"`` each example as a
    BIG-bench demonstration too."""
    tokenizer = load_tokenizer(tokenizer_name)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"Tokenizer {tokenizer_name!r} has no end-of-text token to end each output with.")
    encoder = TaskEncoder(
        tokenizer,
        max_length,
        truncate_inputs,
        skip_long_examples,
        channel=channel,
        calibration=calibration,
        demonstrations=demonstrations,
    )
    tasks = {name: encoder.encode(name, task) for name, task in examples.items()}
    if encoder.skipped:
        rank_zero_info(
            f"Text-to-text tasks: left out {sum(encoder.skipped.values())} examples longer than "
            f"max_length={max_length}, by task: {encoder.skipped}."
        )
    tasks = {name: task for name, task in tasks.items() if task is not None}
    if encoder.truncated:
        rank_zero_info(f"Text-to-text tasks: shortened the input of {encoder.truncated} examples to fit max_length.")
    return tasks


#: Characters per token of the first prefix that :meth:`TaskEncoder._leading_ids` tokenizes.
_CHARS_PER_TOKEN = 8


#: Tokens at the end of a prefix's tokens that may differ from the whole text's: a word or a merge cut in two.
_CUT_MARGIN = 16


class TaskEncoder:
    """Tokenizes examples into padded rows: prompt, `` output``, end token."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        truncate_inputs: bool,
        skip_long: bool = False,
        memo: bool = False,
        channel: bool = False,
        calibration: bool = True,
        demonstrations: str = "metaicl",
    ) -> None:
        self.tokenizer = tokenizer
        self.channel = channel
        self.calibration = calibration
        self.demonstrations = demonstrations
        self.max_length = max_length
        self.truncate_inputs = truncate_inputs
        self.skip_long = skip_long
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.truncated = 0
        self.skipped: dict[str, int] = {}  # examples left out (too long), by task
        # With memo, each text is tokenized once: the control families encode a task per episode from few words.
        self.memo: dict[str, list[int]] | None = {} if memo else None

    def ids(self, texts: list[str]) -> list[list[int]]:
        if self.memo is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        new = [text for text in dict.fromkeys(texts) if text not in self.memo]
        if new:
            self.memo.update(zip(new, self.tokenizer(new, add_special_tokens=False)["input_ids"], strict=True))
        return [self.memo[text] for text in texts]

    def encode(self, name: str, task: dict[str, Any]) -> TextTask | None:
        """The task's examples as tensors; ``None`` when none fits and long examples are skipped."""
        ceiling = task.get("ceiling")
        prompts, joints = zip(
            *(
                output_joint(prefix + text + suffix)
                for (prefix, suffix), text in zip(map(template_parts, task["templates"]), task["inputs"], strict=True)
            ),
            strict=True,
        )
        # BIG-bench's demonstrations: the task prefix, tokenized on its own, leads every prompt (written once before
        # the demonstrations by MetaICL's evaluation); each example is also written as a demonstration.
        bigbench = self.demonstrations == "bigbench"
        lead = task.get(TASK_PREFIX, "") if bigbench else ""
        if lead:
            starts = [template_parts(template)[0] for template in dict.fromkeys(task["templates"])]
            if not all(start.startswith(lead) for start in starts):
                raise ValueError(
                    f"Task {name!r} gives the task_prefix {lead[:40]!r}, but its template starts {starts[0][:40]!r}: "
                    "the task prefix is the text every prompt of the task starts with. Fix the task_prefix column, or "
                    "leave it empty."
                )
        lead_ids = self.ids([lead])[0] if lead else []
        example_separator = self.ids([task.get(EXAMPLE_SEPARATOR, BIGBENCH_EXAMPLE_SEPARATOR)])[0] if bigbench else []
        eos = [self.tokenizer.eos_token_id]
        # Channel rows write the output, then this separator (MetaICL's code writes "\n" there), then the prompt.
        separator = self.ids(["\n"])[0] if self.channel else []
        outputs = [
            [ids + eos for ids in self.ids([joint + text for text in texts])]
            for joint, texts in zip(joints, task["outputs"], strict=True)
        ]
        # Written after each prompt and scored: the example's options, else its correct outputs when it has several.
        choices = [
            list(options) if options else texts if len(texts) > 1 else []
            for texts, options in zip(task["outputs"], task["options"], strict=True)
        ]
        # An option is scored on its own tokens, as BIG-bench's rank classification and lm-eval's loglikelihood do;
        # the several correct outputs of an example without options keep the end token: exact match asks greedy
        # decoding to write one of them and stop, as the training row's labels do.
        choice_ids = [
            [ids + ([] if options else eos) for ids in self.ids([joint + text for text in texts])]
            for joint, texts, options in zip(joints, choices, task["options"], strict=True)
        ]
        # A demonstration is the prompt without the task prefix, the output and the example separator (no end token).
        demonstration_extra = [
            len(answers[0]) - 1 + len(example_separator) - len(lead_ids) if bigbench else 0 for answers in outputs
        ]
        prompt_ids = [
            self._fit(
                name,
                row,
                prompt,
                task,
                max(max(len(ids) for ids in [*answers, *rows]) + len(separator), extra),
                lead_ids,
            )
            for row, (prompt, answers, rows, extra) in enumerate(
                zip(
                    self._prompt_ids([prompt[len(lead) :] for prompt in prompts], task["inputs"], lead_ids),
                    outputs,
                    choice_ids,
                    demonstration_extra,
                    strict=True,
                )
            )
        ]
        kept = [row for row, ids in enumerate(prompt_ids) if ids is not None]
        if len(kept) < len(prompt_ids):
            self.skipped[name] = len(prompt_ids) - len(kept)
            if not kept:
                return None
            task = dict(task) | {
                key: [task[key][row] for row in kept]
                for key in ("templates", "inputs", "outputs", "options", "scores")
                if key in task
            }
            prompt_ids, outputs, choices, choice_ids = (
                [values[row] for row in kept] for values in (prompt_ids, outputs, choices, choice_ids)
            )
        input_ids, attention_mask, labels = self._rows(prompt_ids, [answers[0] for answers in outputs])
        try:
            rule = GenerationRule(task.get(STOP_STRING) or None, task.get(OUTPUT_REGEX) or None)
        except ValueError as error:
            raise ValueError(f"Task {name!r}: {error}") from None
        result = TextTask(
            name,
            task["family"],
            input_ids,
            attention_mask,
            labels,
            inputs=list(task["inputs"]),
            ceiling=ceiling,
            stop_string=rule.stop_string,
            output_regex=rule.output_regex,
        )
        if bigbench:
            ids, mask, _ = self._rows(
                [prompt[len(lead_ids) :] for prompt in prompt_ids],
                [answers[0][:-1] + example_separator for answers in outputs],
            )
            result.demonstration = torch.stack([ids, mask], 1)
            result.task_prefix_length = torch.full((len(prompt_ids),), len(lead_ids))
        if self.channel:  # the output without its end token, the separator, the prompt and the end token (labelled)
            result.channel_sequence = torch.stack(
                self._rows(
                    [answers[0][:-1] + separator for answers in outputs], [prompt + eos for prompt in prompt_ids]
                ),
                1,
            )
        width = max(map(len, choices))
        if width:  # examples list different numbers of options: the missing rows are padding (no labels)
            pairs = [
                (prompt, ids)
                for prompt, rows in zip(prompt_ids, choice_ids, strict=True)
                for ids in rows + [[]] * (width - len(rows))
            ]
            choice = self._rows([prompt if ids else [] for prompt, ids in pairs], [ids for _, ids in pairs])
            result.choice_input_ids, result.choice_attention_mask, result.choice_labels = (
                tensor.view(len(prompt_ids), width, self.max_length) for tensor in choice
            )
            result.answer = torch.tensor(
                [
                    options.index(texts[0]) if options else -1
                    for texts, options in zip(task["outputs"], task["options"], strict=True)
                ]
            )
            result.correct = torch.tensor(
                [
                    [text in texts for text in rows] + [False] * (width - len(rows))
                    for texts, rows in zip(task["outputs"], choices, strict=True)
                ]
            )
            result.credit = result.correct.double()
            for row, scores in enumerate(task.get("scores") or []):
                if scores is not None:
                    result.credit[row, : len(scores)] = torch.tensor(scores, dtype=torch.float64)
            result.credit = result.credit.float()
            result.characters = torch.tensor(
                [[float(len(text)) for text in rows] + [0.0] * (width - len(rows)) for rows in choices]
            )
            if self.calibration:
                # The content-free prompt: the example's template with an empty input (Holtzman et al.'s domain
                # premise "Answer:" is the template's text around the input); its end is kept where an option leaves
                # no room.
                templates = list(dict.fromkeys(task["templates"]))
                free_texts = ["".join(written_template_parts(text))[len(lead) :] for text in templates]
                free = {template: lead_ids + ids for template, ids in zip(templates, self.ids(free_texts), strict=True)}
                free_rows = [
                    (free[template], ids)
                    for template, rows in zip(task["templates"], choice_ids, strict=True)
                    for ids in rows + [[]] * (width - len(rows))
                ]
                result.calibration = (
                    torch.stack(
                        self._rows(
                            [
                                prompt[max(0, len(prompt) + len(ids) - self.max_length) :] if ids else []
                                for prompt, ids in free_rows
                            ],
                            [ids for _, ids in free_rows],
                        ),
                        1,
                    )
                    .view(len(prompt_ids), width, 3, self.max_length)
                    .transpose(1, 2)
                )
            if self.channel:  # each option (without an end token), the separator, then the prompt (labelled)
                result.channel = (
                    torch.stack(
                        self._rows(
                            [(ids[:-1] if ids[-1] == eos[0] else ids) + separator if ids else [] for _, ids in pairs],
                            [prompt if ids else [] for prompt, ids in pairs],
                        ),
                        1,
                    )
                    .view(len(prompt_ids), width, 3, self.max_length)
                    .transpose(1, 2)
                )
        return result

    def _prompt_ids(self, prompts: list[str], inputs: list[str], lead: list[int]) -> list[list[int] | None]:
        """Each prompt's token ids after ``lead`` (the task prefix's); ``None`` for a prompt whose input alone has more
        than ``max_length`` tokens (:meth:`_leading_ids`): it cannot fit, and is cut or refused without being
        tokenized whole."""
        long = {row for row, text in enumerate(inputs) if self._leading_ids(text) is not None}
        whole = iter(self.ids([prompt for row, prompt in enumerate(prompts) if row not in long]))
        return [None if row in long else lead + next(whole) for row in range(len(prompts))]

    def _leading_ids(self, text: str) -> list[int] | None:
        """More than ``max_length`` of the first token ids of ``text``, read from a prefix of it, or ``None`` when
        ``text`` has fewer tokens than that (it is then short enough to tokenize whole).

        Tokenizing a 10 MB input whole took 3.5 GB, for a cut to ``max_length`` tokens. A prefix of
        ``_CHARS_PER_TOKEN`` characters per token needed is tokenized instead (four times more while it gives too
        few tokens), and its last ``_CUT_MARGIN`` tokens, which may differ from the whole text's where the prefix
        cuts a word, are dropped: the tokens kept are those of the whole text.
        """
        needed = self.max_length + _CUT_MARGIN
        chars = needed * _CHARS_PER_TOKEN
        while chars < len(text):
            ids = self.ids([text[:chars]])[0]
            if len(ids) > needed:
                return ids[:-_CUT_MARGIN]
            chars *= 4
        return None

    def _fit(
        self,
        name: str,
        row: int,
        prompt: list[int] | None,
        task: dict[str, Any],
        answer_length: int,
        lead: list[int] | None = None,
    ) -> list[int] | None:
        """The prompt's ids, with the input shortened when allowed and needed to leave room for the answer
        (``None``: it does not fit, and long examples are skipped). ``prompt`` is ``None`` for an input longer
        than ``max_length`` tokens by itself (:meth:`_prompt_ids`); ``lead``: the task prefix's ids, which
        the template's start begins with, tokenized on their own."""
        room = self.max_length - answer_length
        if prompt is not None and len(prompt) <= room:
            return prompt
        lead = lead or []
        start, end = written_template_parts(task["templates"][row])
        lead_text = task.get(TASK_PREFIX, "") if lead else ""
        prefix, suffix = lead + self.ids([start[len(lead_text) :]])[0], self.ids([end])[0]
        text = self._leading_ids(task["inputs"][row]) or self.ids([task["inputs"][row]])[0]
        budget = room - len(prefix) - len(suffix)
        if not self.truncate_inputs or budget < 1:
            if self.skip_long:
                return None
            length = (
                f"{len(prompt) + answer_length} tokens long (prompt {len(prompt)}, output or longest option "
                f"{answer_length})"
                if prompt is not None
                else f"over {self.max_length} tokens long (its input alone)"
            )
            raise ValueError(
                f"Example {row} of task {name!r} is {length}, more than max_length={self.max_length}. Raise max_length "
                "(--data.init_args.max_length), shorten the inputs, or set truncate_inputs=true to cut inputs to fit "
                "(outputs are never cut)."
            )
        self.truncated += 1
        return prefix + text[:budget] + suffix

    def _rows(self, prompts: list[list[int]], answers: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
        ids, labels, mask = [], [], []
        for prompt, answer in zip(prompts, answers, strict=True):
            padding = self.max_length - len(prompt) - len(answer)
            ids.append(prompt + answer + [self.pad] * padding)
            labels.append([IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * padding)
            mask.append([1] * (len(prompt) + len(answer)) + [0] * padding)
        # Through numpy: torch.tensor on nested lists took a third of tokenizing 10,000 tasks, this a fourth of that.
        return tuple(
            torch.from_numpy(np.array(rows, dtype=np.int64).reshape(-1, self.max_length))
            for rows in (ids, mask, labels)
        )


def example_rows(
    task: TextTask,
    rows: Tensor,
    options: int,
    channel: bool = False,
    calibration: bool = True,
    demonstrations: bool = False,
) -> dict[str, Tensor]:
    """The split of ``rows``; with ``options`` > 0 its choice rows padded to ``options`` (padding rows have no
    labels; a task without options gets none listed), so that episodes of a split's tasks stack. Padded here,
    per episode: tasks keep their own option count (a few tasks with a hundred options would otherwise
    multiply every task's memory). With ``calibration`` the calibration rows come with the choice rows, and with
    ``channel`` the channel option rows too; the channel sequences come in every split; with ``demonstrations``
    each example as a BIG-bench demonstration and its task prefix's length, where the task has them."""
    split = {
        "input_ids": task.input_ids[rows],
        "attention_mask": task.attention_mask[rows],
        "labels": task.labels[rows],
    }
    if channel:
        split |= dict(zip(CHANNEL_SEQUENCE_FIELDS, task.channel_sequence[rows].unbind(1), strict=True))
    if demonstrations and task.demonstration is not None:
        split |= dict(zip(DEMONSTRATION_FIELDS, task.demonstration[rows].unbind(1), strict=True))
        split[TASK_PREFIX_LENGTH] = task.task_prefix_length[rows]
    if not options:
        return split
    groups: dict[tuple[str, str, str], Tensor | None] = {}
    if calibration:
        groups[CALIBRATION_FIELDS] = task.calibration
    if channel:
        groups[CHANNEL_FIELDS] = task.channel
    if task.answer is None:
        ids = torch.zeros((len(rows), options, task.input_ids.shape[1]), dtype=torch.long)
        for fields in groups:
            split |= dict(zip(fields, (ids, torch.zeros_like(ids), torch.full_like(ids, IGNORE_INDEX)), strict=True))
        no_options = torch.zeros((len(rows), options))
        choices = Choices(
            ids,
            torch.zeros_like(ids),
            torch.full_like(ids, IGNORE_INDEX),
            correct=no_options.bool(),
            multiple_choice=torch.zeros(len(rows), dtype=torch.bool),
            credit=no_options,
            characters=no_options,
        )
        return split | choices.fields()
    padding = options - task.choice_input_ids.shape[1]
    pad = functools.partial(torch.nn.functional.pad, pad=(0, 0, 0, padding))
    for fields, stacked in groups.items():
        values = (0, 0, IGNORE_INDEX)
        split |= {
            name: pad(tensor, value=value)
            for name, tensor, value in zip(fields, stacked[rows].unbind(1), values, strict=True)
        }
    choices = Choices(
        pad(task.choice_input_ids[rows]),
        pad(task.choice_attention_mask[rows]),
        pad(task.choice_labels[rows], value=IGNORE_INDEX),
        correct=torch.nn.functional.pad(task.correct[rows], (0, padding)),
        multiple_choice=task.answer[rows] >= 0,
        credit=torch.nn.functional.pad(task.credit[rows], (0, padding)),
        characters=torch.nn.functional.pad(task.characters[rows], (0, padding)),
    )
    return split | choices.fields()


def task_chance(task: TextTask, rows: Tensor) -> Tensor:
    """The accuracy of a uniform guess among the options of the examples at ``rows``, averaged (0 without options:
    a guess writes no free-form output)."""
    if task.choice_labels is None:
        return torch.zeros((), dtype=torch.float64)
    options = (task.choice_labels[rows] != IGNORE_INDEX).any(-1).sum(-1).double()
    return torch.where(options > 0, 1 / options.clamp_min(1), 0.0).mean()
