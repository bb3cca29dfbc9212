"""Text-to-text tasks for causal LMs: an episode is K support and Q query (input, output) examples of one task."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_meta.data.episodic import EpisodicDataModule
from lightning_meta.data.stream import data_fingerprint
from lightning_meta.data.tables import claim_name, describe_missing, is_missing, is_saved_dataset, read_table
from lightning_meta.data.tasks import (
    ANSWER,
    CHOICE_ATTENTION_MASK,
    CHOICE_INPUT_IDS,
    CHOICE_LABELS,
    CORRECT,
    IGNORE_INDEX,
    Episode,
)
from lightning_meta.data.tokenization import load_tokenizer, required_tokenizer
from lightning_meta.datamodules.task_collections import TaskCollection, read_task_collection, resolve_task_names

if TYPE_CHECKING:
    from datasets import Dataset

INPUT_FIELD = "{input}"
#: ``{name}`` in a template: only ``{input}`` is a placeholder (other braces, as in ``{"a": 1}``, are text).
_PLACEHOLDER = re.compile(r"\{[A-Za-z_]\w*\}")
_SPLITS = ("val", "test")


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
    answer: Tensor | None = None  # (examples,): index of the option that is the first output; -1 without options
    correct: Tensor | None = None  # (examples, options): which choice rows are correct outputs

    def __len__(self) -> int:
        return len(self.input_ids)


class TextToTextTasksDataModule(EpisodicDataModule):
    """Episodes of text-to-text tasks (classification, QA, summarization, ...) for causal LMs.

    A task is a set of (input, output) examples and a prompt template; an example becomes the
    sequence ``template(input) + " " + output + end token``, and the loss covers the output tokens
    and the end token only (``labels`` are ``-100`` on the prompt and the padding). An episode
    draws a family, one of its tasks, and ``shots + queries`` distinct examples of it: the support (what adaptation,
    or MetaICL's demonstrations, see) and the query. Tasks whose table lists ``options`` (a
    classification task's possible outputs) also carry each option written after the query's
    prompt in validation and test episodes, so that evaluation scores them (``accuracy``: each option's
    own tokens, without the end token, as BIG-bench and lm-evaluation-harness score them); the other
    tasks are scored by exact match. Training episodes carry no options: training never reads them.

    Training, validation and test tasks are disjoint; by default whole task *families* are held
    out, so that evaluation measures transfer to new kinds of task. Evaluation episodes are fixed
    by ``seed``; the training stream is resumable and differs across ranks
    (:class:`EpisodicDataModule`).

    Args:
        tokenizer: ``embedded-bpe-4096`` (ships with the package), a local tokenizer folder or ``pkg:NAME/dir``;
            required (the CLI gives the learner's when unset).
        dataset: ``None`` for the built-in offline task gym (:mod:`lightning_meta.datamodules.task_gym`); a
            table (``json``/``jsonl``/``csv``/``parquet`` file, a glob of them, or a ``save_to_disk``
            folder) with one row per example; a folder holding one table per task (the task is
            the file name); or a task collection (:mod:`lightning_meta.datamodules.task_collections`): BIG-bench's
            source archive (``bigbench-1.0.0.tar.gz``, not extracted) or a folder of its JSON tasks, or a
            Natural-Instructions ``tasks`` folder; read once and cached.
        task_column: column naming each row's task (not needed for a folder of one table per task).
        input_column: column holding the input text.
        output_column: column holding the output text, or a list of correct outputs (the first trains;
            exact match accepts any). An input repeated with another output gets it as one more.
        family_column: column naming each task's family, used when the table has it.
        options_column: column listing a row's options (a list of strings, or one string of options
            separated by ``|``), used when the table has it: the row is scored against its own
            options, and its outputs must be among them.
        template: the prompt, with ``{input}`` where the input goes (for tables without a
            ``template_column``).
        template_column: column holding each row's template, used when the table has it.
        gym_families: the gym's families to load (default: every family available here).
        val_tasks: validation tasks by name (overrides ``val_families``); a task with subtasks stands
            for all of them (BIG-bench's ``NAME`` for ``NAME:SUBTASK``); or a preset's name:
            ``bigbench_lite``, BIG-bench Lite's 24 tasks (those in the data).
        test_tasks: test tasks, given like ``val_tasks`` (overrides ``test_families``).
        val_families: validation task families; by default the gym's held-out families, a seeded
            10% of the families of a table with families, else a seeded 10% of the tasks.
        test_families: test task families, chosen like ``val_families``.
        shots: support examples per episode.
        queries: query examples per episode.
        max_length: tokens per example (prompt, output and end token; longer ones are an error).
        truncate_inputs: shorten the input of an example that is too long instead of raising
            (the output is never shortened).
        skip_long_examples: leave out, instead of raising, the examples that stay longer than
            ``max_length`` (with ``truncate_inputs``: those whose fixed prompt alone leaves no room),
            and the tasks with fewer than ``shots + queries`` examples that fit; both are logged.
        max_examples_per_task: use at most this many examples of each task (the first ones; of a
            task collection, a sample drawn with ``seed``).
        family_keywords: BIG-bench keywords that give a task's family, first match wins (default
            :data:`~lightning_meta.datamodules.task_collections.FAMILY_KEYWORDS`).
        positive_examples: a Natural-Instructions task's positive examples in each prompt.
        others: ``meta_batch_size``, ``batches_per_epoch``, ``num_val_tasks``, ``num_test_tasks``,
            ``eval_meta_batch_size``, ``seed``, ``num_workers``, ``allow_data_change``: see
            :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        dataset: str | None = None,
        task_column: str = "task",
        input_column: str = "input",
        output_column: str = "output",
        family_column: str = "family",
        options_column: str = "options",
        template: str = "Input: {input}\nOutput:",
        template_column: str = "template",
        gym_families: list[str] | None = None,
        val_tasks: list[str] | str | None = None,
        test_tasks: list[str] | str | None = None,
        val_families: list[str] | None = None,
        test_families: list[str] | None = None,
        shots: int = 4,
        queries: int = 4,
        max_length: int = 64,
        truncate_inputs: bool = False,
        skip_long_examples: bool = False,
        max_examples_per_task: int | None = None,
        family_keywords: list[str] | None = None,
        positive_examples: int = 2,
        meta_batch_size: int = 4,
        batches_per_epoch: int = 100,
        num_val_tasks: int = 32,
        num_test_tasks: int = 64,
        eval_meta_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        allow_data_change: bool = False,
    ) -> None:
        super().__init__(
            meta_batch_size, batches_per_epoch, num_val_tasks, num_test_tasks, eval_meta_batch_size, seed, num_workers,
            allow_data_change,
        )  # fmt: skip
        if shots < 1 or queries < 1 or max_length < 4:
            raise ValueError(f"Need shots >= 1, queries >= 1, max_length >= 4; got {shots}, {queries}, {max_length}.")
        check_template(template)
        self.tokenizer = required_tokenizer(tokenizer, type(self).__name__)
        self.dataset = dataset
        self.task_column = task_column
        self.input_column = input_column
        self.output_column = output_column
        self.family_column = family_column
        self.options_column = options_column
        self.template = template
        self.template_column = template_column
        self.gym_families = gym_families
        self.val_tasks = val_tasks
        self.test_tasks = test_tasks
        self.val_families = val_families
        self.test_families = test_families
        self.shots = shots
        self.queries = queries
        self.max_length = max_length
        self.truncate_inputs = truncate_inputs
        self.skip_long_examples = skip_long_examples
        self.max_examples_per_task = max_examples_per_task
        self.family_keywords = family_keywords
        self.positive_examples = positive_examples
        self.save_hyperparameters(ignore=["allow_data_change"])  # a resume's choice, not carried to the next

    def prepare_data(self) -> None:
        load_tokenizer(self.tokenizer)

    def setup(self, stage: str) -> None:
        """Read and tokenize the tasks, split them (errors about the data surface here)."""
        self.split_tasks  # noqa: B018 (computes and caches the tasks and the splits)

    @functools.cached_property
    def examples(self) -> dict[str, dict[str, Any]]:
        """Each task's ``family``, ``templates``, ``inputs``, ``outputs`` and ``options`` (text, before tokenizing)."""
        if self.dataset is None:
            return _gym_examples(self.gym_families, self.max_examples_per_task)
        if self.collection is not None:
            return self._tasks_from_table(self.collection.table, self.dataset)
        path = Path(self.dataset).expanduser()
        if path.is_dir() and not is_saved_dataset(path):
            return self._tasks_from_folder(path)
        return self._tasks_from_table(read_table(self.dataset), self.dataset)

    @functools.cached_property
    def collection(self) -> TaskCollection | None:
        """The BIG-bench or Natural-Instructions collection at ``dataset``; ``None`` for the gym and tables."""
        if self.dataset is None:
            return None
        return read_task_collection(self.dataset, self.max_examples_per_task, self.seed, self.family_keywords,
                                    self.positive_examples, min_examples=self.shots + self.queries)  # fmt: skip

    @functools.cached_property
    def tasks(self) -> dict[str, TextTask]:
        """Every task, tokenized (the gym's once per process and settings: several datamodules share them)."""
        if self.dataset is None:
            families = tuple(self.gym_families) if self.gym_families is not None else None
            tasks = _tokenized_gym(self.tokenizer, families, self.max_length, self.truncate_inputs,
                                   self.max_examples_per_task, self.skip_long_examples)  # fmt: skip
        else:
            tasks = _tokenize(self.examples, self.tokenizer, self.max_length, self.truncate_inputs,
                              self.skip_long_examples)  # fmt: skip
        needed = self.shots + self.queries
        small = {name: len(task) for name, task in tasks.items() if len(task) < needed}
        if small and self.skip_long_examples:
            rank_zero_info(
                f"Text-to-text tasks: left out {len(small)} tasks with fewer than shots + queries = {needed} examples "
                f"that fit max_length={self.max_length}: {sorted(small)}."
            )
            return {name: task for name, task in tasks.items() if name not in small}
        if small:
            raise ValueError(
                f"Tasks with fewer than shots + queries = {needed} distinct examples: {small}. Lower shots or queries, "
                "add examples to those tasks, or leave them out of the data."
            )
        return tasks

    @functools.cached_property
    def split_tasks(self) -> dict[str, list[str]]:
        """Task names of each split; the three are disjoint, and held-out families have no training task."""
        tasks = self.tasks
        families = {name: task.family for name, task in tasks.items()}
        known_families = sorted({family for family in families.values() if family is not None})
        held_out: dict[str, list[str]] = {}
        held_out_families: dict[str, list[str]] = {}  # every task of these families stays out of training
        named: dict[str, str] = {}  # task -> the split that names it: a family split holds out only the others
        ceded: dict[str, int] = {}  # per family split: how many of its families' tasks another split names
        for split in sorted(_SPLITS, key=lambda split: getattr(self, f"{split}_tasks") is None):  # named first
            names, chosen_families = getattr(self, f"{split}_tasks"), getattr(self, f"{split}_families")
            if names is not None:
                names = resolve_task_names(names, tasks, self.collection, split)
                unknown = sorted(set(names) - set(tasks))
                if unknown:
                    raise ValueError(f"Unknown tasks {unknown} in {split}_tasks; tasks: {sorted(tasks)}.")
                held_out[split] = sorted(names)
                named |= dict.fromkeys(names, split)
                continue
            if chosen_families is None:
                available = sorted({families[name] for name in tasks if name not in named} - {None})
                chosen_families = self._default_families(split, known_families, available)
            if chosen_families is None:
                continue
            unknown = sorted(set(chosen_families) - set(known_families))
            if unknown:
                raise ValueError(
                    f"Unknown families {unknown} in {split}_families; families: {known_families}"
                    + ("" if known_families else f" (the data has no {self.family_column!r} column)")
                    + "."
                )
            members = [name for name, family in families.items() if family in set(chosen_families)]
            held_out[split] = sorted(name for name in members if name not in named)
            held_out_families[split] = sorted(chosen_families)
            ceded[split] = len(members) - len(held_out[split])
        if {name for names in held_out.values() for name in names} == set(tasks):
            given = [f"{split}_{kind}" for split in _SPLITS for kind in ("tasks", "families")
                     if getattr(self, f"{split}_{kind}") is not None]  # fmt: skip
            among = f"families: {', '.join(known_families)}" if known_families else "tasks"
            raise ValueError(
                f"{' and '.join(given) or 'The held-out splits'} take every one of the {len(tasks)} tasks: no training "
                f"task is left. Hold out fewer ({among}), or add tasks."
            )
        drawn = [split for split in _SPLITS if split not in held_out]
        if drawn:  # too few families: a seeded draw of tasks
            shuffled = _shuffled(sorted(tasks), self.seed)
            count = max(1, len(tasks) // 10)
            taken = {name for names in held_out.values() for name in names}
            for split in drawn:
                held_out[split] = sorted([name for name in shuffled if name not in taken][:count])
                taken |= set(held_out[split])
        overlap = sorted(set(held_out["val"]) & set(held_out["test"]))
        if overlap:
            raise ValueError(f"Tasks {overlap} are in both the validation and the test split.")
        excluded = set(held_out["val"]) | set(held_out["test"])
        excluded_families = {family for chosen in held_out_families.values() for family in chosen}
        train = [name for name in sorted(tasks) if name not in excluded and families[name] not in excluded_families]
        for split in _SPLITS:
            if not held_out[split]:
                raise ValueError(f"The {split} split has no task: name some with {split}_tasks or {split}_families.")
        if not train:
            raise ValueError("Every task is held out: leave at least one task for training.")
        trained_families = {families[name] for name in train}
        described = {
            split: _describe_split(held_out[split], held_out_families.get(split), families, trained_families)
            + (f"; {ceded[split]} more of their tasks are named by {'/'.join(sorted(set(named.values())))}_tasks"
               if ceded.get(split) else "")
            for split in _SPLITS
        }  # fmt: skip
        why = ""
        if drawn:
            have = f"{len(known_families)} families" if known_families else f"no {self.family_column!r} column"
            why = (
                f" Held out by task, not by family, for {' and '.join(drawn)}: the data has {have} (whole families "
                f"are held out by default from 3 families on); name them with {drawn[0]}_families or {drawn[0]}_tasks."
            )
        rank_zero_info(
            f"Text-to-text tasks: {len(train)} training tasks; validation {described['val']}; test "
            f"{described['test']}.{why}"
        )
        return {"train": train, "val": held_out["val"], "test": held_out["test"]}

    def _default_families(self, split: str, known_families: list[str], available: list[str]) -> list[str] | None:
        """The gym's held-out families; for a table with 3 families or more a seeded 10%, drawn among the
        ``available`` families (those with a task that no split names); else ``None``."""
        if self.dataset is None:
            from lightning_meta.datamodules.task_gym import DEFAULT_SPLIT

            return [family for family in DEFAULT_SPLIT[split] if family in known_families]
        if len(known_families) < 3 or not available:
            return None
        count = max(1, len(known_families) // 10)
        shuffled = _shuffled(available, self.seed)
        return shuffled[:count] if split == "val" else shuffled[count : 2 * count]

    @functools.cached_property
    def _families_of_split(self) -> dict[str, list[list[str]]]:
        """Each split's tasks grouped by family (a task without a family is a family of its own)."""
        grouped: dict[str, list[list[str]]] = {}
        for split, names in self.split_tasks.items():
            families: dict[str, list[str]] = {}
            for name in names:
                families.setdefault(self.tasks[name].family or f"task:{name}", []).append(name)
            grouped[split] = [families[family] for family in sorted(families)]
        return grouped

    @functools.cached_property
    def _options_of_split(self) -> dict[str, int]:
        """The most options of a split's tasks: its episodes' choice rows are padded to it. When any task lists
        options, every evaluation episode carries choice rows (at least one), so that every split reports accuracy;
        training episodes carry none (:meth:`sample_episode`)."""
        listed = int(any(task.answer is not None for task in self.tasks.values()))
        return {
            split: max([listed, *(self.tasks[name].choice_input_ids.shape[1] for name in names
                                  if self.tasks[name].answer is not None)])
            for split, names in self.split_tasks.items()
        }  # fmt: skip

    def data_fingerprint(self) -> str:
        """Of every task's tokenized examples and the split."""
        return data_fingerprint(self.split_tasks, self.tasks)

    def sample_episode(self, generator: torch.Generator, split: str) -> Episode:
        # A family first, then one of its tasks: families with many tasks do not crowd out the others.
        families = self._families_of_split[split]
        names = families[int(torch.randint(len(families), (), generator=generator))]
        task = self.tasks[names[int(torch.randint(len(names), (), generator=generator))]]
        chosen = torch.randperm(len(task), generator=generator)[: self.shots + self.queries]
        options = self._options_of_split[split]
        if split == "train":
            # Training reads no options: a BIG-bench batch would otherwise carry (and data-check) ~100 rows per
            # example at every step.
            options = 0
        support, query = (_rows(task, rows, options) for rows in (chosen[: self.shots], chosen[self.shots :]))
        return Episode(
            support=support,
            query=query,
            shots=self.shots,
            metadata={"task": task.name, "family": task.family or "", "example_ids": chosen},
        )

    def _tasks_from_table(self, table: Dataset, source: str) -> dict[str, dict[str, Any]]:
        required = [self.task_column, self.input_column, self.output_column]
        absent = [column for column in required if column not in table.column_names]
        if absent:
            raise ValueError(
                f"{source} has no column {absent}; its columns are {table.column_names}. Name the columns with "
                "--data.init_args.task_column / input_column / output_column."
            )
        missing = {column: [row for row, value in enumerate(table[column]) if is_missing(value)] for column in required}
        if any(missing.values()):
            raise ValueError(
                f"Missing values in {source} (rows counted from 0): {describe_missing(missing, len(table))}. Every "
                "row needs a task, an input and an output: filter those rows out first."
            )
        optional = {
            "family": self.family_column,
            "template": self.template_column,
            "options": self.options_column,
        }
        columns = {key: table[column] if column in table.column_names else None for key, column in optional.items()}
        tasks: dict[str, dict[str, Any]] = {}
        for row, (name, text_input, text_output) in enumerate(
            zip(table[self.task_column], table[self.input_column], table[self.output_column], strict=True)
        ):
            family, template, options = (None if values is None else values[row] for values in columns.values())
            task = tasks.setdefault(
                str(name),
                {"family": None, "templates": [], "inputs": [], "outputs": [], "options": [], "row_of": {},
                 "repeated": 0, "conflicting": 0},
            )  # fmt: skip
            if family is not None and not is_missing(family):
                task["family"] = str(family)
            outputs = _outputs(text_output, f"{source}, row {row}")
            text_input = str(text_input)
            if text_input in task["row_of"]:  # a repeated input could land in both the support and the query
                known = task["outputs"][task["row_of"][text_input]]
                added = [output for output in outputs if output not in known]
                task["conflicting" if added else "repeated"] += 1
                known += added
                continue
            task["row_of"][text_input] = len(task["inputs"])
            task["templates"].append(
                check_template(str(template), f"{source}, row {row}")
                if template is not None and not is_missing(template)
                else self.template
            )
            task["inputs"].append(text_input)
            task["outputs"].append(outputs)
            task["options"].append(_options(options))
        for name, task in tasks.items():
            del task["row_of"]
            repeated, conflicting = task.pop("repeated"), task.pop("conflicting")
            if conflicting:
                rank_zero_info(
                    f"Task {name!r}: {conflicting} rows repeat an earlier input with another output; each input is "
                    "kept once, with every output given for it as a correct output (the first one trains)."
                    + (f" {repeated} more rows repeat an input and its output: dropped." if repeated else "")
                )
            if self.max_examples_per_task is not None:
                for key in ("templates", "inputs", "outputs", "options"):
                    task[key] = task[key][: self.max_examples_per_task]
            for index, (outputs, options) in enumerate(zip(task["outputs"], task["options"], strict=True)):
                unlisted = [output for output in outputs if options is not None and output not in options]
                if unlisted:
                    raise ValueError(
                        f"Task {name!r}, example {index} ({task['inputs'][index][:40]!r}) lists options "
                        f"{list(options)}, but its outputs {unlisted[:5]} are not among them. List every correct "
                        "output in that row's options, or leave its options empty."
                    )
        return tasks

    def _tasks_from_folder(self, folder: Path) -> dict[str, dict[str, Any]]:
        files = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
        if not files:
            raise ValueError(f"No task tables in folder {folder}: put one .jsonl/.csv/.parquet file per task there.")
        tasks: dict[str, dict[str, Any]] = {}
        sources: dict[str, Path] = {}
        for file in files:
            claim_name(sources, file.stem, file, "task", "merge them into one file")
            table = read_table(str(file))
            table = table.remove_columns([c for c in table.column_names if c == self.task_column])
            table = table.add_column(self.task_column, [file.stem] * len(table))
            tasks |= self._tasks_from_table(table, str(file))
        return tasks


@functools.lru_cache(maxsize=4)
def _tokenized_gym(
    tokenizer: str,
    families: tuple[str, ...] | None,
    max_length: int,
    truncate_inputs: bool,
    limit: int | None,
    skip_long_examples: bool,
) -> dict[str, TextTask]:
    examples = _gym_examples(list(families) if families is not None else None, limit)
    return _tokenize(examples, tokenizer, max_length, truncate_inputs, skip_long_examples)


def _gym_examples(families: list[str] | None, limit: int | None) -> dict[str, dict[str, Any]]:
    from lightning_meta.datamodules.task_gym import gym_tasks

    return {
        task.name: {
            "family": task.family,
            "templates": [task.template] * len(task.examples[:limit]),
            "inputs": [text for text, _ in task.examples[:limit]],
            "outputs": [[output] for _, output in task.examples[:limit]],
            "options": [task.options] * len(task.examples[:limit]),
        }
        for task in gym_tasks(families)
    }


def _tokenize(
    examples: dict[str, dict[str, Any]],
    tokenizer_name: str,
    max_length: int,
    truncate_inputs: bool,
    skip_long_examples: bool = False,
) -> dict[str, TextTask]:
    """Every task's examples as tensors; with ``skip_long_examples`` those that do not fit are left out
    (a task none of whose examples fits, too), with one log line."""
    tokenizer = load_tokenizer(tokenizer_name)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"Tokenizer {tokenizer_name!r} has no end-of-text token to end each output with.")
    encoder = _Encoder(tokenizer, max_length, truncate_inputs, skip_long_examples)
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


def check_template(template: str, where: str = "template") -> str:
    """``template`` itself, or an error when it lacks exactly one ``{input}`` or names another placeholder."""
    if template.count(INPUT_FIELD) != 1:
        raise ValueError(
            f"The prompt template {template!r} ({where}) must contain {INPUT_FIELD} exactly once, where the input "
            'goes; e.g. "Input: {input}\\nOutput:".'
        )
    unknown = sorted(set(_PLACEHOLDER.findall(template)) - {INPUT_FIELD})
    if unknown:
        raise ValueError(
            f"The prompt template {template!r} ({where}) has the placeholder(s) {', '.join(unknown)}: only "
            f"{INPUT_FIELD} is filled in, and the output always follows the prompt after a space. End the template "
            'where the output starts, e.g. "Q: {input}\\nA:".'
        )
    return template


class _Encoder:
    """Tokenizes examples into padded rows: prompt, `` output``, end token."""

    def __init__(self, tokenizer: Any, max_length: int, truncate_inputs: bool, skip_long: bool = False) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncate_inputs = truncate_inputs
        self.skip_long = skip_long
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.truncated = 0
        self.skipped: dict[str, int] = {}  # examples left out (too long), by task

    def ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def encode(self, name: str, task: dict[str, Any]) -> TextTask | None:
        """The task's examples as tensors; ``None`` when none fits and long examples are skipped."""
        prompts = [
            template.replace(INPUT_FIELD, text)
            for template, text in zip(task["templates"], task["inputs"], strict=True)
        ]
        eos = [self.tokenizer.eos_token_id]
        outputs = [[ids + eos for ids in self.ids([" " + text for text in texts])] for texts in task["outputs"]]
        # Written after each prompt and scored: the example's options, else its correct outputs when it has several.
        choices = [
            list(options) if options else texts if len(texts) > 1 else []
            for texts, options in zip(task["outputs"], task["options"], strict=True)
        ]
        # An option is scored on its own tokens, as BIG-bench's rank classification and lm-eval's loglikelihood do;
        # the several correct outputs of an example without options keep the end token: exact match asks greedy
        # decoding to write one of them and stop, as the training row's labels do.
        choice_ids = [
            [ids + ([] if options else eos) for ids in self.ids([" " + text for text in texts])]
            for texts, options in zip(choices, task["options"], strict=True)
        ]
        prompt_ids = [
            self._fit(name, row, prompt, task, max(len(ids) for ids in [*answers, *rows]))
            for row, (prompt, answers, rows) in enumerate(zip(self.ids(prompts), outputs, choice_ids, strict=True))
        ]
        kept = [row for row, ids in enumerate(prompt_ids) if ids is not None]
        if len(kept) < len(prompt_ids):
            self.skipped[name] = len(prompt_ids) - len(kept)
            if not kept:
                return None
            task = {"family": task["family"]} | {
                key: [task[key][row] for row in kept] for key in ("templates", "inputs", "outputs", "options")
            }
            prompt_ids, outputs, choices, choice_ids = (
                [values[row] for row in kept] for values in (prompt_ids, outputs, choices, choice_ids)
            )
        input_ids, attention_mask, labels = self._rows(prompt_ids, [answers[0] for answers in outputs])
        result = TextTask(name, task["family"], input_ids, attention_mask, labels)
        width = max(map(len, choices))
        if width:  # examples list different numbers of options: the missing rows are padding (no labels)
            pairs = [
                (prompt, ids) for prompt, rows in zip(prompt_ids, choice_ids, strict=True)
                for ids in rows + [[]] * (width - len(rows))
            ]  # fmt: skip
            choice = self._rows([prompt if ids else [] for prompt, ids in pairs], [ids for _, ids in pairs])
            result.choice_input_ids, result.choice_attention_mask, result.choice_labels = (
                tensor.view(len(prompt_ids), width, self.max_length) for tensor in choice
            )
            result.answer = torch.tensor([
                options.index(texts[0]) if options else -1
                for texts, options in zip(task["outputs"], task["options"], strict=True)
            ])  # fmt: skip
            result.correct = torch.tensor([
                [text in texts for text in rows] + [False] * (width - len(rows))
                for texts, rows in zip(task["outputs"], choices, strict=True)
            ])  # fmt: skip
        return result

    def _fit(
        self, name: str, row: int, prompt: list[int], task: dict[str, Any], answer_length: int
    ) -> list[int] | None:
        """The prompt's ids, with the input shortened when allowed and needed to leave room for the answer
        (``None``: it does not fit, and long examples are skipped)."""
        room = self.max_length - answer_length
        if len(prompt) <= room:
            return prompt
        template = task["templates"][row]
        prefix, suffix = (self.ids([part])[0] for part in template.split(INPUT_FIELD))
        text = self.ids([task["inputs"][row]])[0]
        budget = room - len(prefix) - len(suffix)
        if not self.truncate_inputs or budget < 1:
            if self.skip_long:
                return None
            raise ValueError(
                f"Example {row} of task {name!r} is {len(prompt) + answer_length} tokens long (prompt {len(prompt)}, "
                f"output or longest option {answer_length}), more than max_length={self.max_length}. Raise max_length "
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
        return tuple(torch.tensor(rows, dtype=torch.long).view(-1, self.max_length) for rows in (ids, mask, labels))


def _rows(task: TextTask, rows: Tensor, options: int) -> dict[str, Tensor]:
    """The split of ``rows``; with ``options`` > 0 its choice rows padded to ``options`` (padding rows have no
    labels; a task without options gets none listed), so that episodes of a split's tasks stack. Padded here,
    per episode: tasks keep their own option count (a few tasks with a hundred options would otherwise
    multiply every task's memory)."""
    split = {
        "input_ids": task.input_ids[rows],
        "attention_mask": task.attention_mask[rows],
        "labels": task.labels[rows],
    }
    if not options:
        return split
    if task.answer is None:
        ids = torch.zeros((len(rows), options, task.input_ids.shape[1]), dtype=torch.long)
        return split | {
            CHOICE_INPUT_IDS: ids,
            CHOICE_ATTENTION_MASK: torch.zeros_like(ids),
            CHOICE_LABELS: torch.full_like(ids, IGNORE_INDEX),
            ANSWER: torch.full((len(rows),), -1, dtype=torch.long),
            CORRECT: torch.zeros((len(rows), options), dtype=torch.bool),
        }
    padding = options - task.choice_input_ids.shape[1]
    pad = functools.partial(torch.nn.functional.pad, pad=(0, 0, 0, padding))
    return split | {
        CHOICE_INPUT_IDS: pad(task.choice_input_ids[rows]),
        CHOICE_ATTENTION_MASK: pad(task.choice_attention_mask[rows]),
        CHOICE_LABELS: pad(task.choice_labels[rows], value=IGNORE_INDEX),
        ANSWER: task.answer[rows],
        CORRECT: torch.nn.functional.pad(task.correct[rows], (0, padding)),
    }


def _options(options: Any) -> tuple[str, ...] | None:
    """A row's options: a list, or one string of options separated by ``|``; ``None`` when it lists none."""
    if options is None or (not isinstance(options, str) and len(options) == 0) or is_missing(options):
        return None
    return tuple(str(option) for option in (options.split("|") if isinstance(options, str) else options))


def _outputs(value: Any, where: str) -> list[str]:
    """A row's correct outputs: one text, or a list of texts (the first one trains; any one is an exact match)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        outputs = list(dict.fromkeys(str(output) for output in value if not is_missing(output)))
        if not outputs:
            raise ValueError(f"{where}: the output is an empty list: give at least one correct output.")
        return outputs
    return [str(value)]


def _shuffled(names: list[str], seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [names[i] for i in torch.randperm(len(names), generator=generator)]


def _describe_split(
    names: list[str], held_families: list[str] | None, families: dict[str, str | None], trained: set[str | None]
) -> str:
    """``2 tasks held out by family (families f1)`` or ``1 task held out by task (t4; its family f1 also trains)``."""
    count = f"{len(names)} task{'s' * (len(names) != 1)}"
    if held_families is not None:
        return f"{count} held out by family (families {', '.join(held_families)})"
    shown = ", ".join(names[:5]) + ("..." if len(names) > 5 else "")
    shared = sorted({families[name] for name in names if families[name] is not None} & trained)
    if not shared:
        return f"{count} held out by task ({shown})"
    which = f"its family {shared[0]} trains" if len(shared) == 1 else f"their families {', '.join(shared)} train"
    return f"{count} held out by task ({shown}; {which} too)"
